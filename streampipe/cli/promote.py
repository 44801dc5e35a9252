"""``streampipe promote``: ask an edge stage to serve its challenger."""

from __future__ import annotations

import argparse
from typing import Any

from streampipe.cli.options import DEFAULT_BROKER, add_broker, client_id
from streampipe.topics import Topics, check_name
from streampipe.transport import MQTTError

__all__ = ["register", "run"]


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``streampipe promote`` to the subcommands ``sub``."""
    promote = sub.add_parser(
        "promote",
        help="promote an edge stage's challenger to serve",
        description='Publish {"promote": "challenger"} on ROOT/control/STAGE_ID (QoS 1, not '
        "retained). The stage answers with a promotion event on ROOT/events/STAGE_ID, or a "
        "dead letter if it has no challenger or its challenger has scored fewer readings "
        "than the stage's --promote-after.",
    )
    add_broker(promote, DEFAULT_BROKER)
    promote.add_argument("--stage-id", required=True, help="the stage whose challenger serves")
    promote.add_argument(
        "--force",
        action="store_true",
        help="promote even a challenger that has scored fewer readings than --promote-after",
    )
    promote.set_defaults(run=run)
    return promote


def run(args: argparse.Namespace) -> int:
    import orjson

    from streampipe.transport import Connection

    topic = Topics(args.topic_root).control(check_name(args.stage_id, "stage id"))
    conn = Connection(args.broker, client_id("promote")).connect()
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
