"""Publishing readings: batching per device with a linger bound, QoS 1, bounded memory.

A :class:`ReadingPublisher` collects readings per device and sends a frame when a
device has ``batch_size`` readings or its oldest reading has waited ``linger`` seconds
(taking along, in the same ``send``, the devices whose readings waited half of it).
At most ``max_pending`` messages wait for the broker's acknowledgement; beyond that
:meth:`~ReadingPublisher.add` blocks until the broker catches up, so a slow or absent
broker costs time, never unbounded memory. paho resends what was not acknowledged
once it has reconnected.

A live source cannot wait: with ``overflow="drop_oldest"``, frames made while the
broker is unreachable are kept in a backlog of at most ``max_backlog`` frames, sent
in order on reconnection; beyond it the oldest are dropped and counted in
``stats.dropped_readings`` (the edge sees them as a sequence gap of the same size).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from streampipe import codec
from streampipe.readings import Batch, Reading
from streampipe.topics import Topics
from streampipe.transport import Connection

__all__ = ["PublisherStats", "ReadingPublisher"]

#: Frames of fewer readings than this refer to their field names by schema id.
SCHEMA_ID_BELOW = 32


@dataclass(slots=True)
class PublisherStats:
    readings: int = 0
    messages: int = 0
    bytes: int = 0
    acked_readings: int = 0
    acked_messages: int = 0  # in publishing order: every message before the count is acked
    dropped_readings: int = 0  # overflowed the backlog while the broker was unreachable


class ReadingPublisher:
    """Batches readings per device and publishes them as codec frames."""

    def __init__(
        self,
        conn: Connection,
        topics: Topics,
        *,
        batch_size: int = 100,
        linger: float = 0.05,
        max_pending: int = 1000,
        overflow: str = "block",
        max_backlog: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        if overflow not in ("block", "drop_oldest"):
            raise ValueError("overflow must be 'block' or 'drop_oldest'")
        self.overflow = overflow
        self.max_backlog = max_backlog
        self._backlog: deque[tuple[str, bytes, int]] = deque()
        self.conn = conn
        self.topics = topics
        self.batch_size = batch_size
        self.linger = linger
        self.max_pending = max_pending
        self.clock = clock
        self.stats = PublisherStats()
        self._buffers: dict[str, list[Reading]] = {}
        self._since: dict[str, float] = {}
        self._pending: deque[tuple[object, int]] = deque()
        self._schemas_sent: set[tuple[tuple[str, ...], bool]] = set()

    def add(self, reading: Reading) -> None:
        buf = self._buffers.get(reading.device)
        if buf is None:
            buf = self._buffers[reading.device] = []
            self._since[reading.device] = self.clock()
        elif buf[-1].epoch != reading.epoch:
            self._flush_device(reading.device)
            return self.add(reading)
        buf.append(reading)
        if len(buf) >= self.batch_size:
            self._flush_device(reading.device)

    def flush_due(self) -> None:
        """Send the readings that have waited ``linger`` seconds, and with them every
        device's that has waited half of it.

        Taking the half-due along (as Kafka's producer drains every partition of a
        broker that has one batch ready) makes one wake-up of the sender serve many
        devices at a modest cost in batch size: every frame still waited at least half
        the linger bound, and none waits longer than it.

        Example:
            >>> from types import SimpleNamespace
            >>> from streampipe.readings import Reading
            >>> now, sent = [0.0], []
            >>> conn = SimpleNamespace()  # stands in for a Connection
            >>> pub = ReadingPublisher(conn, Topics("t"), linger=1.0, clock=lambda: now[0])
            >>> pub.send = lambda frame: sent.append(frame.device)
            >>> for t, device in [(0.0, "a"), (0.4, "b"), (0.6, "c")]:
            ...     now[0] = t
            ...     pub.add(Reading(device, 1, t, {"x": 1.0}))
            >>> now[0] = 0.99; pub.flush_due(); sent
            []
            >>> now[0] = 1.0; pub.flush_due(); sent  # "a" is due, "b" half-due
            ['a', 'b']
            >>> pub.next_due()  # "c", which waited 0.4
            1.6
        """
        self.send_backlog()
        due = self.next_due()
        now = self.clock()
        if due is None or due > now:
            return
        cutoff = now - self.linger / 2
        for device in [d for d, t in self._since.items() if t <= cutoff]:
            self._flush_device(device)

    def flush(self) -> None:
        for device in list(self._buffers):
            self._flush_device(device)

    def next_due(self) -> float | None:
        """When (on ``clock``) the oldest buffered reading reaches its linger bound."""
        return min(self._since.values()) + self.linger if self._since else None

    def _flush_device(self, device: str) -> None:
        readings = self._buffers.pop(device, None)
        self._since.pop(device, None)
        if readings:
            self.send(readings[0] if len(readings) == 1 else Batch.from_readings(readings))

    def send(self, batch: Batch | Reading) -> None:
        """Publish one batch, or one reading, now (QoS 1), waiting if too many await
        acknowledgement."""
        if isinstance(batch, Reading):
            n, key, encode = 1, (tuple(batch.x), batch.y is not None), codec.encode_reading
        else:
            n, key, encode = len(batch), (batch.features, batch.target is not None), codec.encode
        small = n < SCHEMA_ID_BELOW
        if small and key not in self._schemas_sent:  # a schema: features, has a target
            schema = codec.Schema(*key)
            self.conn.publish(
                self.topics.schemas(schema.id),
                schema.frame(),
                qos=1,
                retain=True,
                content_type=codec.SCHEMA_CONTENT_TYPE,
            )
            self._schemas_sent.add(key)
        payload = encode(batch, schema_id=small)  # type: ignore[arg-type]
        topic = self.topics.readings(batch.device)
        self.stats.readings += n
        if self.overflow == "drop_oldest" and (self._backlog or not self.conn.connected):
            self._backlog.append((topic, payload, n))
            while len(self._backlog) > self.max_backlog:
                self.stats.dropped_readings += self._backlog.popleft()[2]
            self.send_backlog()
            return
        self._publish(topic, payload, n)

    def send_backlog(self) -> None:
        """Send what waited for the broker, oldest first, if it is reachable now."""
        while self._backlog and self.conn.connected and len(self._pending) < self.max_pending:
            self._publish(*self._backlog.popleft())

    def _publish(self, topic: str, payload: bytes, n: int) -> None:
        while len(self._pending) >= self.max_pending:
            self._wait_oldest()
        info = self.conn.publish(topic, payload, qos=1, content_type=codec.CONTENT_TYPE)
        self._pending.append((info, n))
        self.stats.messages += 1
        self.stats.bytes += len(payload)
        self._reap()

    def _reap(self) -> None:
        while self._pending and self._pending[0][0].is_published():  # type: ignore[attr-defined]
            _, n = self._pending.popleft()
            self.stats.acked_readings += n
            self.stats.acked_messages += 1

    def _wait_oldest(self, timeout: float | None = None) -> bool:
        info = self._pending[0][0]
        deadline = None if timeout is None else time.monotonic() + timeout
        while not info.is_published():  # type: ignore[attr-defined]
            left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if left <= 0:
                return False
            self.conn.wait_published(info, left)  # type: ignore[arg-type]
        self._reap()
        return True

    def acked(self, messages: int, timeout: float = 0.0) -> bool:
        """Whether the broker has acknowledged the first ``messages`` messages sent (in
        order), waiting up to ``timeout`` seconds for it."""
        self._reap()
        deadline = time.monotonic() + timeout
        while self.stats.acked_messages < messages:
            left = deadline - time.monotonic()
            if left <= 0 or not self._pending or not self._wait_oldest(left):
                return self.stats.acked_messages >= messages
        return True

    def wait_acked(self, timeout: float) -> bool:
        """Flush, then wait until the broker acknowledged every reading sent."""
        self.flush()
        deadline = time.monotonic() + timeout
        while self._backlog and time.monotonic() < deadline:
            if self.conn.wait_connected(max(0.0, deadline - time.monotonic())):
                self.send_backlog()
        while self._pending:
            if not self._wait_oldest(max(0.0, deadline - time.monotonic())):
                return False
        return True
