"""The hand-over from an MQTT network thread to the worker that processes messages.

Two rules keep it bounded and free of deadlock:

- **The broker should bound it, but cannot be trusted to.** The edge announces its
  capacity as its MQTT *Receive Maximum*, so a broker sends at most that many
  unacknowledged QoS 1 messages. Mosquitto 2.0.11 (Debian 12's) does not keep to it:
  after each acknowledgement it sends up to a whole Receive Maximum more (measured:
  5 acknowledgements of a client with Receive Maximum 10 brought 50 messages; see
  mosquitto issue #2301), and an edge offered more than it could take moved the
  broker's whole backlog into its own memory. So a full inbox makes the network thread
  wait for room: it stops reading its socket, and TCP holds the rest at the broker.
- **The worker never waits for the thread that feeds it.** An edge whose network thread
  waited for room while its worker waited for the acknowledgements of its own
  publishes, which only that thread read, hung for good. So the edge publishes its
  outputs on a connection of their own, and the producer waits for room only while
  the consumer runs (:meth:`open`, :meth:`close`: not while the edge starts, when it
  waits for its subscriptions to be acknowledged on the same connection), and at most
  ``wait`` seconds (well inside a keepalive: that thread sends the pings). QoS 0
  messages, which no one resends, are refused when it is full.

>>> inbox = Inbox(capacity=2)
>>> inbox.put("a", qos=1, connection=1), inbox.put("b", qos=0, connection=1)
(True, True)
>>> inbox.put("c", qos=0, connection=1)  # full: QoS 0 is refused
False
>>> inbox.put("d", qos=1, connection=2, wait=60)  # not open: no waiting
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
    """A FIFO of ``(connection, message)`` between a producer (the network thread) and
    one consumer (the worker); see the module for when the producer waits."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("an inbox holds at least one message")
        self.capacity = capacity
        self._items: deque[tuple[int, T, float]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._consuming = False

    def put(self, item: T, *, qos: int, connection: int, wait: float = 0.0) -> bool:
        """Queue ``item`` (received on connection number ``connection``). When the inbox
        is full, a QoS 0 item is refused (False); a QoS 1 item waits up to ``wait``
        seconds for room while the inbox is open, and is then queued all the same."""
        with self._cond:
            if len(self._items) >= self.capacity:
                if qos == 0:
                    return False
                self._cond.wait_for(
                    lambda: len(self._items) < self.capacity or not self._consuming, wait
                )
            self._items.append((connection, item, time.monotonic()))
            self._cond.notify_all()
        return True

    def get(self, timeout: float) -> tuple[int, T] | None:
        """The oldest ``(connection, item)``, waiting up to ``timeout`` s; None if none."""
        with self._cond:
            if not self._items and timeout > 0:
                self._cond.wait_for(lambda: self._items, timeout)
            if not self._items:
                return None
            connection, item, _ = self._items.popleft()
            self._cond.notify_all()  # room for a producer that waits
            return connection, item

    def open(self) -> None:
        """The consumer runs: from now on a producer that finds the inbox full waits."""
        with self._cond:
            self._consuming = True

    def close(self) -> None:
        """The consumer stops: from now on the producer never waits."""
        with self._cond:
            self._consuming = False
            self._cond.notify_all()

    def oldest_age(self) -> float:
        """Seconds the oldest queued message has waited (0 when empty)."""
        with self._cond:
            return time.monotonic() - self._items[0][2] if self._items else 0.0

    def qsize(self) -> int:
        return len(self._items)
