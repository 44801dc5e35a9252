"""A sign of life on long work: a status line on a terminal, a log line now and then
elsewhere.

>>> import io
>>> shown = Progress(total=None, stream=io.StringIO())  # not a terminal, no log_every
>>> shown.update(10, force=True)
>>> shown.stream.getvalue()
''
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Progress"]

log = logging.getLogger("streampipe")

#: Least seconds between two refreshes of the terminal line.
REFRESH = 0.2


class Progress:
    """How far work has come, written to ``stream`` (by default stderr).

    On a terminal, one line rewritten at most every :data:`REFRESH` seconds. Elsewhere (a
    pipe, a file, the journal) nothing, or with ``log_every`` an INFO log line every that
    many seconds, whose rate covers the time since the line before.

    ``text(done, rate)`` says it in words; by default ``N/TOTAL readings  R/s`` with a bar.
    """

    def __init__(
        self,
        total: int | None = None,
        stream: Any = None,
        *,
        text: Callable[[int, float], str] | None = None,
        log_every: float | None = None,
    ) -> None:
        self.total = total
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty()
        self.log_every = None if self.enabled else log_every
        self.text = text or self._readings
        self.start = time.monotonic()
        self._last = 0.0 if self.enabled else self.start  # a log line waits for log_every
        self._last_done = 0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.enabled:
            if force or now - self._last >= REFRESH:
                self._last = now
                rate = done / max(now - self.start, 1e-9)
                self.stream.write("\r" + self.text(done, rate) + "\x1b[K")  # erase the rest
                self.stream.flush()
        elif self.log_every is not None and (force or now - self._last >= self.log_every):
            rate = (done - self._last_done) / max(now - self._last, 1e-9)
            self._last, self._last_done = now, done
            log.info("%s", self.text(done, rate))

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")

    def _readings(self, done: int, rate: float) -> str:
        if self.total:
            bar = "#" * int(min(done / self.total, 1.0) * 30)
            return f"[{bar:<30}] {done:,}/{self.total:,} readings  {rate:,.0f}/s"
        return f"{done:,} readings  {rate:,.0f}/s"
