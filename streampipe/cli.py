"""The ``streampipe`` command line: edge, replay, sensors, demo, promote, broker
init-secure, keys init, deploy, export-model."""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from streampipe import __version__
from streampipe.broker import MosquittoNotFound
from streampipe.learn import DEFAULT_MODEL_SPEC
from streampipe.limits import MAX_CLOCK_AHEAD, MAX_DEVICES, MAX_FEATURES, MAX_SEQ_JUMP
from streampipe.secure.certs import MissingCryptography
from streampipe.sources.csv import CsvError
from streampipe.state import CheckpointError
from streampipe.topics import DEFAULT_ROOT, PARTITIONS, InvalidName, Topics, check_name
from streampipe.transport import BrokerURL, InvalidBrokerURL, MQTTError, with_credentials

__all__ = ["main"]

log = logging.getLogger("streampipe")

DEFAULT_BROKER = "mqtt://localhost:1883"
#: Errors that are the user's to fix: printed as one line, never as a traceback.
USER_ERRORS = (
    CheckpointError,
    InvalidBrokerURL,
    MQTTError,
    CsvError,
    InvalidName,
    MosquittoNotFound,
    MissingCryptography,
    ValueError,  # ModelSpecError, CheckpointError's kin and bad values alike
    OSError,
)


def _broker(value: str) -> BrokerURL:
    try:
        return BrokerURL.parse(value)
    except InvalidBrokerURL as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rate(value: str) -> float:
    if value == "max":
        return math.inf
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("rate must be a number or 'max'") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError("rate must be positive")
    return rate


