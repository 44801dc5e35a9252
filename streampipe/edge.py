"""The edge service: an :class:`~streampipe.stage.EdgeStage` wired to MQTT and Prometheus.

Threads and their jobs:

- the input connection's network thread (paho's) only puts received messages in an
  :class:`~streampipe.inbox.Inbox` and answers liveness probes (see
  :meth:`EdgeService._claim_stage`). When the inbox is full it waits for room, so TCP
  holds the rest at the broker (never for long: it sends the keepalives);
- the output connection's network thread sends predictions, metrics, dead letters and
  events and reads their acknowledgements, which the worker waits for. On a
  connection of their own they never queue behind input the worker has no room for;
- the worker (the thread that calls :meth:`EdgeService.run`) decodes, validates,
  learns, publishes the outputs and only then acknowledges the input message
  (MQTT v5 manual acknowledgement), so a reading is never acknowledged before its
  prediction is handed to the broker;
- an HTTP thread serves ``/metrics`` and ``/healthz`` (:mod:`streampipe.http`).

With a deploy key, model artifacts (``ROOT/models/<name>``) come through the same queue
and are handled by the worker like readings (:mod:`streampipe.models.receive`), so a
hot swap falls between two messages and is committed with them. So does the fleet model
(``ROOT/fleet/<name>/model``) of a stage with ``fleet``, whose model updates the worker
publishes between messages (:mod:`streampipe.fleet.edge`).

Flow control, so that a load larger than the edge can take is a normal condition:
the stage announces a *Receive Maximum* equal to its queue's capacity, so the broker
should not have more unacknowledged QoS 1 messages in flight to us than that, and
keeps the rest queued for us (``max_queued_messages``); where it sends more anyway
(Mosquitto 2.0.11 does), a full queue stops the input thread reading; and the worker has at most
:data:`MAX_UNACKED_OUTPUTS` outputs unacknowledged by the broker before it waits for
them, and acknowledges input only after its outputs are handed on (or, with
``--state-dir``, acknowledged and checkpointed), so a slow broker slows the input
too. QoS 0 input that finds the queue full is counted
(``streampipe_rejected_total{reason="queue_full"}``) and dropped, as QoS 0 allows.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from paho.mqtt.client import MQTTMessageInfo
from prometheus_client import CollectorRegistry

from streampipe.homeassistant import DEFAULT_PREFIX, Discovery
from streampipe.http import MAX_CONNECTIONS, REQUEST_TIMEOUT, Health, MetricsServer
from streampipe.inbox import Inbox
from streampipe.learn.challenger import PromotionRule
from streampipe.learn.spec import DEFAULT_MODEL_SPEC, ModelSpec
from streampipe.limits import (
    MAX_CLOCK_AHEAD,
    MAX_DEVICES,
    MAX_FEATURES,
    MAX_HELD_BYTES,
    MAX_HELD_PER_DEVICE,
    MAX_SEQ_JUMP,
)
from streampipe.metrics import (
    LatencyHistogram,
    ReadingAgeHistogram,
    StageCollector,
    StageStats,
    summary,
)
from streampipe.models.keys import load_verify_key
from streampipe.models.receive import ModelReceiver
from streampipe.stage import EdgeStage, Outgoing
from streampipe.state import CheckpointStore
from streampipe.topics import DEFAULT_ROOT, PARTITIONS, InvalidName, Topics, check_name
from streampipe.transport import BrokerURL, Connection, Message, MQTTError, Will

if TYPE_CHECKING:
    from streampipe.fleet.edge import FleetMember

__all__ = ["AlreadyRunning", "EdgeConfig", "EdgeService", "TakenOver"]

log = logging.getLogger(__name__)

ONLINE, OFFLINE = b"online", b"offline"
#: Messages processed back to back before the loop looks at its timers again.
DRAIN_AT_ONCE = 256
#: Outputs (QoS 1) handed to the client but not yet acknowledged by the broker before
#: the worker waits for the oldest: bounds the client's memory, leaves its network
#: thread time to send them, and keeps within MQTT's 65,535 packet ids.
MAX_UNACKED_OUTPUTS = 2000
#: How long a starting stage waits for the process that claims the stage (whose retained
#: status is ``online``) to answer a liveness probe; unanswered, the claim is stale. A
#: live edge answers on its network thread, busy or not, within milliseconds.
PROBE_TIMEOUT = 3.0
#: A probe (QoS 0) is sent again this often until answered or PROBE_TIMEOUT is up.
PROBE_EVERY = 0.5
_NONCE = re.compile(r"[0-9a-f]{1,64}")
#: The checkpoint's stage-wide state keeps the fleet's part under this key.
FLEET = "fleet"


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
    metrics_max_connections: int = MAX_CONNECTIONS  # HTTP connections served at once
    metrics_timeout: float = REQUEST_TIMEOUT  # s an HTTP connection has for its request
    metrics_interval: float = 5.0
    summary_interval: float = 60.0  # s between one-line summaries in the log; 0: none
    checkpoint_interval: float = 1.0  # longest a processed message waits for its commit
    session_expiry: int = 86_400  # seconds the broker keeps our session while we are away
    partitions: tuple[int, ...] | None = None  # reading partitions to serve; None: all
    window: int = 1000
    mode: str = "exact"  # or "minibatch": see streampipe.learn.learner
    queue_size: int = 1000
    # Per-sender bounds (issue 18; the README's Limits table): see streampipe.stage.
    max_devices: int = MAX_DEVICES  # devices with a model; new ones beyond are refused
    max_features: int = MAX_FEATURES  # feature names per device
    max_seq_jump: int = MAX_SEQ_JUMP  # past a device's watermark, unless followed on from
    max_clock_ahead: float = MAX_CLOCK_AHEAD  # s a timestamp or boot epoch may lead our clock
    max_held_per_device: int = MAX_HELD_PER_DEVICE  # frames waiting for a schema, per device
    max_held_bytes: int = MAX_HELD_BYTES  # bytes of frames waiting for a schema, in all
    keepalive: int = 30
    #: /healthz says "unavailable" once messages have waited this long while the worker
    #: finished none: a stage that is stuck, not merely behind.
    stall_after: float = 60.0
    deploy_key: str | None = None  # public key file: accept signed models on ROOT/models/<name>
    # Evaluation beyond the rolling metrics (see streampipe.stage); all off by default.
    anomaly_threshold: float | None = None
    drift: str | None = None  # "adwin" or "page-hinkley"
    on_drift: str = "alert"  # or "reset"
    challenger: str | None = None  # a model spec
    challenger_name: str | None = None
    promote_if_better: float | None = None  # percent
    promote_after: int = 1000  # scored readings
    # For Home Assistant and Node-RED (streampipe.homeassistant); off by default.
    last_value: bool = False  # retain each device's newest y_pred on ROOT/predictions/<d>/last
    ha_discovery: bool = False  # a discovery config per device (implies last_value)
    ha_discovery_prefix: str = DEFAULT_PREFIX
    # Fleet learning (streampipe.fleet.edge); off by default. Needs deploy_key.
    fleet: str | None = None  # the fleet's name: updates out, the fleet model in
    fleet_interval: float = 10.0  # s from learning something to the update, at most
    fleet_blend: float = 0.0  # share of each new fleet model mixed into devices' models


class TakenOver(MQTTError):
    """Another process connected with this stage's client id."""


