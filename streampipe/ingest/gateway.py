"""The ingest gateway: foreign payloads in, native readings out, nothing lost or doubled.

The gateway subscribes to the topics of its :class:`~streampipe.ingest.base.Source`\\ s,
maps each message to readings (the first source that claims the topic maps it), numbers
each device's readings, and publishes them in streampipe's codec to
``ROOT/readings/pNN/<device>``, batched per device as ``streampipe sensors`` does. So
every guarantee of the edge — exact predict-then-learn, ``(epoch, seq)`` watermarks, gap
counting, checkpoints, dead letters — holds for devices that never heard of streampipe.

**Numbering.** A device's readings get consecutive ``seq``\\ s in the gateway's epoch
(the time, in ms, it first started with its ``--state-dir``). A source with a counter
of its own (:attr:`Mapped.counter`) numbers them by it instead: a skipped counter
leaves the same gap in ``seq`` (the edge counts it), a counter that goes back starts
the device's next epoch (a reboot), and a repeated one is a ``duplicate``.

**One thread.** The gateway's two connections (devices in, readings out) are driven by
the thread that runs it (:mod:`streampipe.transport.driven`): a message is read,
mapped, encoded and its frame written with no hand-off between threads.

**Acknowledgement.** Foreign messages are received with manual acknowledgement. The
gateway commits after handling what came in at once; near its limit (:mod:`.pace`) it
lets messages gather ``linger`` seconds first, so that each device's readings share a
frame; and in any case when half its queue waits for acknowledgement. A commit sends
what is buffered and marks the foreign messages mapped since the last commit. Once the
broker has acknowledged every frame sent up to that mark, the gateway writes the state
they left to ``--state-dir`` (numbering, the digest of the last payload per topic, the
sources' alias tables and partial readings), and only then acknowledges those foreign
messages; it maps on meanwhile. A gateway killed before that gets them again from the
broker: before the checkpoint they map to the same ``(epoch, seq)`` (the edge refuses
what it already has, as ``duplicate``), after it the digests say they were done
(``redelivered``, not dead-lettered). Nothing is lost, and nothing learned twice.
Without ``--state-dir`` a restarted gateway starts a new epoch, and the edge learns what
the broker redelivers as new readings: as for an edge, the state dir is what makes a
restart exact.

**Retained payloads.** Zigbee2MQTT and others publish state retained, so every
(re)subscription replays it. A retained payload equal to the last one seen on its topic
is skipped and counted (``retained_replay``), not learned twice.

Messages that cannot be mapped are dead letters on ``ROOT/deadletter/<gateway_id>``, with
a reason, and counted in ``streampipe_rejected_total{reason}``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from streampipe.deadletter import dead_letter_body
from streampipe.ingest.base import Incoming, Mapped, Source, Unmappable
from streampipe.ingest.pace import Pace
from streampipe.ingest.record import Recorder
from streampipe.metrics import counts_by
from streampipe.publish import ReadingPublisher
from streampipe.readings import Reading
from streampipe.topics import DEFAULT_ROOT, InvalidName, Topics, check_name
from streampipe.transport import BrokerURL, Connection, Message, Will
from streampipe.transport.driven import Driver

__all__ = ["Gateway", "GatewayConfig", "Numbering"]

log = logging.getLogger("streampipe.ingest")

#: Topics whose last payload digest the gateway remembers (least recently seen go first).
MAX_TOPICS = 100_000
#: Commits whose readings may wait for the broker's acknowledgement before the gateway
#: waits for the oldest.
MAX_TICKETS = 50


_NUMBER = (float, int)


@dataclass
class GatewayConfig:
    """What ``streampipe ingest`` runs with."""

    broker: BrokerURL
    gateway_id: str
    sources: list[Source]
    topic_root: str = DEFAULT_ROOT
    batch: int = 100
    linger: float = 0.1
    state_dir: str | None = None
    record: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    queue_size: int = 10_000
    session_expiry: int = 86_400
    max_devices: int = 100_000
    client_id: str | None = None
    clock: Callable[[], float] = time.time


class Numbering:
    """Each device's ``(epoch, seq)``, from the gateway's count or the source's counter.

    A device first seen gets the gateway's ``epoch`` (its first start with this state
    dir, in ms), and a device that restarts (its counter went back, or its source says
    so) the next epoch after its last: so the same messages, redelivered to a gateway
    restarted from an older checkpoint, get the same numbers, and the edge knows them.

    >>> n = Numbering(epoch=1000)
    >>> [n.number(Mapped("d", {})) for _ in range(2)]
    [(1000, 0), (1000, 1)]
    >>> [n.number(Mapped("t", {}, counter=c, counter_modulo=2**32)) for c in (5, 6, 9)]
    [(1000, 0), (1000, 1), (1000, 4)]
    >>> n.number(Mapped("t", {}, counter=9))  # the same counter again: a duplicate
    >>> n.number(Mapped("t", {}, counter=2))  # went back: a reboot, a new epoch
    (1001, 0)
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        #: device -> [epoch, last seq, last counter or None]
        self.devices: dict[str, list[Any]] = {}
        self.changed: set[str] = set()

    def number(self, m: Mapped) -> tuple[int, int] | None:
        """The reading's ``(epoch, seq)``, or ``None`` for a duplicate."""
        state = self.devices.get(m.device)
        self.changed.add(m.device)
        if state is None or m.new_epoch:
            epoch = self.epoch if state is None else state[0] + 1
            self.devices[m.device] = [epoch, 0, m.counter]
            return epoch, 0
        epoch, seq, last = state
        if m.counter is None or last is None:
            state[1], state[2] = seq + 1, m.counter
            return epoch, seq + 1
        step = m.counter - last
        if m.counter_modulo and step < 0 and -step > m.counter_modulo // 2:
            step += m.counter_modulo  # wrapped around, not reset
        if step == 0:
            return None
        if step < 0:  # the counter went back: the device restarted
            self.devices[m.device] = [epoch + 1, 0, m.counter]
            return epoch + 1, 0
        state[1], state[2] = seq + step, m.counter
        return epoch, seq + step


