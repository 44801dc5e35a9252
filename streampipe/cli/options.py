"""Options and helpers that several commands share: argument types, the broker group,
batching, signals and client ids."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import uuid
from collections.abc import Callable
from typing import Any

from streampipe.topics import DEFAULT_ROOT, PARTITIONS
from streampipe.transport import BrokerURL, InvalidBrokerURL, with_credentials

__all__ = [
    "DEFAULT_BROKER",
    "add_batching",
    "add_broker",
    "broker_url",
    "broker_with_credentials",
    "client_id",
    "non_negative_float",
    "on_signals",
    "partitions",
    "percent",
    "positive_int",
    "rate",
    "refused_summary",
    "short_gil_slices",
]

log = logging.getLogger("streampipe")

DEFAULT_BROKER = "mqtt://localhost:1883"
#: The GIL switch interval of the edge and ingest processes, in seconds (Python's
#: default is 0.005).
SWITCH_INTERVAL = 0.0005


def short_gil_slices() -> None:
    """Let a thread that waits for the GIL have it after 0.5 ms, not Python's 5 ms.

    An edge or a gateway runs three threads: the worker, which computes, and the input
    and output connections' network threads, which wake for every message. With the
    default each wake-up waits for the worker to give up the GIL: at 2,500
    single-reading messages/s one edge fell 0.8 s behind (p50), at 0.5 ms it kept up
    (p50 13 ms); a gateway's p99 at 2,000 messages/s went from 24 to 12 ms, for no
    more CPU. docs/performance.md.
    """
    sys.setswitchinterval(SWITCH_INTERVAL)


def broker_url(value: str) -> BrokerURL:
    try:
        return BrokerURL.parse(value)
    except InvalidBrokerURL as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def rate(value: str) -> float:
    """A rate in readings per second, or ``max``.

    >>> rate("max"), rate("2.5")
    (inf, 2.5)
    """
    if value == "max":
        return math.inf
    try:
        r = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("rate must be a number or 'max'") from None
    if not r > 0:
        raise argparse.ArgumentTypeError("rate must be positive")
    return r


def partitions(value: str) -> tuple[int, ...]:
    """``0-31`` or ``0,5,9-12``: a set of reading partitions.

    >>> partitions("0,5,9-11")
    (0, 5, 9, 10, 11)
    """
    chosen: set[int] = set()
    try:
        for part in value.split(","):
            low, _, high = part.strip().partition("-")
            chosen.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a list like 0-31 or 0,5,9-12") from None
    if not chosen or min(chosen) < 0 or max(chosen) >= PARTITIONS:
        raise argparse.ArgumentTypeError(f"partitions are numbered 0 to {PARTITIONS - 1}")
    return tuple(sorted(chosen))


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def non_negative_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number, 0 or more")
    return x


def percent(value: str) -> float:
    try:
        pct = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 <= pct < 100:
        raise argparse.ArgumentTypeError("a percentage from 0 up to 100")
    return pct


#: The credential files every broker-using command takes, and their environment variables.
_ENV = {
    "password_file": "STREAMPIPE_PASSWORD_FILE",
    "ca_file": "STREAMPIPE_CA_FILE",
    "cert_file": "STREAMPIPE_CERT_FILE",
    "key_file": "STREAMPIPE_KEY_FILE",
}


def add_broker(p: argparse.ArgumentParser, default: str | None = None) -> None:
    env = os.environ.get("STREAMPIPE_BROKER")
    g = p.add_argument_group(
        "broker",
        "Where the broker is and how to log in. A password on the command line (in "
        "--broker) is visible to every user of this machine in process listings: give it "
        "in a file (--password-file) or in $STREAMPIPE_PASSWORD instead.",
    )
    g.add_argument(
        "--broker",
        type=broker_url,
        default=env or default,  # argparse applies ``type`` to a string default
        help="mqtt://[user@]host[:port], or mqtts:// for TLS (default: $STREAMPIPE_BROKER or "
        f"{default or 'a private Mosquitto'})",
    )
    for dest, text in (
        ("password_file", "file whose first line is the password (default: {env})"),
        (
            "ca_file",
            "CA certificates (PEM) that the broker's must chain to (default: {env}, else the "
            "system's)",
        ),
        ("cert_file", "client certificate (PEM), for brokers that require one (default: {env})"),
        ("key_file", "private key (PEM) of --cert-file (default: {env})"),
    ):
        g.add_argument(
            "--" + dest.replace("_", "-"),
            metavar="FILE",
            default=os.environ.get(_ENV[dest]),
            help=text.format(env="$" + _ENV[dest]),
        )
    g.add_argument("--topic-root", default=DEFAULT_ROOT, help="topic root (default: %(default)s)")


def broker_with_credentials(args: argparse.Namespace) -> BrokerURL | None:
    """``--broker`` joined with the password and TLS flags, checked once for every command."""
    files = {k: getattr(args, k) for k in _ENV}
    if args.broker is None:
        given = [f"--{k.replace('_', '-')}" for k, v in files.items() if v]
        if given:
            raise ValueError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --broker")
        return None
    env = os.environ.get("STREAMPIPE_BROKER")
    if args.broker.password is not None and (env is None or broker_url(env) != args.broker):
        log.warning(
            "the password in --broker is visible to other users of this machine (ps); "
            "use --password-file or $STREAMPIPE_PASSWORD"
        )
    tls = {k: v for k, v in files.items() if k != "password_file" and v}
    if tls and not args.broker.tls and all(v == os.environ.get(_ENV[k]) for k, v in tls.items()):
        names = ", ".join(f"${_ENV[k]}" for k in tls)
        raise ValueError(
            f"{names} {'is' if len(tls) == 1 else 'are'} set for TLS, but the broker URL is "
            f"{args.broker}: use mqtts:// for a TLS broker, or unset {names}"
        )
    return with_credentials(args.broker, password=os.environ.get("STREAMPIPE_PASSWORD"), **files)


def add_batching(p: argparse.ArgumentParser, batch: int, linger_ms: float) -> None:
    p.add_argument(
        "--batch",
        type=positive_int,
        default=batch,
        help="readings per message (default: %(default)s)",
    )
    p.add_argument(
        "--linger",
        type=non_negative_float,
        default=linger_ms,
        metavar="MS",
        help="longest a reading waits for its batch to fill, in ms (default: %(default)s)",
    )


def refused_summary(conn: Any) -> str:
    """How many messages the broker refused on ``conn``, and why (one line).

    >>> from collections import Counter
    >>> from types import SimpleNamespace
    >>> refused_summary(SimpleNamespace(refused=Counter({"Not authorized": 31})))
    '31 messages (Not authorized)'
    """
    n = sum(conn.refused.values())
    why = ", ".join(
        f"{reason}" if len(conn.refused) == 1 else f"{reason}: {k}"
        for reason, k in conn.refused.most_common()
    )
    return f"{n:,} message{'s' if n != 1 else ''} ({why})"


def on_signals(stop: Callable[[], None]) -> None:
    """Call ``stop`` on SIGINT (Ctrl-C) and SIGTERM."""

    def handler(signum: int, frame: Any) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def client_id(kind: str) -> str:
    return f"streampipe-{kind}-{uuid.uuid4().hex[:12]}"
