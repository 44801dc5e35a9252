"""``streampipe edge``: run an edge stage that learns from readings."""

from __future__ import annotations

import argparse
import gc
import logging
import os
from typing import TYPE_CHECKING, Any

from streampipe.cli.options import (
    DEFAULT_BROKER,
    add_broker,
    non_negative_float,
    on_signals,
    partitions,
    percent,
    positive_int,
    short_gil_slices,
)
from streampipe.learn import DEFAULT_MODEL_SPEC
from streampipe.limits import MAX_CLOCK_AHEAD, MAX_DEVICES, MAX_FEATURES, MAX_SEQ_JUMP
from streampipe.topics import PARTITIONS

if TYPE_CHECKING:
    from streampipe.http import ListenError

__all__ = ["register", "run"]

log = logging.getLogger("streampipe")

DESCRIPTION = (
    "Run an edge stage: subscribe to readings on ROOT/readings/+/+ (only the partitions in "
    "--partitions, if given), predict each reading with its device's own River model, then "
    "learn from it (progressive validation). Publishes predictions on "
    "ROOT/predictions/DEVICE, rolling metrics on ROOT/metrics/STAGE_ID every "
    "--metrics-interval, anomaly, drift and promotion events on ROOT/events/STAGE_ID, "
    "refused readings with their reason on ROOT/deadletter/STAGE_ID and a retained "
    "online/offline on ROOT/status/STAGE_ID; takes commands on ROOT/control/STAGE_ID. "
    "Serves Prometheus /metrics and /healthz on --metrics-host:--metrics-port: a second edge "
    "on the same machine needs another --metrics-port (0 for a free one). Runs until Ctrl-C "
    "or SIGTERM."
)


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``streampipe edge`` to the subcommands ``sub``."""
    edge = sub.add_parser(
        "edge", help="run an edge stage that learns from readings", description=DESCRIPTION
    )
    add_broker(edge, DEFAULT_BROKER)
    edge.add_argument("--stage-id", required=True, help="this stage's id (a topic level)")
    edge.add_argument(
        "--model",
        default=DEFAULT_MODEL_SPEC,
        metavar="SPEC",
        help="River model in River's syntax (default: %(default)s)",
    )
    edge.add_argument(
        "--mode",
        choices=("exact", "minibatch"),
        default="exact",
        help="exact: predict then learn reading by reading, River's progressive validation; "
        "minibatch: predict_many then learn_many per batch, faster but not equal to "
        "per-reading predictions (needs pandas) (default: %(default)s)",
    )
    edge.add_argument(
        "--model-name", metavar="NAME", help="name published with predictions (default: derived)"
    )
    edge.add_argument(
        "--state-dir",
        metavar="DIR",
        help="directory for authenticated checkpoints of models and watermarks; a stage "
        "restarted with the same --state-dir and --stage-id resumes from it (default: none, "
        "every start learns afresh)",
    )
    edge.add_argument(
        "--checkpoint-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="with --state-dir: longest a processed message waits for the checkpoint that "
        "covers it before it is acknowledged to the broker (default: %(default)s)",
    )
    edge.add_argument(
        "--partitions",
        type=partitions,
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
        "while the stage is down; 0 for a clean session on every start (default: %(default)s)",
    )
    edge.add_argument(
        "--window",
        type=positive_int,
        default=1000,
        metavar="N",
        help="rolling metrics cover the last this many scored predictions (default: %(default)s)",
    )
    edge.add_argument(
        "--metrics-port",
        type=int,
        default=9108,
        metavar="PORT",
        help="port of Prometheus /metrics and /healthz; 0 picks a free one, -1 serves none; "
        "each edge on a machine needs its own (default: %(default)s)",
    )
    edge.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="address to serve metrics on (default: %(default)s)",
    )
    edge.add_argument(
        "--metrics-max-connections",
        type=positive_int,
        default=16,
        metavar="N",
        help="HTTP connections served at once; more are closed when accepted "
        "(default: %(default)s)",
    )
    edge.add_argument(
        "--metrics-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds an HTTP connection has for its request and answer (default: %(default)s)",
    )
    edge.add_argument(
        "--metrics-interval",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds between metrics messages (default: %(default)s)",
    )
    edge.add_argument(
        "--queue-size",
        type=positive_int,
        default=1000,
        metavar="N",
        help="messages held for processing; also the Receive Maximum announced to the "
        "broker (default: %(default)s)",
    )
    edge.add_argument(
        "--max-devices",
        type=positive_int,
        default=MAX_DEVICES,
        metavar="N",
        help="devices this stage keeps a model for; readings of further ones are refused "
        "as too_many_devices (default: %(default)s)",
    )
    edge.add_argument(
        "--max-features",
        type=positive_int,
        default=MAX_FEATURES,
        metavar="N",
        help="feature names one device's model may learn; readings bringing more are "
        "refused as too_many_features (default: %(default)s)",
    )
    edge.add_argument(
        "--max-seq-jump",
        type=positive_int,
        default=MAX_SEQ_JUMP,
        metavar="N",
        help="how far past its device's last seq a reading may go; beyond it, it is "
        "refused as seq_jump unless the device's next batch follows on from it "
        "(default: %(default)s)",
    )
    edge.add_argument(
        "--max-clock-ahead",
        type=non_negative_float,
        default=MAX_CLOCK_AHEAD,
        metavar="S",
        help="seconds a reading's timestamp or boot epoch (in ms) may be ahead of this "
        "edge's clock; beyond: future_timestamp, future_epoch (default: %(default)s)",
    )
    edge.add_argument(
        "--stall-after",
        type=float,
        default=60.0,
        metavar="S",
        help="/healthz answers 503 once messages have waited this long while the stage "
        "finished none (default: %(default)s)",
    )
    edge.add_argument(
        "--summary-interval",
        type=non_negative_float,
        default=60.0,
        metavar="S",
        help="seconds between one-line summaries in the log; 0 for none (default: %(default)s)",
    )
    edge.add_argument(
        "--deploy-key",
        metavar="FILE",
        default=os.environ.get("STREAMPIPE_DEPLOY_KEY"),
        help="public key (deploy.pub from `streampipe keys init`): hot-swap to models "
        "deployed on ROOT/models/<--model-name> and signed with its private key; refuse any "
        "other (default: $STREAMPIPE_DEPLOY_KEY, else models are not hot-swapped)",
    )
    _add_evaluation(edge)
    _add_fleet(edge)
    _add_home_automation(edge)
    edge.set_defaults(run=run)
    return edge


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
        "an event for every reading whose score is X or more (default: none, no such events)",
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
        help="alert: publish the event only; reset: also replace the device's model by a "
        "fresh one (default: %(default)s)",
    )
    g.add_argument(
        "--challenger",
        metavar="SPEC",
        help="a second model learning the same readings, evaluated beside the served one "
        "(default: none)",
    )
    g.add_argument(
        "--challenger-name", metavar="NAME", help="its name in metrics (default: derived)"
    )
    g.add_argument(
        "--promote-if-better",
        type=percent,
        metavar="PCT",
        help="promote the challenger once its mean error over the last --promote-after "
        "scored readings is PCT %% below the served model's (default: only when asked, by "
        "`streampipe promote`)",
    )
    g.add_argument(
        "--promote-after",
        type=positive_int,
        default=1000,
        metavar="N",
        help="readings the promotion rule compares over (default: %(default)s)",
    )


def _add_fleet(edge: argparse.ArgumentParser) -> None:
    g = edge.add_argument_group(
        "fleet learning",
        "Share what this stage's device models learned (parameters, never readings) with "
        "an aggregator (`streampipe aggregate`), and start new devices from the fleet model "
        "it publishes. The model must be StandardScaler | LinearRegression or "
        "LogisticRegression (or the linear model alone).",
    )
    g.add_argument(
        "--fleet",
        metavar="NAME",
        help="join fleet NAME: publish updates retained on ROOT/fleet/NAME/updates/STAGE_ID; "
        "take the fleet model from ROOT/fleet/NAME/model, signed with the --deploy-key's "
        "private key, which new devices start from (default: none, no fleet learning)",
    )
    g.add_argument(
        "--fleet-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds between updates at most, and from learning something to the update "
        "that has it at the latest (default: %(default)s)",
    )
    g.add_argument(
        "--fleet-blend",
        type=float,
        default=0.0,
        metavar="ALPHA",
        help="after each new fleet model, make each existing device's weights, intercept and "
        "optimizer state (1-ALPHA)*own + ALPHA*fleet, keeping its own StandardScaler; 0 keeps "
        "them as they are (default: %(default)s)",
    )


def _add_home_automation(edge: argparse.ArgumentParser) -> None:
    g = edge.add_argument_group(
        "Home Assistant and Node-RED",
        "Predictions in the shape that home automation tools read: one retained value "
        "per device, and Home Assistant's MQTT discovery.",
    )
    g.add_argument(
        "--last-value",
        action="store_true",
        help="after each predictions message, retain the device's newest y_pred as plain text "
        "(e.g. 512.3) on ROOT/predictions/DEVICE/last, with the reading's ts and seq as MQTT "
        "v5 user properties (default: off)",
    )
    g.add_argument(
        "--ha-discovery",
        action="store_true",
        help="on each device's first prediction, retain a Home Assistant MQTT discovery config "
        "on PREFIX/sensor/OBJECT_ID/config, so the prediction shows up as a sensor entity; "
        "its state is the --last-value topic, which this turns on (default: off)",
    )
    g.add_argument(
        "--ha-discovery-prefix",
        default="homeassistant",
        metavar="PREFIX",
        help="Home Assistant's discovery prefix (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    from streampipe.edge import EdgeConfig, EdgeService
    from streampipe.http import ListenError

    short_gil_slices()
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
            summary_interval=args.summary_interval,
            mode=args.mode,
            deploy_key=args.deploy_key,
            anomaly_threshold=args.anomaly_threshold,
            drift=None if args.drift == "off" else args.drift,
            on_drift=args.on_drift,
            challenger=args.challenger,
            challenger_name=args.challenger_name,
            promote_if_better=args.promote_if_better,
            promote_after=args.promote_after,
            last_value=args.last_value or args.ha_discovery,
            ha_discovery=args.ha_discovery,
            ha_discovery_prefix=args.ha_discovery_prefix,
            fleet=args.fleet,
            fleet_interval=args.fleet_interval,
            fleet_blend=args.fleet_blend,
        )
    )
    on_signals(service.stop)
    try:
        service.start()
    except ListenError as exc:
        raise OSError(_cannot_listen(exc)) from None
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


def _cannot_listen(exc: ListenError) -> str:
    """The metrics server's :class:`~streampipe.http.ListenError`, with the flags to change."""
    if exc.in_use:
        return (
            f"metrics port {exc.port} on {exc.host} is in use (another edge?): choose another "
            "with --metrics-port, or 0 for a free one, -1 for none"
        )
    return (
        f"cannot serve metrics on {exc.host}:{exc.port}: {exc.strerror}: check --metrics-host "
        "and --metrics-port (-1 for none)"
    )
