"""The edge service: an :class:`~streampipe.stage.EdgeStage` wired to MQTT and Prometheus.

Threads and their jobs:

- paho's network thread only puts received messages on a bounded queue;
- the worker (the thread that calls :meth:`EdgeService.run`) decodes, validates,
  learns, publishes the outputs and only then acknowledges the input message
  (MQTT v5 manual acknowledgement), so a reading is never acknowledged before its
  prediction is handed to the broker;
- prometheus_client's HTTP thread serves ``/metrics``.

The queue cannot overflow with QoS 1 input: the stage announces a *Receive Maximum*
equal to the queue's capacity, and the broker never has more unacknowledged
messages in flight to us than that. QoS 0 input that finds the queue full is counted
(``streampipe_rejected_total{reason="queue_full"}``) and dropped, as QoS 0 allows.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, start_http_server

from streampipe.learn.spec import DEFAULT_MODEL_SPEC, ModelSpec
from streampipe.metrics import LatencyHistogram, StageCollector, StageStats
from streampipe.stage import EdgeStage, Outgoing
from streampipe.state import CheckpointStore
from streampipe.topics import DEFAULT_ROOT, Topics
from streampipe.transport import BrokerURL, Connection, Message, Will

__all__ = ["EdgeConfig", "EdgeService"]

log = logging.getLogger(__name__)

ONLINE, OFFLINE = b"online", b"offline"
#: Messages processed back to back before the loop looks at its timers again.
DRAIN_AT_ONCE = 256


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    broker: BrokerURL
    stage_id: str
    model: str = DEFAULT_MODEL_SPEC
    model_name: str | None = None
    topic_root: str = DEFAULT_ROOT
    state_dir: str | None = None
    metrics_port: int | None = None  # None or 0: no HTTP server
    metrics_host: str = "127.0.0.1"
    metrics_interval: float = 5.0
    checkpoint_interval: float = 30.0
    window: int = 1000
    mode: str = "exact"  # or "minibatch": see streampipe.learn.learner
    queue_size: int = 1000
    keepalive: int = 30


class EdgeService:
    """Runs one edge stage until :meth:`stop` (or SIGINT/SIGTERM via the CLI)."""

    def __init__(self, config: EdgeConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.topics = Topics(config.topic_root)
        self.registry = registry or CollectorRegistry()
        self.stats = StageStats(config.stage_id)
        latency = LatencyHistogram()
        self.registry.register(latency)
        self.stage = EdgeStage(
            config.stage_id,
            ModelSpec.parse(config.model),
            topics=self.topics,
            stats=self.stats,
            model_name=config.model_name,
            window=config.window,
            on_latency=latency.observe_many,
            mode=config.mode,
        )
        self.checkpoints = (
            CheckpointStore(config.state_dir, config.stage_id) if config.state_dir else None
        )
        self.registry.register(StageCollector(self.stats))
        self.queue: queue.Queue[Message] = queue.Queue(maxsize=config.queue_size)
        self.stats.queue_depth = self.queue.qsize
        self.stats.queue_capacity = config.queue_size
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._http: object | None = None
        self.metrics_port: int | None = None
        self.conn = Connection(
            config.broker,
            client_id=f"streampipe-edge-{config.stage_id}",
            keepalive=config.keepalive,
            will=Will(self.topics.status(config.stage_id), OFFLINE),
            manual_ack=True,
            receive_maximum=config.queue_size,
            on_message=self._enqueue,
        )

    # -- network thread ------------------------------------------------------------

    def _enqueue(self, msg: Message) -> None:
        try:
            self.queue.put_nowait(msg)
        except queue.Full:
            if msg.qos == 0:
                self.stats.reject("queue_full")
                return
            self.queue.put(msg)  # cannot happen within Receive Maximum; wait, never drop

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> EdgeService:
        """Connect, subscribe, serve metrics and announce ``online``."""
        cfg = self.config
        if cfg.metrics_port is not None and cfg.metrics_port >= 0:
            server, _thread = start_http_server(
                cfg.metrics_port, addr=cfg.metrics_host, registry=self.registry
            )
            self._http = server
            self.metrics_port = server.server_port
        if self.checkpoints is not None:
            saved = self.checkpoints.load()
            if saved is not None:
                self.stage.learner.restore(*saved)
                log.info(
                    "resumed %d device models from %s", self.stats.devices, self.checkpoints.path
                )
        self.conn.connect()
        self.conn.subscribe([self.topics.schemas()], qos=1)
        self.conn.subscribe(self.topics.readings_filter(), qos=1)
        self.conn.publish(self.topics.status(cfg.stage_id), ONLINE, retain=True).wait_for_publish(
            10
        )
        log.info("edge %s online at %s, model %s", cfg.stage_id, cfg.broker, self.stage.spec.text)
        self.ready.set()
        return self

    def stop(self) -> None:
        """Ask :meth:`run` to finish what it has and return."""
        self._stop.set()

    def run(self) -> None:
        """Process messages until stopped, then drain, report and disconnect cleanly."""
        next_metrics = time.monotonic() + self.config.metrics_interval
        next_checkpoint = time.monotonic() + self.config.checkpoint_interval
        try:
            while not self._stop.is_set():
                timeout = max(0.0, min(0.5, next_metrics - time.monotonic()))
                try:
                    msg = self.queue.get(timeout=timeout)
                except queue.Empty:
                    msg = None
                if msg is not None:
                    self._process(msg)
                    self._drain(DRAIN_AT_ONCE)
                if time.monotonic() >= next_metrics:
                    self._publish(self.stage.metrics_message())
                    next_metrics = time.monotonic() + self.config.metrics_interval
                if time.monotonic() >= next_checkpoint:
                    self._checkpoint()
                    next_checkpoint = time.monotonic() + self.config.checkpoint_interval
        finally:
            self._shutdown()

    def _drain(self, limit: int) -> None:
        """Process what has already arrived, up to ``limit`` messages, without waiting."""
        for _ in range(limit):
            try:
                msg = self.queue.get_nowait()
            except queue.Empty:
                return
            self._process(msg)

    def _checkpoint(self) -> None:
        if self.checkpoints is not None:
            meta, devices = self.stage.learner.snapshot()
            self.checkpoints.save(meta, devices, full=True)  # every device: changes untracked

    def _process(self, msg: Message) -> None:
        try:
            outputs = self.stage.handle(msg.topic, msg.payload)
        except Exception as exc:  # a bug, not bad input: keep the stage alive, report it
            log.exception("internal error processing a message on %s", msg.topic)
            outputs = [self.stage.dead_letter(msg.topic, msg.payload, "internal_error", repr(exc))]
        for out in outputs:
            self._publish(out)
        self.conn.ack(msg.mid, msg.qos)

    def _publish(self, out: Outgoing) -> None:
        self.conn.publish(
            out.topic, out.payload, qos=out.qos, retain=out.retain, content_type="application/json"
        )

    def _shutdown(self) -> None:
        try:
            # Stop receiving, then finish what was already received.
            self.conn.unsubscribe(self.topics.readings_filter())
            self._drain(self.queue.maxsize + 1)
            self._publish(self.stage.metrics_message())
            self._checkpoint()
            info = self.conn.publish(self.topics.status(self.config.stage_id), OFFLINE, retain=True)
            info.wait_for_publish(5)
        except Exception as exc:  # shutting down: report, do not mask the original error
            log.warning("clean shutdown incomplete: %s", exc)
        finally:
            self.conn.close()
            if self.checkpoints is not None:
                self.checkpoints.close()  # releases the stage's lock
            if self._http is not None:
                self._http.shutdown()  # type: ignore[attr-defined]
            log.info("edge %s stopped", self.config.stage_id)
