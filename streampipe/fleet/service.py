"""The aggregator service: edges' updates in, the signed fleet model out, over MQTT.

It subscribes to ``ROOT/fleet/<name>/updates/+`` (retained: on start it gets every
edge's latest update at once) and, within ``min_interval`` of an update that changes the
combination, publishes the fleet model retained, QoS 1, on ``ROOT/fleet/<name>/model``:
a signed artifact (:mod:`streampipe.models.artifact`) named after the fleet, of the
next version, holding the model built from the spec and the combined parameters.

Versions only go up. On start the service reads the header of the retained fleet model
(probing, as ``deploy`` does) and, with a state directory, its own ledger
(``<state-dir>/fleet.versions``, written before each publication); it numbers on from
the highest. An empty retained message on a stage's update topic (the operator
clearing a retired edge's update) drops that stage from the combination.

Threads: paho's network thread only puts messages in a bounded queue (a full queue is
counted, ``streampipe_fleet_inbox_dropped_total``). One worker thread, the caller of
:meth:`FleetAggregator.run`, owns the :class:`~streampipe.fleet.aggregator.Aggregator`,
the version and everything published; the probe's dict is guarded by ``_probe_lock``.

Refused updates are dead letters on ``ROOT/deadletter/aggregate-<name>`` (JSON with the
reason and detail) and ``streampipe_fleet_updates_refused_total{reason}``, except
``duplicate`` (the broker redelivers retained updates on every reconnect): counted only.
"""

from __future__ import annotations

import logging
import pickle
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from streampipe.deadletter import dead_letter_body
from streampipe.fleet.aggregator import Aggregator, Rule
from streampipe.fleet.update import MAX_UPDATE_BYTES, UpdateError, decode_update
from streampipe.models.artifact import CONTENT_TYPE, ArtifactError, make_artifact, read_header
from streampipe.models.deploy import VersionLedger
from streampipe.models.keys import SigningKey
from streampipe.topics import Topics, check_name
from streampipe.transport import BrokerURL, Connection, Message, MQTTError

__all__ = ["AggregatorConfig", "FleetAggregator", "FleetMetrics"]

log = logging.getLogger(__name__)

#: Messages waiting for the worker. Updates come at most every few seconds per edge; a
#: full queue means far more edges than one aggregator is for.
INBOX_SIZE = 1000
#: A dead letter carries this much of the refused payload (base64 is not worth it here).
STALENESS_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100, 1000)


@dataclass(frozen=True, slots=True)
class AggregatorConfig:
    """What ``streampipe aggregate`` runs with."""

    fleet: str
    key: SigningKey
    spec: str | None = None
    rule: Rule = "auto"
    trim: float = 0.2
    staleness_exponent: float = 0.5
    min_interval: float = 1.0
    state_dir: Path | None = None
    timeout: float = 10.0

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet name")
        if not self.min_interval >= 0:
            raise ValueError("--min-interval must be 0 or more seconds")


