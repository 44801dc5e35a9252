"""``streampipe aggregate``: combine the fleet's model updates, publish the fleet model."""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path
from typing import Any

from streampipe.cli.options import DEFAULT_BROKER, add_broker, client_id, on_signals
from streampipe.topics import Topics, check_name

__all__ = ["register", "run"]

DESCRIPTION = (
    "Subscribe to ROOT/fleet/NAME/updates/+ (what edges started with --fleet NAME learned: "
    "parameters and reading counts, never readings), combine the latest update of each "
    "edge, weighted by readings and discounted by staleness, and publish the fleet model, "
    "signed with --signing-key, retained on ROOT/fleet/NAME/model, within --min-interval "
    "of an update that changes it. With more than two edges the default rule is a "
    "coordinate-wise trimmed mean, so one bad edge cannot steer the fleet. Refused updates "
    "go to ROOT/deadletter/aggregate-NAME. Serves Prometheus /metrics on "
    "--metrics-host:--metrics-port. Runs until Ctrl-C."
)


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``streampipe aggregate`` to the subcommands ``sub``."""
    from streampipe.fleet import RULES

    p = sub.add_parser(
        "aggregate",
        help="combine the edges' model updates into a signed fleet model (fleet learning)",
        description=DESCRIPTION,
    )
    p.add_argument(
        "--model-name", metavar="NAME", required=True, help="fleet name (the edges' --fleet)"
    )
    p.add_argument(
        "--signing-key",
        metavar="FILE",
        default=os.environ.get("STREAMPIPE_SIGNING_KEY"),
        help="private key (deploy.key from `streampipe keys init`); edges verify the fleet "
        "model with its public key (default: $STREAMPIPE_SIGNING_KEY)",
    )
    p.add_argument(
        "--model",
        metavar="SPEC",
        help="the fleet's model spec; updates of another spec are refused (default: the "
        "spec of the first valid update)",
    )
    p.add_argument(
        "--rule",
        choices=RULES,
        default="auto",
        help="how edges' parameters combine: auto is the weighted mean for one or two edges "
        "and the trimmed mean for more (default: %(default)s)",
    )
    p.add_argument(
        "--trim",
        type=float,
        default=0.2,
        metavar="SHARE",
        help="share of the values cut off each side by the trimmed mean, at least one "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--staleness-exponent",
        type=float,
        default=0.5,
        metavar="A",
        help="an update made S fleet versions ago weighs (1 + S)^-A (default: %(default)s)",
    )
    p.add_argument(
        "--min-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="fewest seconds between two fleet models (default: %(default)s)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="where to keep the highest version published, so that versions go on rising "
        "whatever is retained (default: none, number from the retained fleet model)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=9110,
        metavar="PORT",
        help="port of Prometheus /metrics and /healthz; 0 picks a free one, -1 serves none "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="address to serve metrics on (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to wait for the broker on start (default: %(default)s)",
    )
    add_broker(p, DEFAULT_BROKER)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from prometheus_client import CollectorRegistry

    from streampipe.fleet.service import AggregatorConfig, FleetAggregator
    from streampipe.http import Health, MetricsServer
    from streampipe.models.keys import load_signing_key

    check_name(args.model_name, "--model-name")
    if args.model is not None:
        from streampipe.fleet.aggregator import Aggregator

        Aggregator(args.model)  # a spec that cannot be federated: say so before anything
    if not args.signing_key:
        raise ValueError("--signing-key FILE is needed (make one with `streampipe keys init`)")
    if args.broker is None:
        raise ValueError("--broker is needed: the broker the edges publish their updates to")
    config = AggregatorConfig(
        fleet=args.model_name,
        key=load_signing_key(args.signing_key),
        spec=args.model,
        rule=args.rule,
        trim=args.trim,
        staleness_exponent=args.staleness_exponent,
        min_interval=args.min_interval,
        state_dir=args.state_dir,
        timeout=args.timeout,
    )
    registry = CollectorRegistry()
    stop = threading.Event()
    on_signals(stop.set)
    service = FleetAggregator(
        args.broker,
        Topics(args.topic_root),
        config,
        registry=registry,
        client_id=client_id("aggregate"),
    )
    server = None
    with service:
        if args.metrics_port >= 0:
            server = MetricsServer(
                args.metrics_host,
                args.metrics_port,
                registry,
                lambda: Health(connected=service.conn.connected, running=not stop.is_set()),
            )
            print(f"metrics on http://{args.metrics_host}:{server.port}/metrics")
        try:
            service.run(stop)
        finally:
            if server is not None:
                server.close()
    print(f"aggregate stopped: fleet model {args.model_name} at version {service.version}")
    return 0
