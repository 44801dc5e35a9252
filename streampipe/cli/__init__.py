"""The ``streampipe`` command line, a module per command.

Each command module has ``register(sub)``, which adds its parser (and sets its ``run``),
and ``run(args) -> int``. Options several commands share live in
:mod:`streampipe.cli.options`.

>>> args = build_parser().parse_args(["sensors", "--devices", "3", "--log-level", "DEBUG"])
>>> args.devices, args.log_level
(3, 'DEBUG')
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from streampipe import __version__
from streampipe.broker import MosquittoNotFound
from streampipe.cli import (
    aggregate,
    broker,
    demo,
    deploy,
    edge,
    evaluate,
    export,
    ingest,
    keys,
    promote,
    replay,
    sensors,
    train,
)
from streampipe.cli.options import broker_with_credentials
from streampipe.secure.certs import MissingCryptography
from streampipe.sources.csv import CsvError
from streampipe.state import CheckpointError
from streampipe.topics import InvalidName
from streampipe.transport import InvalidBrokerURL, MQTTError

__all__ = ["build_parser", "main"]

#: In the order ``streampipe --help`` lists them.
COMMANDS = (
    edge,
    ingest,
    replay,
    train,
    evaluate,
    sensors,
    demo,
    promote,
    keys,
    deploy,
    aggregate,
    export,
    broker,
)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

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


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    """``--log-level`` on ``parser`` and every command under it, before or after the
    command's name alike."""
    top = parser.prog == "streampipe"
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO" if top else argparse.SUPPRESS,  # a command's never hides the top's
        help="how much to log (default: INFO)",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _add_log_level(command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streampipe",
        description="MQTT IoT pipeline that learns online at the edge with River.",
    )
    parser.add_argument("--version", action="version", version=f"streampipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    _add_log_level(parser)
    return parser


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
            args.broker = broker_with_credentials(args)
        return int(args.run(args))
    except USER_ERRORS as exc:
        print(f"streampipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