class FleetMetrics:
    """The aggregator's Prometheus metrics, in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        kw: dict[str, Any] = {"namespace": "streampipe", "registry": registry}
        self.received = Counter(
            "fleet_updates_received", "Fleet updates received, refused ones included", **kw
        )
        self.refused = Counter(
            "fleet_updates_refused", "Fleet updates refused, by reason", ["reason"], **kw
        )
        self.published = Counter("fleet_models_published", "Fleet models published", **kw)
        self.dropped = Counter(
            "fleet_inbox_dropped", "Messages dropped because the worker's queue was full", **kw
        )
        self.version = Gauge("fleet_model_version", "Version of the fleet model published", **kw)
        self.edges = Gauge(
            "fleet_contributing_edges", "Edge stages whose update the fleet model combines", **kw
        )
        self.staleness = Histogram(
            "fleet_update_staleness_versions",
            "Fleet versions published since the one an accepted update was made from",
            buckets=STALENESS_BUCKETS,
            **kw,
        )
        self.max_staleness = Gauge(
            "fleet_max_staleness_versions",
            "Staleness of the stalest update in the fleet model last published",
            **kw,
        )


class FleetAggregator:
    """Runs an :class:`Aggregator` on a broker: see the module's docs.

    ``start()`` connects and reads the version to number from; ``run(stop)`` works until
    ``stop`` is set; ``close()`` disconnects.
    """

    def __init__(
        self,
        url: BrokerURL,
        topics: Topics,
        config: AggregatorConfig,
        *,
        registry: CollectorRegistry | None = None,
        client_id: str = "",
    ) -> None:
        self.topics = topics
        self.config = config
        self.aggregator = Aggregator(
            config.spec,
            rule=config.rule,
            trim=config.trim,
            staleness_exponent=config.staleness_exponent,
        )
        self.metrics = FleetMetrics(registry or CollectorRegistry())
        self.stage_id = f"aggregate-{config.fleet}"
        self.updates_filter = topics.fleet_updates(config.fleet)
        self.model_topic = topics.fleet_model(config.fleet)
        self._ledger = (
            VersionLedger(config.state_dir / "fleet.versions") if config.state_dir else None
        )
        self._inbox: queue.Queue[Message] = queue.Queue(INBOX_SIZE)
        self._probe_lock = threading.Condition()
        self._probe: str | None = None
        self._probed: dict[str, bytes] = {}  # guarded by _probe_lock
        # Owned by the worker thread:
        self.version = 0
        self._dirty = False
        self._last_publish = -float("inf")
        self._last_params: Any = None
        self.conn = Connection(
            url,
            client_id or f"streampipe-aggregate-{uuid.uuid4().hex[:12]}",
            on_message=self._on_message,
        )

    # -- network thread ---------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        with self._probe_lock:
            if self._probe is not None and msg.topic in (self.model_topic, self._probe):
                self._probed[msg.topic] = msg.payload
                self._probe_lock.notify_all()
                return
        if msg.topic == self.model_topic:
            return
        try:
            self._inbox.put_nowait(msg)
        except queue.Full:
            self.metrics.dropped.inc()

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> FleetAggregator:
        """Connect, find the version to number from, subscribe to the updates."""
        if self.config.state_dir is not None:
            self.config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.conn.connect(self.config.timeout)
        self.version = self._highest_version()
        self.metrics.version.set(self.version)
        # The retained updates come in a burst on subscribing: one fleet model for them all.
        self._last_publish = time.monotonic()
        self.conn.subscribe(self.updates_filter, qos=1, timeout=self.config.timeout)
        log.info(
            "aggregating fleet %s from %s (rule %s); fleet model on %s, from version %d",
            self.config.fleet, self.updates_filter, self.config.rule, self.model_topic,
            self.version + 1,
        )  # fmt: skip
        return self

    def _highest_version(self) -> int:
        probe = f"{self.model_topic}/probe/{uuid.uuid4().hex}"
        with self._probe_lock:
            self._probe, self._probed = probe, {}
        try:
            self.conn.subscribe([self.model_topic, probe], qos=1, timeout=self.config.timeout)
            self.conn.publish(probe, b"", qos=1)
            with self._probe_lock:
                if not self._probe_lock.wait_for(
                    lambda: probe in self._probed, self.config.timeout
                ):
                    raise MQTTError(
                        f"broker did not send back a probe within {self.config.timeout:g} s: "
                        "cannot tell which fleet model version is retained"
                    )
                retained = self._probed.get(self.model_topic)
        finally:
            self.conn.unsubscribe([self.model_topic, probe])
            with self._probe_lock:
                self._probe = None
        highest = 0
        if retained:
            try:
                highest = read_header(retained).version  # unverified: numbering only
            except ArtifactError as exc:
                log.warning(
                    "the retained fleet model on %s is unreadable: %s", self.model_topic, exc
                )
        if self._ledger is not None:
            mine = self._ledger.highest(self.topics.root, self.config.fleet)
            if mine is not None:
                highest = max(highest, mine[0])
        return highest

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> FleetAggregator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- worker thread ----------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Handle updates and publish the fleet model until ``stop`` is set."""
        while not stop.is_set():
            wait = 0.5
            if self._dirty:
                wait = max(0.0, self._last_publish + self.config.min_interval - time.monotonic())
            try:
                msg = self._inbox.get(timeout=min(wait, 0.5))
            except queue.Empty:
                pass
            else:
                try:
                    self.handle(msg)
                except Exception:  # contained: one message must not stop the fleet
                    log.exception("failed to handle a message on %s", msg.topic)
                continue  # drain what is waiting before publishing once
            if self._dirty and time.monotonic() >= self._last_publish + self.config.min_interval:
                try:
                    self.publish()
                except Exception:  # e.g. the ledger unwritable: try again after a while
                    log.exception("failed to publish the fleet model; trying again")
                    self._dirty = True
                    self._last_publish = time.monotonic() + 5.0

    def handle(self, msg: Message) -> None:
        """One message from an update topic."""
        stage = msg.topic.rsplit("/", 1)[-1]
        if not msg.payload:  # the operator cleared a retired edge's retained update
            if self.aggregator.forget(stage):
                log.info("stage %s's update was cleared: it leaves the fleet model", stage)
                self._dirty = True
            return
        self.metrics.received.inc()
        try:
            update = decode_update(
                msg.payload,
                MAX_UPDATE_BYTES,
                fleet=self.config.fleet,
                spec=self.aggregator.spec,
                stage=stage,
                limit=self.aggregator.limit,
            )
        except UpdateError as exc:
            self._refuse(msg, exc.reason, exc.detail)
            return
        why = self.aggregator.add(update, self.version)
        if why is not None:
            self._refuse(msg, why, f"update seq {update.seq} of stage {stage}")
            return
        self.metrics.staleness.observe(max(0, self.version - update.base))
        self._dirty = True

    def _refuse(self, msg: Message, reason: str, detail: str) -> None:
        self.metrics.refused.labels(reason).inc()
        if reason == "duplicate":
            return
        log.warning("refused an update on %s: %s (%s)", msg.topic, reason, detail)
        body = dead_letter_body(self.stage_id, time.time(), reason, detail, msg.topic, msg.payload)
        self.conn.publish(
            self.topics.deadletter(self.stage_id),
            orjson.dumps(body),
            qos=1,
            content_type="application/json",
        )

    def publish(self) -> int | None:
        """Combine and publish the fleet model if it changed; its version, or None."""
        self._dirty = False
        agg = self.aggregator
        if not agg.latest:
            return None
        params = agg.combine(self.version)
        if params == self._last_params:
            return None
        model = agg.build(params)
        version = self.version + 1
        artifact = make_artifact(
            pickle.dumps(model),
            name=self.config.fleet,
            version=version,
            kind=agg.kind,
            key=self.config.key,
            spec=agg.spec,
        )
        if self._ledger is not None:
            # Before sending: a publication that is lost may still reach edges, and its
            # version must not be numbered again.
            self._ledger.record(
                self.topics.root, self.config.fleet, version, read_header(artifact).sha256
            )
        self.conn.publish(self.model_topic, artifact, qos=1, retain=True, content_type=CONTENT_TYPE)
        self.version = version
        self._last_params = params
        self._last_publish = time.monotonic()
        contributions = agg.contributions(version - 1)
        counted = [c for c in contributions if c.weight > 0]
        self.metrics.published.inc()
        self.metrics.version.set(version)
        self.metrics.edges.set(len(counted))
        self.metrics.max_staleness.set(max((c.staleness for c in contributions), default=0))
        log.info(
            "fleet model %s version %d: %d edges, %s readings; %s bytes retained on %s",
            self.config.fleet, version, len(counted), f"{sum(c.readings for c in counted):,}",
            f"{len(artifact):,}", self.model_topic,
        )  # fmt: skip
        return version
