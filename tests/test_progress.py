"""The sign of life long commands give: a refreshing line on a terminal, log lines elsewhere."""

from __future__ import annotations

import io
import logging

from streampipe.cli.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_one_line_is_rewritten_and_ended_on_close():
    term = Terminal()
    shown = Progress(stream=term, text=lambda n, rate: f"{n} done", log_every=0.0)
    shown.update(1, force=True)
    shown.update(2, force=True)
    shown.close()
    assert term.getvalue() == "\r1 done\x1b[K\r2 done\x1b[K\n"


def test_elsewhere_nothing_is_written_and_lines_are_logged_only_if_asked(caplog):
    caplog.set_level(logging.INFO, logger="streampipe")
    pipe = io.StringIO()
    quiet = Progress(total=10, stream=pipe)
    quiet.update(10, force=True)
    logged = Progress(stream=pipe, text=lambda n, rate: f"{n} done", log_every=3600)
    logged.update(5)  # not yet an hour since it started
    logged.update(7, force=True)
    quiet.close()
    logged.close()
    assert pipe.getvalue() == ""
    assert [r.getMessage() for r in caplog.records] == ["7 done"]