def _excludes(source: Source, topic: str) -> bool:
    """Whether ``source`` leaves ``topic`` alone on purpose (its ``exclude``)."""
    template = getattr(source, "template", None)
    return template is not None and template.excluded(topic)


@dataclass(slots=True)
class _Ticket:
    """Foreign messages mapped between two commits, and what settles them."""

    messages: list[tuple[int, Message]]
    published: int  # the publisher's message count once their readings were sent
    snapshot: tuple[dict[str, Any], dict[str, Any]] | None  # checkpoint meta and rows


@dataclass
class GatewayStats:
    messages: int = 0
    readings: int = 0
    acknowledged: int = 0
    retained_replays: int = 0
    redelivered: int = 0
    commits: int = 0
    #: Messages lost that a source saw by its own sequence numbers (Sparkplug's per-node
    #: seq, which is not a device's counter, so the edge cannot see the gap).
    source_gaps: int = 0
    #: Messages on a topic a source's ``exclude`` leaves alone (a bridge's own state, a
    #: statestream's ``last_changed``): subscribed to by a wider filter, not readings.
    excluded: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    by_source: Counter[str] = field(default_factory=Counter)


class _Collector(Collector):
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def collect(self) -> Iterator[Any]:
        s = self.gw.stats

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"streampipe_ingest_{name}", doc, value=value)

        yield counts_by(
            "ingest_messages",
            "Foreign messages received, by the source that claimed them",
            "source",
            dict(s.by_source),
        )
        yield counter("readings", "Readings published in the native codec", s.readings)
        yield counter(
            "retained_replays",
            "Retained payloads equal to the last one on their topic, skipped",
            s.retained_replays,
        )
        yield counter(
            "redelivered",
            "Messages the broker delivered again that the gateway had already published",
            s.redelivered,
        )
        yield counter("commits", "Commits: published, acknowledged, checkpointed", s.commits)
        yield counter("excluded", "Messages on topics a source's exclude leaves alone", s.excluded)
        yield counter(
            "source_sequence_gaps",
            "Messages lost by a source's own sequence numbers (Sparkplug seq gaps)",
            s.source_gaps,
        )
        yield counts_by(
            "rejected",
            "Foreign messages dead-lettered, by reason",
            "reason",
            dict(s.rejected),
        )
        yield counts_by(
            "broker_refused_messages",
            "Messages the broker refused (PUBACK reason 0x80 and up, e.g. not authorized)",
            "reason",
            dict(self.gw.out.refused),
        )
        yield GaugeMetricFamily(
            "streampipe_ingest_devices",
            "Devices the gateway numbers",
            value=len(self.gw.numbering.devices),
        )
        yield GaugeMetricFamily(
            "streampipe_queue_depth",
            "Messages received and not yet mapped",
            value=len(self.gw._received),
        )