class AlreadyRunning(MQTTError):
    """Another process runs this stage."""


class EdgeService:
    """Runs one edge stage until :meth:`stop` (or SIGINT/SIGTERM via the CLI)."""

    def __init__(self, config: EdgeConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.topics = Topics(config.topic_root)
        self.registry = registry or CollectorRegistry()
        self.stats = StageStats(config.stage_id)
        latency, age = LatencyHistogram(), ReadingAgeHistogram()
        self.registry.register(latency)
        self.registry.register(age)
        self.stage = EdgeStage(
            config.stage_id,
            ModelSpec.parse(config.model),
            # Held frames are not acknowledged: they take places in the broker's window
            # of Receive Maximum (the queue's size), which the schema they wait for
            # needs a place in too.
            max_held=max(1, config.queue_size // 2),
            max_held_per_device=config.max_held_per_device,
            max_held_bytes=config.max_held_bytes,
            max_devices=config.max_devices,
            max_features=config.max_features,
            max_seq_jump=config.max_seq_jump,
            max_clock_ahead=config.max_clock_ahead,
            partitions=config.partitions,
            topics=self.topics,
            stats=self.stats,
            model_name=config.model_name,
            window=config.window,
            on_latency=latency.observe,
            on_age=age.observe_many,
            mode=config.mode,
            anomaly_threshold=config.anomaly_threshold,
            drift=config.drift,
            on_drift=config.on_drift,
            challenger=ModelSpec.parse(config.challenger) if config.challenger else None,
            challenger_name=config.challenger_name,
            promote=None
            if config.promote_if_better is None
            else PromotionRule(config.promote_if_better, config.promote_after),
            last_value=config.last_value,
            ha_discovery=Discovery(self.topics, config.stage_id, config.ha_discovery_prefix)
            if config.ha_discovery
            else None,
        )
        self.receiver: ModelReceiver | None = None
        if config.deploy_key is not None:
            name = self.stats.model_name
            try:
                check_name(name, "model name")
            except InvalidName as exc:
                raise InvalidName(f"{exc}: give the stage a --model-name to deploy to") from None
            self.receiver = ModelReceiver(self.stage, load_verify_key(config.deploy_key), name)
        self.fleet: FleetMember | None = None
        if config.fleet is not None:
            if self.receiver is None:
                raise ValueError(
                    "--fleet needs --deploy-key: the fleet model is verified with it, as "
                    "deployed models are"
                )
            from streampipe.fleet.edge import FleetMember  # imports the fleet's parts

            self.fleet = FleetMember(
                self.stage,
                self.receiver.key,
                config.fleet,
                interval=config.fleet_interval,
                blend=config.fleet_blend,
            )
        self.checkpoints = (
            CheckpointStore(config.state_dir, config.stage_id) if config.state_dir else None
        )
        self.registry.register(StageCollector(self.stats))
        self.inbox: Inbox[Message] = Inbox(config.queue_size)
        #: Longest the input thread waits for room at a time: it sends the keepalives.
        self._room_wait = min(5.0, config.keepalive / 3)
        self.stats.queue_depth = self.inbox.qsize
        self.stats.queue_capacity = config.queue_size
        self.ready = threading.Event()
        self._stop = threading.Event()
        #: When the worker last finished a message or found none waiting (monotonic).
        self._progress = time.monotonic()
        self.instance = uuid.uuid4().hex  # this process, in the stage's retained claim
        self._claim = b""  # that claim, as published (worker thread, once started)
        self._claimed_on = 0  # the connection it was published on (see _check_claim)
        self._instance_topic = self.topics.instance(config.stage_id)
        # Liveness probes come here; each is answered on <instance>/pong/<its nonce>.
        self._ping_topic = f"{self._instance_topic}/ping"
        self._whoami = _this_process()
        self._probe_answer = json.dumps({"instance": self.instance, **self._whoami}).encode()
        # Processed but not yet acknowledged input (with the connection it came in on),
        # and the outputs published but not yet acknowledged by the broker, oldest first.
        self._uncommitted: list[tuple[int, Message]] = []
        self._outputs: collections.deque[MQTTMessageInfo] = collections.deque()
        self._oldest_uncommitted = 0.0
        # Commit before half the broker's in-flight window is used, so it keeps sending.
        self._commit_every = max(1, config.queue_size // 2)
        self._http: object | None = None
        self.metrics_port: int | None = None
        self._summarised: dict[str, object] | None = None  # the snapshot last logged
        self.conn = Connection(
            config.broker,
            # Stable, so a restarted stage resumes its session; the root is part of it
            # because stages under different roots are different stages.
            client_id=f"streampipe-edge-{config.stage_id}@{config.topic_root}",
            clean_start=config.session_expiry == 0,
            session_expiry=config.session_expiry,
            keepalive=config.keepalive,
            will=Will(self.topics.status(config.stage_id), OFFLINE),
            manual_ack=True,
            receive_maximum=config.queue_size,
            on_message=self._enqueue,
        )
        #: Outputs go out on a connection of their own (see the module): it subscribes to
        #: nothing, so its acknowledgements never wait behind input.
        self.out = Connection(
            config.broker, f"{self.conn.client_id}-out", keepalive=config.keepalive
        )

    # -- network thread ------------------------------------------------------------

    def _enqueue(self, msg: Message) -> None:
        if self._answer_probe(msg):
            return
        # A full inbox holds this thread back while the worker runs, for well under a
        # keepalive at a time (see streampipe.inbox). The connection number is read
        # here, on the thread that counts connections, so it is the one msg came in on.
        put = self.inbox.put(msg, qos=msg.qos, connection=self.conn.connects, wait=self._room_wait)
        if not put:
            self.stats.reject("queue_full")

    def _answer_probe(self, msg: Message) -> bool:
        """Answer a liveness probe (:meth:`_claim_stage`) if ``msg`` is one; say whether
        it was. On the network thread, ahead of any backlog; never blocks, never raises."""
        try:
            if msg.topic != self._ping_topic:
                return False
        except Exception:  # a topic paho cannot decode: not ours to judge here
            return False
        try:
            nonce = msg.payload.decode("ascii", "replace")
            if _NONCE.fullmatch(nonce):
                pong = f"{self._instance_topic}/pong/{nonce}"
                self.conn.publish(pong, self._probe_answer, qos=0)
            # Subscribed at QoS 0; should one come at QoS 1, it is done with.
            self.conn.ack(msg, self.conn.connects)
        except Exception as exc:  # not connected, say: the prober asks again
            log.debug("could not answer a liveness probe: %s", exc)
        return True

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> EdgeService:
        """Connect, subscribe, serve metrics and announce ``online``."""
        try:
            return self._start()
        except BaseException:
            # Refused (another process runs this stage, a checkpoint of another model, no
            # broker): release what was taken, so the caller may try again.
            if self._http is not None:
                self._http.shutdown()  # type: ignore[attr-defined]
            if self.checkpoints is not None:
                self.checkpoints.close()
            for conn in (self.out, self.conn):
                if conn.connected:
                    conn.close()
            raise

    def _start(self) -> EdgeService:
        cfg = self.config
        if cfg.metrics_port is not None and cfg.metrics_port >= 0:
            server = MetricsServer(
                cfg.metrics_host,
                cfg.metrics_port,
                self.registry,
                lambda: Health(
                    self.conn.connected and self.out.connected,
                    self.ready.is_set() and not self._stop.is_set(),
                    not self.stalled(),
                ),
                max_connections=cfg.metrics_max_connections,
                timeout=cfg.metrics_timeout,
            )
            self._http = server
            self.metrics_port = server.port
        saved = None
        if self.checkpoints is not None:
            saved = self.checkpoints.load()
            if saved is not None:
                self.stage.restore(*saved)
                if self.fleet is not None:
                    self.fleet.restore(saved[0].get(FLEET))
                self.stats.model_version = self.stage.learner.version
                log.info(
                    "resumed %d device models from %s", self.stats.devices, self.checkpoints.path
                )
        self._claim_stage()
        self.conn.connect()
        self.out.connect()
        if saved is not None and not self.conn.session_present and cfg.session_expiry:
            self.conn.sessions_lost += 1
            log.warning(
                "the broker kept no session for stage %s: readings published while it was "
                "down are lost (they show as sequence gaps)",
                cfg.stage_id,
            )
        self.stats.sessions_lost = lambda: self.conn.sessions_lost
        # Answering probes before claiming: whoever sees the claim may probe it at once.
        self.conn.subscribe(self._ping_topic, qos=0)
        claim = json.dumps(
            {"instance": self.instance, **self._whoami, "since": time.time(),
             "lock": self._lock_id()}
        ).encode()  # fmt: skip
        self._claim, self._claimed_on = claim, self.conn.connects
        self.conn.publish(self._instance_topic, claim, retain=True).wait_for_publish(10)
        if self.receiver is not None:
            # First, so that a stage starting afresh runs the deployed model from its
            # first reading: the retained artifact is queued ahead of new readings.
            self.conn.subscribe([self.receiver.topic], qos=1)
        if self.fleet is not None:  # so too the fleet model that new devices start from
            self.conn.subscribe([self.fleet.topic], qos=1)
        self.conn.subscribe(
            [self._instance_topic, self.topics.schemas(), self.topics.control(cfg.stage_id)],
            qos=1,
        )
        # The session the broker kept may hold the readings subscriptions of an earlier
        # start with other --partitions: drop those first, or this stage would go on
        # learning devices another edge now serves.
        wanted = set(self.topics.readings_filter(cfg.partitions))
        stale = [
            f
            for f in self.topics.readings_filter(None)
            + self.topics.readings_filter(tuple(range(PARTITIONS)))
            if f not in wanted
        ]
        self.conn.unsubscribe(stale)
        self.conn.subscribe(sorted(wanted), qos=1)
        self.conn.publish(self.topics.status(cfg.stage_id), ONLINE, retain=True).wait_for_publish(
            10
        )
        log.info("edge %s online at %s, model %s", cfg.stage_id, cfg.broker, self.stage.spec.text)
        if self.receiver is not None:
            log.info(
                "accepting models signed by key %s on %s (running version %d)",
                self.receiver.key.key_id,
                self.receiver.topic,
                self.stats.model_version,
            )
        if self.fleet is not None:
            log.info(
                "fleet %s: updates on %s at most every %g s, fleet model from %s",
                cfg.fleet, self.fleet.updates_topic, cfg.fleet_interval, self.fleet.topic,
            )  # fmt: skip
        self.ready.set()
        return self

    def _claim_stage(self) -> None:
        """Refuse to start while another live process runs this stage.

        The running one's retained status is ``online`` and its claim (``instance``)
        names it. A process that died without a word can leave both behind with no will
        ever to come: a power cut that took the broker down with it, or a clean
        disconnect after a failed shutdown. So the claim is checked: made in this pid
        namespace of this boot by a pid that no longer exists (or on the state dir lock
        this process now holds), it is stale at once; otherwise the claimer is sent a
        liveness probe, which a live stage answers within milliseconds
        (:meth:`_answer_probe`): an answer refuses this start, none within
        :data:`PROBE_TIMEOUT` makes the claim stale.
        """
        stage = self.config.stage_id
        status_topic = self.topics.status(stage)
        pong_topic = f"{self._instance_topic}/pong/{self.instance}"
        seen: dict[str, bytes] = {}
        changed = threading.Condition()

        def on_message(msg: Message) -> None:
            with changed:
                seen[msg.topic] = msg.payload
                changed.notify_all()

        probe = Connection(
            self.config.broker, f"{self.conn.client_id}-probe-{self.instance[:8]}",
            on_message=on_message,
        )  # fmt: skip
        probe.connect()
        try:
            marker = f"{self._instance_topic}/probe/{self.instance}"
            probe.subscribe([status_topic, self._instance_topic, marker, pong_topic], qos=1)
            # Retained messages come before anything published after subscribing.
            probe.publish(marker, b"", qos=1)
            limit = time.monotonic() + 10
            with changed:
                changed.wait_for(lambda: marker in seen, max(0.0, limit - time.monotonic()))
                if seen.get(status_topic) != ONLINE:
                    return
                claim = _parse_claim(seen.get(self._instance_topic, b""))
            why = self._claimer_gone(claim)
            if why is None:

                def ended_or_answered() -> bool:
                    return seen.get(status_topic) != ONLINE or pong_topic in seen

                deadline = time.monotonic() + PROBE_TIMEOUT
                with changed:
                    while not ended_or_answered() and (left := deadline - time.monotonic()) > 0:
                        # QoS 0, as the edge subscribes: asked again in case one is lost.
                        probe.publish(self._ping_topic, self.instance, qos=0)
                        changed.wait_for(ended_or_answered, min(PROBE_EVERY, left))
                    if seen.get(status_topic) != ONLINE:
                        return  # it stopped meanwhile
                    answer = seen.get(pong_topic)
                if answer is not None:
                    raise AlreadyRunning(
                        f"stage {stage!r} is already running "
                        f"({answer.decode(errors='replace')}): stop it first, or give this "
                        "one another --stage-id"
                    )
                why = f"did not answer a probe within {PROBE_TIMEOUT:g} s"
            log.warning(
                "stage %s was claimed by pid %s on %s, which %s: the claim is stale; starting",
                stage, claim.get("pid", "?"), claim.get("host", "?"), why,
            )  # fmt: skip
        finally:
            probe.close()

    def _claimer_gone(self, claim: dict[str, object]) -> str | None:
        """Why the process that made ``claim`` is surely gone; ``None`` if only a probe
        can tell (another machine, another boot or pid namespace, a pid in use)."""
        lock = self._lock_id()
        if lock is not None and claim.get("lock") == lock:
            # It held this lock (the same file, this boot) until after it disconnected.
            return "no longer exists (this process holds the state dir lock it held)"
        pid = claim.get("pid")
        if (
            self._whoami["pidns"] is None
            or claim.get("pidns") != self._whoami["pidns"]
            or type(pid) is not int
            or pid <= 0
        ):
            return None
        # (A pid in use may be another process by now, or this one, or another stage in
        # this process: the probe tells.)
        return None if _pid_alive(pid) else "no longer exists"

    def _lock_id(self) -> str | None:
        """The state dir lock this process holds, as one file of this boot."""
        if self.checkpoints is None or _BOOT is None:
            return None
        try:
            st = os.stat(self.checkpoints.dir / f"{self.config.stage_id}.lock")
        except OSError:
            return None
        return _digest(_BOOT, str(st.st_dev), str(st.st_ino))

    def stop(self) -> None:
        """Ask :meth:`run` to finish what it has and return."""
        self._stop.set()

    def stalled(self) -> bool:
        """Whether messages wait while the worker has finished none for
        ``stall_after`` seconds: stuck, not merely behind (that keeps finishing)."""
        return (
            self.inbox.qsize() > 0
            and time.monotonic() - self._progress > self.config.stall_after
            and self.inbox.oldest_age() > self.config.stall_after
        )

    def run(self) -> None:
        """Process messages until stopped, then drain, report and disconnect cleanly."""
        next_metrics = time.monotonic() + self.config.metrics_interval
        every = self.config.summary_interval
        next_summary = time.monotonic() + every if every > 0 else float("inf")
        self.inbox.open()  # from now on a full inbox holds the input thread back
        try:
            while not self._stop.is_set():
                if self.conn.taken_over.is_set():
                    raise TakenOver(
                        f"another process connected as stage {self.config.stage_id!r} "
                        f"(client id {self.conn.client_id}); this one stopped"
                    )
                timeout = max(0.0, min(0.5, next_metrics - time.monotonic()))
                if self._uncommitted:
                    due = self._oldest_uncommitted + self.config.checkpoint_interval
                    timeout = max(0.0, min(timeout, due - time.monotonic()))
                if self._next(timeout):
                    self._drain(DRAIN_AT_ONCE - 1)
                else:
                    self._progress = time.monotonic()  # idle is not stuck
                if self._uncommitted and time.monotonic() >= (
                    self._oldest_uncommitted + self.config.checkpoint_interval
                ):
                    self._commit()
                if self.fleet is not None:
                    self._send_update(self.fleet.poll(time.monotonic()))
                if time.monotonic() >= next_metrics:
                    self._finish(*self.stage.expire_held())  # type: ignore[arg-type]
                    self._publish(self.stage.metrics_message())
                    self.stage.dead_letters.flush()
                    next_metrics = time.monotonic() + self.config.metrics_interval
                if time.monotonic() >= next_summary:
                    self._log_summary()
                    next_summary = time.monotonic() + every
        finally:
            self._shutdown()

    def _log_summary(self) -> None:
        """One line at INFO: readings and their rate since the last one, devices,
        refusals, the rolling metric, the queue."""
        snapshot = self.stats.snapshot()
        log.info("%s", summary(snapshot, self._summarised))
        self._summarised = snapshot

    def _drain(self, limit: int) -> None:
        """Process what has already arrived, up to ``limit`` messages, without waiting."""
        for _ in range(limit):
            if not self._next(0.0):
                return

    def _next(self, timeout: float) -> bool:
        """Process the next message, waiting up to ``timeout`` s for one; False if none
        came. A copy from an earlier connection that the broker resends is skipped."""
        got = self.inbox.get(timeout)
        if got is None:
            return False
        connection, msg = got
        if self.conn.resent(connection):
            # The broker resumed our session and resends every unacknowledged message
            # with its packet id: this older copy would be a duplicate, whose readings
            # the watermark refuses. (With the session lost, nothing is resent: the
            # older copy is all there is, and it is processed.)
            return True
        self._process(connection, msg)
        self._progress = time.monotonic()
        return True

    def _process(self, connection: int, msg: Message) -> None:
        if msg.topic == self._instance_topic:
            self._check_claim(connection, msg)
            return
        receiver = self.receiver
        token = (connection, msg)
        try:
            if receiver is not None and msg.topic == receiver.topic:
                outputs, done = receiver.handle(msg.topic, msg.payload), [token]
            elif self.fleet is not None and msg.topic == self.fleet.topic:
                outputs, done = self.fleet.handle(msg.topic, msg.payload), [token]
            else:
                outputs, done = self.stage.handle_message(
                    msg.topic,
                    msg.payload,
                    token,
                    redelivered=msg.dup,
                    retained=msg.retain,
                    # When the network thread read it (paho's time.monotonic()), so the
                    # latency includes the wait in the inbox.
                    received=msg.timestamp or None,
                )
        except Exception as exc:  # a bug, not bad input: keep the stage alive, report it
            log.exception("internal error processing a message on %s", msg.topic)
            outputs = [self.stage.dead_letter(msg.topic, msg.payload, "internal_error", repr(exc))]
            done = [token]
        self._finish(outputs, done)  # type: ignore[arg-type]

    def _check_claim(self, connection: int, msg: Message) -> None:
        try:
            owner = json.loads(msg.payload).get("instance")
        except (ValueError, AttributeError):
            owner = None
        self.conn.ack(msg, connection)
        if owner is None or owner == self.instance:
            return
        if connection > self._claimed_on:
            # Our connection was lost since we claimed the stage, and another process
            # claims it now: it started as this stage and took our session over (which
            # closes our connection; Mosquitto 2.0 says so with no reason code, so the
            # claim is what tells). Taking it back would make the two fight forever:
            # this one stops.
            self.conn.taken_over.set()
            return
        # Claimed while we held the connection we claimed on: no process took our
        # session, since that would have closed it first. Whoever can publish on the
        # status topic does not stop a stage: the claim is ours again (issue 18 §7).
        log.warning(
            "ignored a claim of stage %s by instance %.32r made while this process held its "
            "connection (a session takeover would have closed it); claiming it again",
            self.config.stage_id, owner,
        )  # fmt: skip
        self.stats.reject("foreign_claim")
        self.conn.publish(self._instance_topic, self._claim, retain=True)

    def _finish(self, outputs: list[Outgoing], done: list[tuple[int, Message]]) -> None:
        """Publish outputs; acknowledge the messages done with, now or at the next commit.
        (A frame that waits for its schema is not done, so it is not acknowledged.)"""
        for out in outputs:
            self._publish(out)
        if self.checkpoints is None:
            # Nothing to make durable: a message is done once its outputs are handed on.
            for connection, msg in done:
                self.conn.ack(msg, connection)
            return
        if done and not self._uncommitted:
            self._oldest_uncommitted = time.monotonic()
        self._uncommitted += done
        if len(self._uncommitted) >= self._commit_every:
            self._commit()

    def _await_outputs(self, most: int, timeout: float | None = None) -> bool:
        """Wait until at most ``most`` outputs await the broker's acknowledgement;
        False if ``timeout`` passed first, or the stage is stopping (without one).

        The output connection's network thread reads the acknowledgements and waits
        for nothing, so this wait always ends once the broker is reachable.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        outputs = self._outputs
        while True:
            while outputs and outputs[0].is_published():
                outputs.popleft()
            if len(outputs) <= most:
                return True
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0 or (self._stop.is_set() and deadline is None):
                return False
            try:
                outputs[0].wait_for_publish(min(left, 1.0))
            except RuntimeError:  # disconnected: paho resends once reconnected
                self.out.wait_connected(min(left, 1.0))

    def _commit(self, timeout: float | None = None) -> bool:
        """Make processed input durable, then acknowledge it.

        In this order: (1) the outputs published for it have reached the broker,
        (2) a checkpoint covers the learning it caused, (3) the input is acknowledged.
        A crash before (3) makes the broker redeliver the input; the restored
        watermarks then tell what was already learned. Returns False if the outputs
        were not acknowledged within ``timeout`` (nothing is acknowledged then).
        """
        if not self._await_outputs(0, timeout):
            return False
        self._checkpoint()
        for connection, msg in self._uncommitted:
            self.conn.ack(msg, connection)
        self.stats.commits += 1
        self._uncommitted.clear()
        return True

    def _send_update(self, update: Outgoing | None) -> None:
        """Publish a fleet update; it changes no model, so nothing waits on it."""
        if update is not None:
            self._publish(update)

    def _checkpoint(self) -> None:
        if self.checkpoints is not None:
            meta, changed, full = self.stage.snapshot()
            if self.fleet is not None:
                meta = {**meta, FLEET: self.fleet.snapshot()}
            self.checkpoints.save(meta, changed, full=full)

    def _publish(self, out: Outgoing) -> None:
        """Hand an output to the client, first waiting for the broker to acknowledge
        older ones if :data:`MAX_UNACKED_OUTPUTS` are outstanding."""
        if out.qos and len(self._outputs) >= MAX_UNACKED_OUTPUTS:
            self._await_outputs(MAX_UNACKED_OUTPUTS // 2)
        info = self.out.publish(
            out.topic,
            out.payload,
            qos=out.qos,
            retain=out.retain,
            content_type=out.content_type,
            user_properties=out.user_properties,
        )
        if out.qos:
            self._outputs.append(info)

    def _announce_offline(self) -> None:
        """Retain ``offline`` before the clean disconnect, which sends no will: also
        after a failed shutdown (a full disk), so that a restart is not refused."""
        if self.conn.taken_over.is_set():
            return  # the stage runs in another process now: its status is not ours
        try:
            info = self.conn.publish(self.topics.status(self.config.stage_id), OFFLINE, retain=True)
            info.wait_for_publish(5)
        except Exception as exc:
            log.warning("could not announce offline: %s", exc)

    def _shutdown(self) -> None:
        self._stop.set()  # also when run() ends by an exception: no wait without a bound
        self.inbox.close()  # the network thread no longer waits for room
        try:
            # Finish what was already received; the session (and its subscriptions) stays
            # with the broker, which keeps what arrives from now on for the next start.
            self._drain(self.inbox.qsize())
            if self.fleet is not None:  # what was learned since the last update
                self._send_update(self.fleet.poll(float("inf")))
            self._publish(self.stage.metrics_message())
            self.stage.dead_letters.flush(force=True)
            self._log_summary()
            if self.checkpoints is not None:
                if not self._commit(timeout=10):
                    log.warning("outputs not acknowledged by the broker; input left unacknowledged")
            elif not self._await_outputs(0, timeout=5):
                log.warning("the broker did not acknowledge every output before the stop")
        except Exception as exc:  # shutting down: report, do not mask the original error
            log.warning("clean shutdown incomplete: %s", exc)
        finally:
            self._announce_offline()
            self.conn.close()
            self.out.close()
            if self._http is not None:
                self._http.shutdown()  # type: ignore[attr-defined]
            if self.checkpoints is not None:
                self.checkpoints.close()
            log.info("edge %s stopped", self.config.stage_id)


def _read_boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:  # not Linux
        return None


#: This boot of this machine (Linux); ``None`` where unknown.
_BOOT = _read_boot_id()


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _this_process() -> dict[str, object]:
    """Who runs a stage, as its claim and its probe answers say. ``pidns`` stands for
    this boot's pid namespace (Linux), within which a pid names one live process."""
    pidns = None
    if _BOOT is not None:
        with contextlib.suppress(OSError):
            pidns = _digest(_BOOT, os.readlink("/proc/self/ns/pid"))
    return {"host": socket.gethostname(), "pid": os.getpid(), "pidns": pidns}


def _parse_claim(payload: bytes) -> dict[str, object]:
    try:
        claim = json.loads(payload)
    except ValueError:
        return {}
    return claim if isinstance(claim, dict) else {}


def _pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists here (a zombie, killed but not yet reaped, is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it exists
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except OSError:
        return True
