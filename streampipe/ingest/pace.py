"""When the gateway commits: at once while it keeps up, in gathered batches near its limit.

A reading sent the moment its message is mapped waits for nothing, but it travels in a
frame of its own, and a frame costs several times what a reading does (encoding the
frame, publishing it, its acknowledgement). Near the gateway's limit that is what makes
it fall behind. So :class:`Pace` measures, over short windows, the share of time the
gateway works rather than waits on its sockets, and:

- while it commits at once, it learns what a message costs then (work / messages); when
  it works more than ``enter`` of the time, it starts letting messages gather for
  ``gather`` seconds before a commit, so each device's readings of that time share one
  frame;
- while gathering, it stops as soon as the messages coming in, at the cost learnt,
  would keep it busy less than ``leave`` of the time.

Gathering longer when even gathered it works all the time (a flood, a backlog) was
tried: 500 ms instead of 100 mapped a backlog no faster within the noise of three
runs, and added its latency at 8,000 messages/s (docs/performance.md#ingest).

Example:
    >>> pace = Pace(gather=0.1, window=1.0)
    >>> pace.update(now=0.0, waited=0.0, messages=0)  # the first call starts the count
    0.0
    >>> pace.update(now=1.0, waited=0.5, messages=2_000)  # worked half the second
    0.0
    >>> pace.update(now=2.0, waited=0.55, messages=4_000)  # worked 95 %: 475 µs/message
    0.1
    >>> pace.update(now=3.0, waited=0.95, messages=6_000)  # 2,000/s x 475 µs > leave
    0.1
    >>> pace.update(now=4.0, waited=1.7, messages=7_000)  # 1,000/s x 475 µs < leave
    0.0
"""

from __future__ import annotations

__all__ = ["Pace"]


class Pace:
    """How long mapped messages gather before a commit: 0 while the gateway keeps up,
    ``gather`` seconds near its limit."""

    def __init__(
        self, gather: float, *, window: float = 0.25, enter: float = 0.85, leave: float = 0.6
    ) -> None:
        if not 0 < leave < enter <= 1:
            raise ValueError("need 0 < leave < enter <= 1")
        self.gather = gather
        self.window = window
        self.enter = enter
        self.leave = leave
        self.busy = False
        #: Seconds of work per message when committing at once (None: not known yet).
        self.cost: float | None = None
        self._start: float | None = None
        self._waited = 0.0
        self._messages = 0

    def update(self, now: float, waited: float, messages: int) -> float:
        """The gather time to use now, given the time (``now``), the seconds spent
        waiting on sockets so far and the messages handled so far (both running totals)."""
        if self._start is None:
            self._start, self._waited, self._messages = now, waited, messages
        elapsed = now - self._start
        if elapsed >= self.window:
            share = max(0.0, elapsed - (waited - self._waited)) / elapsed
            rate = (messages - self._messages) / elapsed
            self._start, self._waited, self._messages = now, waited, messages
            if not self.busy:
                if rate:
                    cost = share / rate
                    self.cost = cost if self.cost is None else (self.cost + cost) / 2
                self.busy = share > self.enter
            elif self.cost is None or rate * self.cost < self.leave:
                self.busy = False
        return self.gather if self.busy else 0.0