class Gateway:
    """Maps foreign messages to native readings; see the module for the guarantees."""

    def __init__(self, config: GatewayConfig) -> None:
        if not config.sources:
            raise ValueError("the gateway needs at least one source")
        self.config = config
        self.id = check_name(config.gateway_id, "gateway id")
        self.topics = Topics(config.topic_root)
        self.sources = list(config.sources)
        self.clock = config.clock
        self.numbering = Numbering(int(config.clock() * 1000))
        self.stats = GatewayStats()
        # Both connections are driven by the thread that runs the gateway: a message is
        # read, mapped, encoded and sent with no hand-off between threads.
        self.driver = Driver()
        self._received: list[tuple[int, Message]] = []  # (connection number, message)
        self._digests: OrderedDict[str, bytes] = OrderedDict()
        # topic -> the source that claims it, or None; a source claims by topic alone
        self._claims = functools.lru_cache(maxsize=MAX_TOPICS)(self._claimant)
        self._stop = threading.Event()
        self._unacked: list[tuple[int, Message]] = []
        self._touched: set[str] = set()  # topics whose digest changed since the last ticket
        self._tickets: deque[_Ticket] = deque()
        self._handled = threading.Condition()
        self._store: Any = None
        self._recorder = Recorder(config.record) if config.record else None
        self._http: Any = None
        self.metrics_port: int | None = None
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))
        client = config.client_id or f"streampipe-ingest-{self.id}@{self.topics.root}"
        status = self.topics.status(self.id)
        self.input = Connection(
            config.broker,
            client,
            clean_start=False,
            session_expiry=config.session_expiry,
            receive_maximum=config.queue_size,
            manual_ack=True,
            on_message=self._on_message,
            driver=self.driver,
        )
        self.out = Connection(
            config.broker,
            f"{client}-out",
            will=Will(status, b"offline", qos=1, retain=True),
            driver=self.driver,
        )
        self.publisher = ReadingPublisher(
            self.out, self.topics, batch_size=config.batch, linger=config.linger
        )

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> Gateway:
        if self.config.state_dir is not None:
            from streampipe.state import CheckpointStore

            self._store = CheckpointStore(self.config.state_dir, f"ingest-{self.id}")
            self._restore()
        if self.config.metrics_port is not None:
            from streampipe.http import Health, MetricsServer

            self._http = MetricsServer(
                self.config.metrics_host,
                self.config.metrics_port,
                self.registry,
                lambda: Health(self.input.connected and self.out.connected, True),
            )
            self.metrics_port = self._http.port
        self.out.connect()
        self.input.connect()
        filters = sorted({f for s in self.sources for f in s.filters()})
        self.input.subscribe(filters, qos=1)
        self.out.publish(self.topics.status(self.id), b"online", qos=1, retain=True)
        log.info(
            "gateway %r: subscribed to %s; publishing readings under %s/readings",
            self.id,
            ", ".join(filters),
            self.topics.root,
        )
        return self

    def stop(self) -> None:
        """Make :meth:`run` return (any thread, or a signal handler)."""
        self._stop.set()
        self.driver.wake()

    def run(self) -> None:
        """Map messages until :meth:`stop`; then commit what was mapped and close."""
        linger = self.config.linger
        next_commit = time.monotonic() + linger
        oldest = 0.0  # when the oldest message not yet committed was mapped
        # Near its limit messages gather a linger, so that each device's readings of that
        # time share a frame (a frame costs several readings); below it none wait.
        pace = Pace(linger)
        gather = 0.0  # how long the oldest message waits for company
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                due = min(next_commit, oldest + gather) if self._unacked else now + 0.5
                # Reads (and handles, in _on_message) all that came, sends what is queued.
                self.driver.run_once(due - now)
                items, self._received = self._received, []
                if items:
                    if not self._unacked:
                        oldest = time.monotonic()
                    for connection, msg in items:
                        self._handle(msg, connection)
                    with self._handled:
                        self._handled.notify_all()
                now = time.monotonic()
                gather = pace.update(now, self.driver.waited, self.stats.messages)
                # Commit when the oldest message has waited its moment (none while the
                # gateway keeps up: a reading waits for no one; readings that come together
                # share frames anyway), when the linger bound passed, or when half the
                # queue waits for acknowledgement: the busier, the more readings a frame.
                if self._unacked and (
                    now - oldest >= gather
                    or now >= next_commit
                    or len(self._unacked) >= self.config.queue_size // 2
                ):
                    self._due()
                    self.commit()
                    next_commit = now + linger
                elif now >= next_commit:  # what the sources' time bounds emit, if any
                    if self._due():
                        self.commit(always=True)
                    next_commit = now + linger
                self.settle(block=len(self._tickets) > MAX_TICKETS)
        finally:
            with contextlib.suppress(Exception):
                self.commit()
                deadline = time.monotonic() + 10
                while self._tickets and time.monotonic() < deadline and self.out.connected:
                    self.settle(block=True)
            self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.out.publish(self.topics.status(self.id), b"offline", qos=1, retain=True)
        self.input.close()
        self.out.close()
        if self._http is not None:
            self._http.close()
        if self._store is not None:
            self._store.close()
        if self._recorder is not None:
            self._recorder.close()
        self.driver.close()

    def wait_handled(self, messages: int, timeout: float) -> bool:
        """Wait until ``messages`` foreign messages have been mapped (or dead-lettered)."""
        with self._handled:
            return self._handled.wait_for(lambda: self.stats.messages >= messages, timeout)

    # -- messages ------------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:  # inside driver.run_once: only record
        self._received.append((self.input.connects, msg))

    def _handle(self, msg: Message, connection: int) -> None:
        self._unacked.append((connection, msg))
        self.stats.messages += 1
        topic, payload = msg.topic, msg.payload  # paho decodes the topic at each .topic
        source = self._claims(topic)
        if source is None:
            if any(_excludes(s, topic) for s in self.sources):
                self.stats.excluded += 1  # left alone on purpose: not a dead letter
                return
            self._dead(topic, payload, "no_rule", "no source claims this topic")
            return
        self.stats.by_source[source.name] += 1
        digest = hashlib.blake2b(payload, digest_size=8).digest()
        last = self._digests.get(topic)
        if last == digest and msg.retain:
            self.stats.retained_replays += 1
            return
        if last == digest and msg.dup:
            self.stats.redelivered += 1
            return
        self._digests[topic] = digest
        self._touched.add(topic)
        self._digests.move_to_end(topic)
        if len(self._digests) > MAX_TOPICS:
            self._digests.popitem(last=False)
        arrived = self.clock()
        try:
            mapped = source.map(Incoming(topic, payload, msg.retain, arrived))
        except Unmappable as exc:
            self._dead(topic, payload, exc.reason, exc.detail, source.name)
            return
        except Exception as exc:  # a source's bug must not stop the gateway
            log.exception("source %s failed on %s", source.name, topic)
            self._dead(topic, payload, "mapping_failed", repr(exc), source.name)
            return
        for m in mapped:
            self.stats.source_gaps += m.meta.get("seq_gap", 0)
            self._publish(m, arrived, topic, payload, source.name)
        self._commands(source)

    def _claimant(self, topic: str) -> Source | None:
        return next((s for s in self.sources if s.claims(topic)), None)

    def _due(self) -> int:
        """Map what the sources' time bounds release (partial readings); how many."""
        now = self.clock()
        released = 0
        for source in self.sources:
            for m in source.due(now):
                self._publish(m, now, "", b"", source.name)
                released += 1
        return released

    def _commands(self, source: Source) -> None:
        commands = getattr(source, "commands", None)
        if commands is not None:
            for topic, payload in commands():
                self.out.publish(topic, payload, qos=0)

    def _publish(self, m: Mapped, arrived: float, topic: str, payload: bytes, source: str) -> None:
        if m.device not in self.numbering.devices:  # a device numbered was checked before
            try:
                check_name(m.device)
            except InvalidName as exc:
                self._dead(topic, payload, "invalid_device", str(exc), source)
                return
            if len(self.numbering.devices) >= self.config.max_devices:
                self._dead(
                    topic, payload, "too_many_devices", f"{self.config.max_devices} known", source
                )
                return
        x = m.x
        if not all(type(v) is float for v in x.values()):
            bad = [k for k, v in x.items() if not isinstance(v, _NUMBER) or isinstance(v, bool)]
            if bad:
                self._dead(topic, payload, "not_numeric", f"fields {bad}", source)
                return
            x = {k: float(v) for k, v in x.items()}
        if not (m.y is None or isinstance(m.y, _NUMBER)):
            self._dead(topic, payload, "not_numeric", "fields ['target']", source)
            return
        if not x and m.y is None:
            self._dead(topic, payload, "no_features", "nothing numeric was mapped", source)
            return
        numbered = self.numbering.number(m)
        if numbered is None:
            self._dead(topic, payload, "duplicate", f"counter {m.counter} seen last", source)
            return
        epoch, seq = numbered
        ts = arrived if m.ts is None else m.ts
        if not math.isfinite(ts):
            self._dead(topic, payload, "bad_timestamp", repr(ts), source)
            return
        reading = Reading(
            m.device,
            seq=seq,
            ts=ts,
            x=x,
            y=None if m.y is None else float(m.y),
            epoch=epoch,
        )
        self.publisher.add(reading)
        self.stats.readings += 1
        if self._recorder is not None:
            self._recorder.add(reading)

    def _dead(
        self, topic: str, payload: bytes, reason: str, detail: str, source: str | None = None
    ) -> None:
        self.stats.rejected[reason] += 1
        body = dead_letter_body(self.id, self.clock(), reason, detail, topic, payload)
        if source is not None:
            body["source"] = source
        log.debug("dead letter from %s: %s (%s)", topic, reason, detail)
        self.out.publish(
            self.topics.deadletter(self.id),
            orjson.dumps(body),
            qos=1,
            content_type="application/json",
        )

    # -- commits -------------------------------------------------------------------

    def commit(self, always: bool = False) -> None:
        """Send what is buffered, and mark the foreign messages mapped so far as one
        ticket, to be acknowledged once the broker has the readings they became and a
        checkpoint holds the state they left (:meth:`settle`). With none mapped, only
        ``always`` (readings a source's time bound released) makes a ticket."""
        if not self._unacked and not always:
            return
        self.publisher.flush()
        snapshot = None
        if self._store is not None:
            rows = {f"d:{d}": list(self.numbering.devices[d]) for d in self.numbering.changed}
            rows.update((f"t:{topic}", self._digests[topic]) for topic in self._touched)
            meta = {
                "epoch": self.numbering.epoch,
                "sources": {s.name: s.state() for s in self.sources},
            }
            snapshot = (meta, rows)
        self.numbering.changed.clear()
        self._touched.clear()
        self._tickets.append(_Ticket(self._unacked, self.publisher.stats.messages, snapshot))
        self._unacked = []

    def settle(self, block: bool = False) -> None:
        """Acknowledge the foreign messages of every ticket whose readings the broker has
        acknowledged, after checkpointing the state they left; with ``block``, wait (a
        second at most) for the oldest ticket."""
        if not self._tickets:
            return
        self.publisher.acked(self._tickets[0].published, 1.0 if block else 0.0)
        done: list[_Ticket] = []
        while self._tickets and self.publisher.stats.acked_messages >= self._tickets[0].published:
            done.append(self._tickets.popleft())
        if not done:
            return
        if self._store is not None:
            rows: dict[str, Any] = {}
            for ticket in done:
                rows.update(ticket.snapshot[1])  # type: ignore[index]
            self._store.save(done[-1].snapshot[0], rows)  # type: ignore[index]
        if self._recorder is not None:
            self._recorder.flush()
        for ticket in done:
            for connection, msg in ticket.messages:
                self.input.ack(msg, connection)
            self.stats.acknowledged += len(ticket.messages)
        self.stats.commits += 1

    def _restore(self) -> None:
        loaded = self._store.load()
        if loaded is None:  # the first start with this state dir: its epoch, kept at once
            meta = {"epoch": self.numbering.epoch, "sources": {}}
            self._store.save(meta, {})
            return
        meta, rows = loaded
        self.numbering.epoch = meta["epoch"]
        devices = {k[2:]: list(v) for k, v in rows.items() if k.startswith("d:")}
        self.numbering.devices = devices
        self._digests = OrderedDict((k[2:], v) for k, v in rows.items() if k.startswith("t:"))
        states = meta.get("sources", {})
        for s in self.sources:
            if s.name in states:
                s.restore(states[s.name])
        log.info(
            "ingest %s: resumed %d devices from %s",
            self.id,
            len(devices),
            Path(self.config.state_dir or "."),
        )
