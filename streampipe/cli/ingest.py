"""``streampipe ingest``: take the payloads devices already publish, re-publish them as
native readings."""

from __future__ import annotations

import argparse
import gc
import logging
from typing import Any

from streampipe.cli.options import (
    DEFAULT_BROKER,
    add_batching,
    add_broker,
    on_signals,
    positive_int,
    short_gil_slices,
)
from streampipe.ingest import DEFAULT_ID

__all__ = ["register", "run"]

log = logging.getLogger("streampipe")


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``streampipe ingest`` to the subcommands ``sub``."""
    ingest = sub.add_parser(
        "ingest",
        help="map devices' own payloads (Zigbee2MQTT, Tasmota, …) to readings",
        description="Subscribe to the topics devices already publish on (Zigbee2MQTT, "
        "Tasmota, Shelly, ESPHome, The Things Stack, Sparkplug B, or any JSON), map each "
        "message to readings as a mapping file (--map) or the one-source flags (--topic, "
        "--target) say, and publish them to ROOT/readings/pNN/<device> for edges, batched "
        "per device. What cannot be mapped is a dead letter on ROOT/deadletter/ID.",
    )
    add_broker(ingest, DEFAULT_BROKER)
    ingest.add_argument(
        "--id",
        default=DEFAULT_ID,
        metavar="ID",
        help="this gateway's id: its dead letters, status and session; a secured broker's "
        "gateway account may publish those of the default id only (default: %(default)s)",
    )
    how = ingest.add_argument_group("what to map: a file, or one source from flags")
    how.add_argument("--map", metavar="FILE", help="mapping file (TOML), one [[source]] each")
    how.add_argument(
        "--topic",
        metavar="TEMPLATE",
        help="topic template of one source, e.g. 'zigbee2mqtt/{device}': {device} is the device id",
    )
    how.add_argument("--target", metavar="PATH", help="JSONPath of the target, e.g. '$.power'")
    how.add_argument(
        "--features",
        metavar="PATHS",
        help="comma-separated JSONPaths of the features (default: every numeric field "
        "other than the target)",
    )
    how.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="FILTER",
        help="topics to leave alone, e.g. 'zigbee2mqtt/bridge/#' (repeat for more)",
    )
    how.add_argument(
        "--device",
        metavar="TEMPLATE",
        help="device id built from the topic's wildcards, e.g. 'z2m.{device}' (default: {device})",
    )
    ingest.add_argument(
        "--state-dir",
        metavar="DIR",
        help="keep numbering, alias tables and partial readings here across restarts",
    )
    ingest.add_argument(
        "--record",
        metavar="FILE",
        help="write what was published as a CSV that `streampipe replay` takes (written "
        "when the gateway stops; FILE.jsonl meanwhile)",
    )
    ingest.add_argument(
        "--metrics-port",
        type=int,
        default=-1,
        metavar="PORT",
        help="Prometheus /metrics and /healthz port; 0 picks a free one (default: none)",
    )
    ingest.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address to serve metrics on (default: %(default)s)",
    )
    ingest.add_argument(
        "--queue-size",
        type=positive_int,
        default=10_000,
        help="foreign messages held for mapping or for the broker's acknowledgement of "
        "their readings; the Receive Maximum announced to the broker (default: %(default)s)",
    )
    # Only near its limit does the gateway let readings wait (a linger) to share frames;
    # below it they are sent as they come. docs/performance.md#ingest.
    add_batching(ingest, batch=100, linger_ms=100)
    ingest.set_defaults(run=run)
    return ingest


def sources(args: argparse.Namespace) -> list[Any]:
    """The sources the flags or the mapping file describe (one-line errors otherwise)."""
    from streampipe.ingest.mapping import build_source, load_mapping

    one = args.topic or args.target or args.features or args.exclude or args.device
    if args.map and one:
        raise ValueError("give --map FILE, or --topic and --target, not both")
    if args.map:
        return load_mapping(args.map)
    if not (args.topic and args.target):
        raise ValueError("give --map FILE, or --topic TEMPLATE and --target PATH")
    features = [f.strip() for f in args.features.split(",")] if args.features else None
    return [
        build_source(
            topic=args.topic,
            target=args.target,
            exclude=args.exclude,
            features=features,
            device=args.device,
        )
    ]


def run(args: argparse.Namespace) -> int:
    from streampipe.ingest.gateway import Gateway, GatewayConfig

    gateway = Gateway(
        GatewayConfig(
            broker=args.broker,
            gateway_id=args.id,
            sources=sources(args),
            topic_root=args.topic_root,
            batch=args.batch,
            linger=args.linger / 1000,
            state_dir=args.state_dir,
            record=args.record,
            metrics_port=None if args.metrics_port < 0 else args.metrics_port,
            metrics_host=args.metrics_host,
            queue_size=args.queue_size,
        )
    )
    short_gil_slices()
    on_signals(gateway.stop)
    gateway.start()
    # What exists now lives as long as the process: frozen, full collections no longer
    # scan it while messages stream in (as for the edge).
    gc.freeze()
    gateway.run()
    s = gateway.stats
    print(
        f"ingest {args.id}: {s.messages:,} messages, {s.readings:,} readings published, "
        f"{sum(s.rejected.values()):,} dead letters"
        + (f"; recorded to {args.record}" if args.record else "")
    )
    return 0
