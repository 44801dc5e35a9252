"""The hand-over from an MQTT network thread to the worker that processes messages.

The network thread must never wait for the worker: it is the thread that reads the
acknowledgements the worker waits for (of its predictions, before it acknowledges a
reading), sends keepalives and reconnects. An edge whose network thread blocked on a
full queue while its worker waited for acknowledgements hung for good. So
:meth:`Inbox.put` never blocks, and what bounds the inbox is the broker: it sends at
most *Receive Maximum* unacknowledged QoS 1 messages on a connection, and the edge
announces its capacity as its Receive Maximum (after a reconnect, the copies left
from the earlier connection are still queued, and the worker skips them when the
broker resends them: :meth:`streampipe.transport.Connection.resent`). QoS 0
messages, which no broker limits, are refused beyond the capacity.

>>> inbox = Inbox(capacity=2)
>>> inbox.put("a", qos=1, connection=1), inbox.put("b", qos=0, connection=1)
(True, True)
>>> inbox.put("c", qos=0, connection=1)  # full: QoS 0 is refused
False
>>> inbox.put("d", qos=1, connection=2)  # QoS 1 never is: the broker bounds it
True
>>> [inbox.get(0.0) for _ in range(4)]
[(1, 'a'), (1, 'b'), (2, 'd'), None]
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Generic, TypeVar

__all__ = ["Inbox"]

T = TypeVar("T")


class Inbox(Generic[T]):
    """A FIFO of ``(connection, message)`` that the producer never waits on."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("an inbox holds at least one message")
        self.capacity = capacity
        self._items: deque[tuple[int, T, float]] = deque()
        self._cond = threading.Condition(threading.Lock())

    def put(self, item: T, *, qos: int, connection: int) -> bool:
        """Queue ``item`` (received on connection number ``connection``); False if it
        is QoS 0 and the inbox is full. Never blocks."""
        with self._cond:
            if qos == 0 and len(self._items) >= self.capacity:
                return False
            self._items.append((connection, item, time.monotonic()))
            self._cond.notify()
        return True

    def get(self, timeout: float) -> tuple[int, T] | None:
        """The oldest ``(connection, item)``, waiting up to ``timeout`` s; None if none."""
        with self._cond:
            if not self._items and (timeout <= 0 or not self._cond.wait(timeout)):
                return None
            if not self._items:
                return None
            connection, item, _ = self._items.popleft()
            return connection, item

    def oldest_age(self) -> float:
        """Seconds the oldest queued message has waited (0 when empty)."""
        with self._cond:
            return time.monotonic() - self._items[0][2] if self._items else 0.0

    def qsize(self) -> int:
        return len(self._items)
