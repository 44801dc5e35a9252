"""Every command says in --help what it does and what each option defaults to."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

import pytest

from streampipe.cli import build_parser


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command and subcommand under ``parser``, by its name (``keys init``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                yield " ".join((*path, name)), command
                yield from commands(command, (*path, name))


COMMANDS = dict(commands(build_parser()))
#: Flags whose absence is their default: nothing to show.
FLAGS = (argparse._StoreConstAction, argparse._HelpAction, argparse._VersionAction)


def test_every_command_is_walked():
    assert {"edge", "replay", "sensors", "demo", "keys init", "broker init-secure"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_a_description_and_shows_its_defaults(name, monkeypatch):
    for env in [e for e in os.environ if e.startswith("STREAMPIPE_")]:
        monkeypatch.delenv(env)  # the defaults a fresh shell gets
    command = dict(commands(build_parser()))[name]
    assert command.description, f"streampipe {name} --help says nothing of what it does"
    hidden = [
        "/".join(action.option_strings) or action.dest
        for action in command._actions
        if not isinstance(action, (*FLAGS, argparse._SubParsersAction))
        and action.default not in (None, argparse.SUPPRESS, False, [])  # []: repeatable, none
        and "default" not in (action.help or "")
    ]
    assert hidden == [], f"streampipe {name}: --help does not show these options' defaults"


def test_the_command_line_starts_without_importing_river():
    """`streampipe --help`, `ingest`, `sensors` do not need River: importing it at parser
    time cost every command over a second of start-up (1.9 s for --help)."""
    import subprocess
    import sys

    code = "import sys; from streampipe.cli import build_parser; build_parser(); "
    code += "print(sorted(m for m in ('river', 'scipy', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
