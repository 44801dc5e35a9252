"""Publishing readings: batching per device with a linger bound, QoS 1, bounded memory.

A :class:`ReadingPublisher` collects readings per device and sends a frame when a
device has ``batch_size`` readings or its oldest reading has waited ``linger`` seconds.
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
        """Send every device's readings that have waited ``linger`` seconds or more."""
        self.send_backlog()
        now = self.clock()
        for device in [d for d, t in self._since.items() if now - t >= self.linger]:
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
            self.send(Batch.from_readings(readings))

    def send(self, batch: Batch) -> None:
        """Publish one batch now (QoS 1), waiting if too many await acknowledgement."""
        small = len(batch) < SCHEMA_ID_BELOW
        if small:
            key = (batch.features, batch.target is not None)  # what a schema is made of
            if key not in self._schemas_sent:
                schema_id, schema_frame = codec.schema_frame(batch)
                self.conn.publish(
                    self.topics.schemas(schema_id),
                    schema_frame,
                    qos=1,
                    retain=True,
                    content_type=codec.SCHEMA_CONTENT_TYPE,
                )
                self._schemas_sent.add(key)
        payload = codec.encode(batch, schema_id=small)
        topic = self.topics.readings(batch.device)
        self.stats.readings += len(batch)
        if self.overflow == "drop_oldest" and (self._backlog or not self.conn.connected):
            self._backlog.append((topic, payload, len(batch)))
            while len(self._backlog) > self.max_backlog:
                self.stats.dropped_readings += self._backlog.popleft()[2]
            self.send_backlog()
            return
        self._publish(topic, payload, len(batch))

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

    def _wait_oldest(self, timeout: float | None = None) -> bool:
        info = self._pending[0][0]
        deadline = None if timeout is None else time.monotonic() + timeout
        while not info.is_published():  # type: ignore[attr-defined]
            left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if left <= 0:
                return False
            try:
                info.wait_for_publish(left)  # type: ignore[attr-defined]
            except RuntimeError:  # disconnected: paho resends on reconnect
                self.conn.wait_connected(left)
        self._reap()
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
