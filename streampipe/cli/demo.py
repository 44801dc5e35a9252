"""``streampipe demo``: broker, sensors and an edge stage in one command."""

from __future__ import annotations

import argparse
from typing import Any

from streampipe.cli.options import add_broker, positive_int, rate
from streampipe.learn import DEFAULT_MODEL_SPEC

__all__ = ["register", "run"]


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``streampipe demo`` to the subcommands ``sub``."""
    demo = sub.add_parser("demo", help="run broker, sensors and an edge stage; watch it learn")
    add_broker(demo)
    demo.add_argument("--devices", type=positive_int, default=5)
    demo.add_argument("--rate", type=rate, default=20.0, help="readings/s per device")
    demo.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    demo.add_argument("--model", default=DEFAULT_MODEL_SPEC, metavar="SPEC")
    demo.add_argument("--metrics-port", type=int, default=0)
    demo.set_defaults(run=run)
    return demo


def run(args: argparse.Namespace) -> int:
    from streampipe.demo import run_demo

    return run_demo(args)
