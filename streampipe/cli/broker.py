"""``streampipe broker init-secure``: a secured Mosquitto set-up."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from streampipe.cli.options import positive_int
from streampipe.secure.mosquitto import DEFAULT_INGEST_TOPICS
from streampipe.topics import DEFAULT_ROOT

__all__ = ["register", "run"]


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``streampipe broker init-secure`` to the subcommands ``sub``."""
    broker = sub.add_parser(
        "broker",
        help="set up a broker",
        description="Set up a Mosquitto broker for streampipe. `streampipe broker "
        "init-secure DIR` writes a TLS-only, password- and ACL-protected configuration; "
        "nothing is started or published.",
    )
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
        "--ingest-topic",
        action="append",
        default=[],
        metavar="FILTER",
        help="a topic filter devices publish on that the gateway account may read for "
        "`streampipe ingest`, e.g. 'zigbee2mqtt/#' (repeat for more; default: those of "
        "the shipped mappings: " + ", ".join(DEFAULT_INGEST_TOPICS) + ")",
    )
    init.add_argument(
        "--sensors",
        type=int,
        default=None,
        metavar="N",
        help="N sensor accounts named as `streampipe sensors` names devices (sensor-000, …) "
        "(default: 3 when no --sensor is given, else none)",
    )
    init.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="host name or address clients use for the broker, put in its certificate "
        "(localhost, 127.0.0.1 and ::1 always are; repeat for more)",
    )
    init.add_argument("--port", type=int, default=8883, help="TLS port (default: %(default)s)")
    init.add_argument(
        "--bind",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="address the broker listens on; 0.0.0.0 for every interface (default: %(default)s)",
    )
    init.add_argument(
        "--topic-root", default=DEFAULT_ROOT, help="topic root (default: %(default)s)"
    )
    init.add_argument(
        "--days",
        type=positive_int,
        default=825,
        help="days the certificates are valid (default: %(default)s)",
    )
    init.add_argument("--force", action="store_true", help="replace an existing set-up in DIR")
    broker.set_defaults(run=run)
    return broker


def run(args: argparse.Namespace) -> int:
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
        ingest_topics=args.ingest_topic or DEFAULT_INGEST_TOPICS,
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
