"""``streampipe demo``: broker, sensors and an edge stage in one command."""

from __future__ import annotations

import argparse
from typing import Any

from streampipe.cli.options import add_broker, positive_int, rate
from streampipe.learn import DEFAULT_MODEL_SPEC

__all__ = ["register", "run"]

#: `streampipe sensors --format`'s formats (streampipe.sources.formats.FORMATS, which
#: the parser does not import): each has a shipped mapping of the same name.
INGEST_FORMATS = ("z2m", "tasmota", "shelly", "esphome", "sparkplug")

DESCRIPTION = (
    "Watch an edge stage learn online. Starts a private Mosquitto (unless --broker is "
    "given), simulated sensors and an edge stage with a model per sensor, which predicts "
    "each reading's power (W) from its temperature, humidity, pressure, vibration and "
    "current, then learns from it. Prints a prediction a second and the edge's metrics "
    "every few seconds, as any MQTT client can see them, until Ctrl-C or --duration. "
    "With --format, the sensors publish as Zigbee2MQTT, Tasmota, … devices, and "
    "`streampipe ingest` maps their messages to readings."
)


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``streampipe demo`` to the subcommands ``sub``."""
    demo = sub.add_parser(
        "demo",
        help="run broker, sensors and an edge stage; watch it learn",
        description=DESCRIPTION,
    )
    add_broker(demo)
    demo.add_argument(
        "--devices",
        type=positive_int,
        default=5,
        metavar="N",
        help="number of simulated sensors (default: %(default)s)",
    )
    demo.add_argument(
        "--rate",
        type=rate,
        default=20.0,
        help="readings per second per sensor, or 'max' (default: %(default)g)",
    )
    demo.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="stop after this long (default: run until Ctrl-C)",
    )
    demo.add_argument(
        "--model",
        default=DEFAULT_MODEL_SPEC,
        metavar="SPEC",
        help="the River model learned for each sensor (default: %(default)s)",
    )
    demo.add_argument(
        "--format",
        choices=["native", *INGEST_FORMATS],
        default="native",
        metavar="FORMAT",
        help="native, or " + ", ".join(INGEST_FORMATS) + ": the sensors publish as those "
        "devices do, and a `streampipe ingest` gateway with the shipped mapping turns "
        "their messages into readings for the edge (default: %(default)s)",
    )
    demo.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        metavar="PORT",
        help="port of the edge's Prometheus /metrics; 0 picks a free one, -1 serves none "
        "(default: %(default)s)",
    )
    demo.set_defaults(run=run)
    return demo


def run(args: argparse.Namespace) -> int:
    from streampipe.demo import run_demo

    return run_demo(args)