def _partitions(value: str) -> tuple[int, ...]:
    """``0-31`` or ``0,5,9-12``: a set of reading partitions.

    >>> _partitions("0,5,9-11")
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


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _non_negative_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number, 0 or more")
    return x


def _add_broker(p: argparse.ArgumentParser, default: str | None = None) -> None:
    env = os.environ.get("STREAMPIPE_BROKER")
    g = p.add_argument_group(
        "broker",
        "Where the broker is and how to log in. A password on the command line (in "
        "--broker) is visible to every user of this machine in process listings: give it "
        "in a file (--password-file) or in $STREAMPIPE_PASSWORD instead.",
    )
    g.add_argument(
        "--broker",
        type=_broker,
        default=env or default,  # argparse applies ``type`` to a string default
        help="mqtt://[user@]host[:port], or mqtts:// for TLS (default: $STREAMPIPE_BROKER or "
        f"{default or 'a private Mosquitto'})",
    )
    for flag, env_name, text in (
        ("--password-file", "STREAMPIPE_PASSWORD_FILE", "file whose first line is the password"),
        (
            "--ca-file",
            "STREAMPIPE_CA_FILE",
            "CA certificates (PEM) that the broker's must chain to (default: the system's)",
        ),
        (
            "--cert-file",
            "STREAMPIPE_CERT_FILE",
            "client certificate (PEM), for brokers that require one",
        ),
        ("--key-file", "STREAMPIPE_KEY_FILE", "private key (PEM) of --cert-file"),
    ):
        g.add_argument(
            flag, metavar="FILE", default=os.environ.get(env_name), help=f"{text} (${env_name})"
        )
    g.add_argument("--topic-root", default=DEFAULT_ROOT, help="topic root (default: %(default)s)")


def _broker_with_credentials(args: argparse.Namespace) -> BrokerURL | None:
    """``--broker`` joined with the password and TLS flags, checked once for every command."""
    files = {k: getattr(args, k) for k in ("password_file", "ca_file", "cert_file", "key_file")}
    if args.broker is None:
        given = [f"--{k.replace('_', '-')}" for k, v in files.items() if v]
        if given:
            raise ValueError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --broker")
        return None
    env = os.environ.get("STREAMPIPE_BROKER")
    if args.broker.password is not None and (env is None or _broker(env) != args.broker):
        log.warning(
            "the password in --broker is visible to other users of this machine (ps); "
            "use --password-file or $STREAMPIPE_PASSWORD"
        )
    return with_credentials(args.broker, password=os.environ.get("STREAMPIPE_PASSWORD"), **files)


def _add_batching(p: argparse.ArgumentParser, batch: int, linger_ms: float) -> None:
    p.add_argument(
        "--batch", type=_positive_int, default=batch, help="readings per message (%(default)s)"
    )
    p.add_argument(
        "--linger",
        type=_non_negative_float,
        default=linger_ms,
        metavar="MS",
        help="longest a reading waits for its batch to fill, in ms (%(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streampipe",
        description="MQTT IoT pipeline that learns online at the edge with River.",
    )
    parser.add_argument("--version", action="version", version=f"streampipe {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    edge = sub.add_parser("edge", help="run an edge stage that learns from readings")
    _add_broker(edge, DEFAULT_BROKER)
    edge.add_argument("--stage-id", required=True, help="this stage's id (a topic level)")
    edge.add_argument(
        "--model",
        default=DEFAULT_MODEL_SPEC,
        metavar="SPEC",
        help="River model in River's syntax (default: %(default)r)",
    )
    edge.add_argument(
        "--mode",
        choices=("exact", "minibatch"),
        default="exact",
        help="exact: predict then learn reading by reading, River's progressive validation "
        "(default); minibatch: predict_many then learn_many per batch, faster but not equal "
        "to per-reading predictions (needs pandas)",
    )
    edge.add_argument("--model-name", help="name published with predictions (default: derived)")
    edge.add_argument(
        "--state-dir",
        help="directory for authenticated checkpoints of models and watermarks; a stage "
        "restarted with the same --state-dir and --stage-id resumes from it",
    )
    edge.add_argument(
        "--checkpoint-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="with --state-dir: longest a processed message waits for the checkpoint that "
        "covers it before it is acknowledged to the broker (%(default)s)",
    )
    edge.add_argument(
        "--partitions",
        type=_partitions,
        metavar="LIST",
        help=f"serve only these reading partitions (0-{PARTITIONS - 1}), e.g. 0-31 or 0,5,9-12: "
        "several edges split a fleet, each device staying with one (default: all)",
    )
    edge.add_argument(
        "--session-expiry",
        type=int,
        default=86_400,
        metavar="S",
        help="seconds the broker keeps this stage's session, and the readings queued for it, "
        "while the stage is down; 0 for a clean session on every start (%(default)s)",
    )
    edge.add_argument(
        "--window",
        type=_positive_int,
        default=1000,
        help="rolling metrics cover the last this many scored predictions (%(default)s)",
    )
    edge.add_argument(
        "--metrics-port",
        type=int,
        default=9108,
        help="Prometheus /metrics port; 0 picks a free one, -1 disables (%(default)s)",
    )
    edge.add_argument(
        "--metrics-host", default="127.0.0.1", help="address to serve metrics on (%(default)s)"
    )
    edge.add_argument(
        "--metrics-max-connections",
        type=_positive_int,
        default=16,
        metavar="N",
        help="HTTP connections served at once; more are closed when accepted (%(default)s)",
    )
    edge.add_argument(
        "--metrics-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds an HTTP connection has for its request and answer (%(default)s)",
    )
    edge.add_argument(
        "--metrics-interval",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds between metrics messages (%(default)s)",
    )
    edge.add_argument(
        "--queue-size",
        type=_positive_int,
        default=1000,
        help="messages held for processing; also the Receive Maximum announced to the "
        "broker (%(default)s)",
    )
    edge.add_argument(
        "--max-devices",
        type=_positive_int,
        default=MAX_DEVICES,
        metavar="N",
        help="devices this stage keeps a model for; readings of further ones are refused "
        "as too_many_devices (%(default)s)",
    )
    edge.add_argument(
        "--max-features",
        type=_positive_int,
        default=MAX_FEATURES,
        metavar="N",
        help="feature names one device's model may learn; readings bringing more are "
        "refused as too_many_features (%(default)s)",
    )
    edge.add_argument(
        "--max-seq-jump",
        type=_positive_int,
        default=MAX_SEQ_JUMP,
        metavar="N",
        help="how far past its device's last seq a reading may go; beyond it, it is "
        "refused as seq_jump unless the device's next batch follows on from it "
        "(%(default)s)",
    )
    edge.add_argument(
        "--max-clock-ahead",
        type=_non_negative_float,
        default=MAX_CLOCK_AHEAD,
        metavar="S",
        help="seconds a reading's timestamp or boot epoch (in ms) may be ahead of this "
        "edge's clock; beyond: future_timestamp, future_epoch (%(default)s)",
    )
    edge.add_argument(
        "--stall-after",
        type=float,
        default=60.0,
        metavar="S",
        help="/healthz answers 503 once messages have waited this long while the stage "
        "finished none (%(default)s)",
    )
    edge.add_argument(
        "--deploy-key",
        metavar="FILE",
        default=os.environ.get("STREAMPIPE_DEPLOY_KEY"),
        help="public key (deploy.pub from `streampipe keys init`): hot-swap to models "
        "deployed on ROOT/models/<--model-name> and signed with its private key; refuse any "
        "other ($STREAMPIPE_DEPLOY_KEY)",
    )
    _add_evaluation(edge)

    replay = sub.add_parser("replay", help="replay a CSV file as readings")
    replay.add_argument("file", help="CSV file with a header row")
    _add_broker(replay, DEFAULT_BROKER)
    replay.add_argument("--target", required=True, metavar="COLUMN", help="target column")
    replay.add_argument("--device-id", help="device id (default: the file's stem)")
    replay.add_argument("--device-column", metavar="COL", help="column holding device ids")
    replay.add_argument("--time-column", metavar="COL", help="column holding timestamps")
    replay.add_argument(
        "--rate", type=_rate, default=math.inf, help="readings per second, or 'max' (default)"
    )
    replay.add_argument(
        "--epoch", type=int, help="boot epoch of the replayed devices (default: now, in ms)"
    )
    replay.add_argument(
        "--ack-timeout", type=float, default=120.0, help="seconds to wait for acknowledgements"
    )
    _add_batching(replay, batch=100, linger_ms=100)

    sensors = sub.add_parser("sensors", help="simulate a fleet of sensors")
    _add_broker(sensors, DEFAULT_BROKER)
    sensors.add_argument("--devices", type=_positive_int, default=10, help="number of sensors")
    sensors.add_argument(
        "--rate", type=_rate, default=1.0, help="readings per second per device (%(default)s)"
    )
    sensors.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    sensors.add_argument("--seed", type=int, default=0, help="random seed (%(default)s)")
    sensors.add_argument("--prefix", default="sensor", help="device id prefix (%(default)s)")
    sensors.add_argument(
        "--no-faults",
        dest="faults",
        action="store_false",
        help="no dropouts and spikes (by default 0.5%% of readings miss a value, 0.2%% spike)",
    )
    _add_batching(sensors, batch=10, linger_ms=1000)

    promote = sub.add_parser(
        "promote",
        help="promote an edge stage's challenger to serve",
        description='Publish {"promote": "challenger"} on ROOT/control/STAGE_ID (QoS 1, not '
        "retained). The stage answers with a promotion event on ROOT/events/STAGE_ID, or a "
        "dead letter if it has no challenger or its challenger has scored fewer readings "
        "than the stage's --promote-after.",
    )
    _add_broker(promote, DEFAULT_BROKER)
    promote.add_argument("--stage-id", required=True, help="the stage whose challenger serves")
    promote.add_argument(
        "--force",
        action="store_true",
        help="promote even a challenger that has scored fewer readings than --promote-after",
    )

    demo = sub.add_parser("demo", help="run broker, sensors and an edge stage; watch it learn")
    _add_broker(demo)
    demo.add_argument("--devices", type=_positive_int, default=5)
    demo.add_argument("--rate", type=_rate, default=20.0, help="readings/s per device")
    demo.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    demo.add_argument("--model", default=DEFAULT_MODEL_SPEC, metavar="SPEC")
    demo.add_argument("--metrics-port", type=int, default=0)

    keys = sub.add_parser("keys", help="make the key pair that signs deployed models")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    keys_init = keys_sub.add_parser(
        "init",
        help="make an Ed25519 key pair: DIR/deploy.key (private, 0600), DIR/deploy.pub",
        description="Make an Ed25519 key pair for signing models: DIR/deploy.key, the "
        "private key (mode 0600), for `streampipe deploy --signing-key`, kept on the "
        "operator's machine; DIR/deploy.pub, the public key, for every `streampipe edge "
        "--deploy-key`.",
    )
    keys_init.add_argument("dir", metavar="DIR", help="directory to write the two files in")
    keys_init.add_argument("--force", action="store_true", help="replace an existing pair")

    deploy = sub.add_parser(
        "deploy",
        help="sign a model and publish it for edges to hot-swap to, or roll back",
        description="Sign MODEL_FILE (a pickled River model: from `export-model`, or "
        "pickle.dump) and publish it, retained, on ROOT/models/NAME as the next version; "
        "edges started with --deploy-key and --model-name NAME swap to it between two "
        "messages. The artifact it replaces is kept on ROOT/models/NAME/previous. "
        "MODEL_FILE is unpickled here to check it: deploy only files you made.",
    )
    deploy.add_argument("model_file", nargs="?", metavar="MODEL_FILE", help="pickled model")
    _add_broker(deploy, DEFAULT_BROKER)
    deploy.add_argument("--model", metavar="NAME", help="model name (the edges' --model-name)")
    deploy.add_argument(
        "--rollback",
        metavar="NAME",
        help="instead of MODEL_FILE: publish model NAME's previous version again, as a new "
        "version (a second rollback undoes the first)",
    )
    deploy.add_argument(
        "--signing-key",
        metavar="FILE",
        default=os.environ.get("STREAMPIPE_SIGNING_KEY"),
        help="private key (deploy.key from `streampipe keys init`) ($STREAMPIPE_SIGNING_KEY)",
    )
    deploy.add_argument(
        "--devices",
        default="*",
        metavar="PATTERN",
        help="devices the model is for, an fnmatch pattern over device ids (default: all)",
    )
    deploy.add_argument(
        "--version",
        type=_positive_int,
        metavar="N",
        help="version number (default: one more than the highest retained or recorded in "
        "deploy.versions beside --signing-key; 2 for a first deployment)",
    )
    deploy.add_argument("--spec", metavar="SPEC", help="the model's spec, recorded in its header")
    deploy.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="broker timeout (%(default)s)"
    )

    export = sub.add_parser(
        "export-model",
        help="write a device's learned model out of an edge checkpoint, for `deploy`",
        description="Write the model that stage ID learned for device D, as of its last "
        "checkpoint, to OUT as a pickle that `streampipe deploy` takes. The stage must "
        "not be running (it holds its checkpoint).",
    )
    export.add_argument("out", metavar="OUT", help="file to write the pickled model to")
    export.add_argument("--stage-id", required=True, help="the edge stage's --stage-id")
    export.add_argument("--state-dir", required=True, help="the edge stage's --state-dir")
    export.add_argument("--device", required=True, metavar="D", help="device id")

    broker = sub.add_parser("broker", help="set up a broker")
    broker_sub = broker.add_subparsers(dest="broker_command", required=True, metavar="COMMAND")
    init = broker_sub.add_parser(
        "init-secure",
        help="create a secured Mosquitto set-up: accounts, ACL, development certificates",
        description="Create in DIR a Mosquitto configuration that allows only TLS, "
        "password logins and what the ACL grants each account (operator, edge, gateway, "
        "one per sensor), with a development CA, a server and a client certificate. "
        "Passwords are random and written only to files of mode 0600.",
    )
    init.add_argument("dir", metavar="DIR", help="directory to create the files in")
    init.add_argument(
        "--sensor",
        action="append",
        default=[],
        metavar="NAME",
        help="a sensor account, named as its device id (repeat for more)",
    )
    init.add_argument(
        "--stage",
        action="append",
        default=[],
        metavar="STAGE_ID",
        help="an edge stage's account, named as its --stage-id; it may write only its own "
        "status and claim (repeat for more; default: edge-1 and edge-2)",
    )
    init.add_argument(
        "--sensors",
        type=int,
        default=None,
        metavar="N",
        help="N sensor accounts named as `streampipe sensors` names devices (sensor-000, …); "
        "default 3 when no --sensor is given",
    )
    init.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="host name or address clients use for the broker, put in its certificate "
        "(localhost, 127.0.0.1 and ::1 always are; repeat for more)",
    )
    init.add_argument("--port", type=int, default=8883, help="TLS port (%(default)s)")
    init.add_argument(
        "--bind",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="address the broker listens on (%(default)s; 0.0.0.0 for every interface)",
    )
    init.add_argument("--topic-root", default=DEFAULT_ROOT, help="topic root (%(default)s)")
    init.add_argument(
        "--days", type=_positive_int, default=825, help="certificate validity (%(default)s)"
    )
    init.add_argument("--force", action="store_true", help="replace an existing set-up in DIR")
    return parser


def _percent(value: str) -> float:
    try:
        pct = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 <= pct < 100:
        raise argparse.ArgumentTypeError("a percentage from 0 up to 100")
    return pct


def _add_evaluation(edge: argparse.ArgumentParser) -> None:
    g = edge.add_argument_group(
        "evaluation",
        "What the stage watches beyond its rolling metrics; events go to ROOT/events/STAGE_ID.",
    )
    g.add_argument(
        "--anomaly-threshold",
        type=float,
        metavar="X",
        help="for an anomaly detector without River's QuantileFilter/ThresholdFilter: publish "
        "an event for every reading whose score is X or more",
    )
    g.add_argument(
        "--drift",
        choices=("off", "adwin", "page-hinkley"),
        default="off",
        help="drift detector on each device's prediction errors (default: %(default)s)",
    )
    g.add_argument(
        "--on-drift",
        choices=("alert", "reset"),
        default="alert",
        help="alert: publish the event only (default); reset: also replace the device's "
        "model by a fresh one",
    )
    g.add_argument(
        "--challenger",
        metavar="SPEC",
        help="a second model learning the same readings, evaluated beside the served one",
    )
    g.add_argument(
        "--challenger-name", metavar="NAME", help="its name in metrics (default: derived)"
    )
    g.add_argument(
        "--promote-if-better",
        type=_percent,
        metavar="PCT",
        help="promote the challenger once its mean error over the last --promote-after "
        "scored readings is PCT %% below the served model's",
    )
    g.add_argument(
        "--promote-after",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="readings the promotion rule compares over (%(default)s)",
    )


def _on_signals(stop: Callable[[], None]) -> None:
    def handler(signum: int, frame: Any) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _client_id(kind: str) -> str:
    return f"streampipe-{kind}-{uuid.uuid4().hex[:12]}"


#: The edge process's GIL switch interval, in seconds (Python's default is 0.005).
EDGE_SWITCH_INTERVAL = 0.0005


def cmd_edge(args: argparse.Namespace) -> int:
    from streampipe.edge import EdgeConfig, EdgeService

    # Three threads share the GIL here: the worker, which computes, and the input and
    # output connections' network threads, which wake for every message. With Python's
    # default 5 ms switch interval each wake-up waits for the worker to give up the GIL:
    # at 2,500 single-reading messages/s one edge fell 0.8 s behind (p50), at 0.5 ms it
    # kept up (p50 13 ms; 2.5 ms on a core of its own). docs/performance.md.
    sys.setswitchinterval(EDGE_SWITCH_INTERVAL)
    service = EdgeService(
        EdgeConfig(
            broker=args.broker,
            stage_id=args.stage_id,
            model=args.model,
            model_name=args.model_name,
            topic_root=args.topic_root,
            state_dir=args.state_dir,
            metrics_port=None if args.metrics_port < 0 else args.metrics_port,
            metrics_host=args.metrics_host,
            metrics_max_connections=args.metrics_max_connections,
            metrics_timeout=args.metrics_timeout,
            metrics_interval=args.metrics_interval,
            checkpoint_interval=args.checkpoint_interval,
            session_expiry=args.session_expiry,
            partitions=args.partitions,
            window=args.window,
            queue_size=args.queue_size,
            max_devices=args.max_devices,
            max_features=args.max_features,
            max_seq_jump=args.max_seq_jump,
            max_clock_ahead=args.max_clock_ahead,
            stall_after=args.stall_after,
            mode=args.mode,
            deploy_key=args.deploy_key,
            anomaly_threshold=args.anomaly_threshold,
            drift=None if args.drift == "off" else args.drift,
            on_drift=args.on_drift,
            challenger=args.challenger,
            challenger_name=args.challenger_name,
            promote_if_better=args.promote_if_better,
            promote_after=args.promote_after,
        )
    )
    _on_signals(service.stop)
    service.start()
    # What exists now (River, NumPy, pandas, the models so far) lives as long as the
    # process: frozen, the collector's full collections no longer scan it again and
    # again while readings stream in (one took ~100 ms in a 0.6 s benchmark run).
    gc.freeze()
    if service.metrics_port is not None:
        log.info(
            "Prometheus metrics on http://%s:%d/metrics, health on /healthz",
            args.metrics_host,
            service.metrics_port,
        )
    service.run()
    return 0


class _Progress:
    """A one-line progress display on a terminal; silent otherwise."""

    def __init__(self, total: int | None, stream: Any = sys.stderr) -> None:
        self.total = total
        self.stream = stream
        self.enabled = stream.isatty()
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < 0.2):
            return
        self._last = now
        rate = done / max(now - self.start, 1e-9)
        if self.total:
            frac = min(done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            text = f"[{bar:<30}] {done:,}/{self.total:,} readings  {rate:,.0f}/s"
        else:
            text = f"{done:,} readings  {rate:,.0f}/s"
        self.stream.write("\r" + text)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")


def _pace(start: float, count: int, rate: float) -> None:
    """Sleep until reading number ``count`` is due at ``rate`` readings per second."""
    if math.isfinite(rate):
        delay = start + count / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def cmd_replay(args: argparse.Namespace) -> int:
    from streampipe.publish import ReadingPublisher
    from streampipe.sources.csv import CsvSource
    from streampipe.transport import Connection

    epoch = args.epoch if args.epoch is not None else int(time.time() * 1000)
    kwargs: dict[str, Any] = {
        "target": args.target,
        "device_column": args.device_column,
        "time_column": args.time_column,
        "epoch": epoch,
    }
    if args.device_id:
        kwargs["device_id"] = args.device_id
    source = CsvSource.from_path(args.file, **kwargs)
    with open(args.file, "rb") as f:
        total = max(sum(1 for _ in f) - 1, 0)
    conn = Connection(args.broker, _client_id("replay")).connect()
    stopped = threading.Event()
    _on_signals(stopped.set)
    pub = ReadingPublisher(
        conn, Topics(args.topic_root), batch_size=args.batch, linger=args.linger / 1000
    )
    progress = _Progress(total)
    # Without a rate limit, read and send whole batches; with one, a batch is what the
    # rate produces within the linger bound, so no reading waits longer than that.
    rows = args.batch
    if not math.isinf(args.rate):
        rows = max(1, min(args.batch, int(args.rate * args.linger / 1000)))
    batches = source.batches(rows)
    start = time.monotonic()
    try:
        sent = 0
        while not stopped.is_set():
            _pace(start, sent, args.rate)
            batch = next(batches, None)  # read (and stamped) when it is due
            if batch is None:
                break
            pub.send(batch)
            sent += len(batch)
            progress.update(sent)
        progress.update(pub.stats.readings, force=True)
        acked = pub.wait_acked(args.ack_timeout)
    finally:
        progress.close()
        conn.close()
    elapsed = time.monotonic() - start
    s = pub.stats
    print(
        f"replayed {s.readings:,} readings in {elapsed:.2f} s "
        f"({s.readings / max(elapsed, 1e-9):,.0f} readings/s), {s.bytes:,} bytes in "
        f"{s.messages:,} messages ({s.bytes / max(s.readings, 1):.1f} bytes/reading); "
        + (
            "all acknowledged by the broker"
            if acked
            else f"only {s.acked_readings:,} acknowledged within {args.ack_timeout:g} s"
        )
    )
    if source.unparsable:
        log.warning("%d cells were not numbers and were sent as NaN", source.unparsable)
    if not acked:
        return 1
    return 130 if stopped.is_set() else 0


def run_sensors(
    broker: BrokerURL,
    topics: Topics,
    *,
    devices: int,
    rate: float,
    duration: float | None,
    seed: int,
    batch: int,
    linger: float,
    prefix: str = "sensor",
    faults: bool = True,
    stop: threading.Event | None = None,
) -> int:
    """Publish simulated readings until ``duration`` passes or ``stop`` is set."""
    from streampipe.publish import ReadingPublisher
    from streampipe.sources.simulate import SensorFleet
    from streampipe.transport import Connection

    stop = stop or threading.Event()
    fleet = SensorFleet(
        devices, seed=seed, epoch=int(time.time() * 1000), prefix=prefix, faults=faults
    )
    conn = Connection(broker, _client_id("sensors")).connect()
    # Live readings cannot wait for a broker that is away: keep a bounded backlog and
    # count what overflows it (the edge sees those as sequence gaps).
    pub = ReadingPublisher(conn, topics, batch_size=batch, linger=linger, overflow="drop_oldest")
    # Independent sensors do not tick in step: device i reads at i/devices of each
    # period, so the fleet's readings are spread evenly over time, not sent in bursts.
    # While readings wait for their linger bound anyway, the loop sleeps until then and
    # makes the readings that fell due meanwhile, each stamped with the time it was
    # due: one wake-up per flush instead of one per reading, and no reading held
    # longer than the bound.
    step = 1.0 / (rate * devices) if math.isfinite(rate) else 0.0
    start = time.monotonic()
    wall = time.time() - start  # monotonic -> Unix time
    made = 0
    try:
        while not stop.is_set():
            now = time.monotonic()
            if duration is not None and now - start >= duration:
                break
            # Every reading due by now (at rate "max", one round of the fleet per pass).
            for _ in range(devices if step == 0 else max(0, int((now - start) / step) + 1 - made)):
                due = start + made * step
                if due > now:
                    break
                pub.add(fleet.read(made % devices, wall + due))
                made += 1
            pub.flush_due()
            wake = pub.next_due()
            if wake is None:
                wake = start + made * step
            stop.wait(max(0.0, wake - time.monotonic()))
        pub.wait_acked(30)
    finally:
        conn.close()
    if pub.stats.dropped_readings:
        log.warning(
            "%d readings dropped: the broker was unreachable and the backlog was full",
            pub.stats.dropped_readings,
        )
    return pub.stats.readings - pub.stats.dropped_readings


def cmd_sensors(args: argparse.Namespace) -> int:
    stop = threading.Event()
    _on_signals(stop.set)
    n = run_sensors(
        args.broker,
        Topics(args.topic_root),
        devices=args.devices,
        rate=args.rate,
        duration=args.duration,
        seed=args.seed,
        batch=args.batch,
        linger=args.linger / 1000,
        prefix=args.prefix,
        faults=args.faults,
        stop=stop,
    )
    print(f"published {n:,} readings from {args.devices} simulated sensors")  # dropped: logged
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    import orjson

    from streampipe.transport import Connection

    topic = Topics(args.topic_root).control(check_name(args.stage_id, "stage id"))
    conn = Connection(args.broker, _client_id("promote")).connect()
    try:
        command = orjson.dumps({"promote": "challenger", **({"force": True} if args.force else {})})
        info = conn.publish(topic, command, qos=1, content_type="application/json")
        info.wait_for_publish(30)
    finally:
        conn.close()
    if not info.is_published():
        raise MQTTError(f"the broker did not acknowledge the command on {topic}")
    print(f"asked stage {args.stage_id} to promote its challenger ({topic})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streampipe.demo import run_demo

    return run_demo(args)


def cmd_broker(args: argparse.Namespace) -> int:
    from streampipe.secure import init_secure, sensor_names
    from streampipe.secure.mosquitto import DEFAULT_STAGES

    sensors = list(args.sensor)
    if args.sensors is not None:
        if args.sensors < 0:
            raise ValueError("--sensors must not be negative")
        sensors += sensor_names(args.sensors)
    elif not sensors:
        sensors = sensor_names(3)
    setup = init_secure(
        args.dir,
        sensors=sensors,
        stages=args.stage or DEFAULT_STAGES,
        hosts=args.host,
        port=args.port,
        bind=args.bind,
        topic_root=args.topic_root,
        days=args.days,
        force=args.force,
    )
    d = setup.dir
    q = shlex.quote
    host = next(h for h in setup.hosts if ":" not in h)
    url = f"mqtts://{{user}}@{host}:{setup.port}"
    accounts = ", ".join(setup.roles)
    stage = next(u for u, role in setup.roles.items() if role == "edge")
    print(
        f"Secured Mosquitto set up in {d}: TLS on {args.bind}:{setup.port} for "
        f"{', '.join(setup.hosts)}.\n"
        f"Accounts: {accounts}. Their passwords are in {d / 'credentials'} and "
        f"{d / 'passwords'}/USER (mode 0600), and nowhere else.\n\n"
        "Next:\n"
        f"  mosquitto -c {q(str(d / 'mosquitto.conf'))}\n"
        f"  export STREAMPIPE_CA_FILE={q(str(d / 'ca.crt'))} "
        f"STREAMPIPE_CERT_FILE={q(str(d / 'client.crt'))} "
        f"STREAMPIPE_KEY_FILE={q(str(d / 'client.key'))}\n"
        f"  streampipe edge --broker {url.format(user=stage)} "
        f"--password-file {q(str(setup.password_file(stage)))} --stage-id {stage}\n"
        f"  streampipe sensors --broker {url.format(user='gateway')} "
        f"--password-file {q(str(setup.password_file('gateway')))}"
    )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from streampipe.models.keys import init_keys

    pair = init_keys(args.dir, force=args.force)
    q = shlex.quote
    print(
        f"Ed25519 key pair {pair.key_id} made:\n"
        f"  {pair.private}  private (mode 0600): signs models; keep it on this machine\n"
        f"  {pair.public}  public: give it to every edge\n\n"
        "Next:\n"
        f"  streampipe edge --deploy-key {q(str(pair.public))} --model-name NAME ...\n"
        f"  streampipe deploy MODEL_FILE --model NAME --signing-key {q(str(pair.private))} ..."
    )
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from streampipe.models.deploy import ModelPublisher, VersionLedger, read_model_file
    from streampipe.models.keys import load_signing_key

    if (args.model_file is None) == (args.rollback is None):
        raise ValueError("give MODEL_FILE (with --model NAME) or --rollback NAME")
    if args.model_file is not None and not args.model:
        raise ValueError("--model NAME is needed: the name edges run the model under")
    if args.rollback is not None and (args.model or args.version or args.spec):
        raise ValueError("--rollback takes no --model, --version or --spec")
    if args.rollback is not None and args.devices != "*":
        raise ValueError("--rollback keeps the previous version's --devices")
    if not args.signing_key:
        raise ValueError("--signing-key FILE is needed (make one with `streampipe keys init`)")
    name = args.rollback or args.model
    check_name(name, "model name")
    key = load_signing_key(args.signing_key)
    model = read_model_file(args.model_file) if args.model_file is not None else None
    topics = Topics(args.topic_root)
    with ModelPublisher(
        args.broker, topics, timeout=args.timeout, client_id=_client_id("deploy")
    ) as pub:
        # The versions this deployer published: what is retained can be an old one.
        ledger = VersionLedger.beside(args.signing_key)
        if model is None:
            done = pub.rollback(name, key, ledger=ledger)
        else:
            data, kind = model
            done = pub.deploy(
                data,
                kind,
                name=name,
                key=key,
                version=args.version,
                devices=args.devices,
                spec=args.spec,
                ledger=ledger,
            )
    h = done.header
    what = "rolled back" if model is None else "deployed"
    print(f"{what}: {h.describe()}, {done.size:,} bytes retained on {topics.models(name)}")
    if done.replaced is not None:
        print(
            f"version {done.replaced.version} kept on {topics.previous_model(name)} "
            f"(`streampipe deploy --rollback {name}` goes back to it)"
        )
    return 0


def cmd_export_model(args: argparse.Namespace) -> int:
    from streampipe.models.export import export_model

    done = export_model(args.state_dir, args.stage_id, args.device, args.out)
    print(
        f"exported device {done.device}'s model from stage {args.stage_id} to {done.path} "
        f"({done.size:,} bytes): {done.spec or 'model'} version {done.version}, "
        f"{done.learned:,} readings learned, up to seq {done.seq} of epoch {done.epoch}"
    )
    return 0


COMMANDS = {
    "edge": cmd_edge,
    "replay": cmd_replay,
    "sensors": cmd_sensors,
    "demo": cmd_demo,
    "promote": cmd_promote,
    "broker": cmd_broker,
    "keys": cmd_keys,
    "deploy": cmd_deploy,
    "export-model": cmd_export_model,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if hasattr(args, "broker") and args.command != "broker":
            args.broker = _broker_with_credentials(args)
        return COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        print(f"streampipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
