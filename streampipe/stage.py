"""The edge stage's logic: one input message in, the messages it causes out.

:class:`EdgeStage` knows nothing of MQTT connections, threads or sockets — the
service in :mod:`streampipe.edge` feeds it — so it can be tested with plain bytes.
Everything a message can do wrong ends here as a dead letter with a reason and a
count in ``streampipe_rejected_total{reason=...}``; nothing raises out of
:meth:`EdgeStage.handle`.

Besides the served model (the *champion*), a stage may evaluate what it serves further,
each part opt-in: anomaly events (an anomaly detector's scores against a threshold),
drift detection on each device's errors (:mod:`streampipe.learn.drift`), and a
*challenger* model learning the same readings, promoted by a rule or a command
(:mod:`streampipe.learn.challenger`). What they find is published on
``ROOT/events/<stage_id>`` (:mod:`streampipe.events`).

>>> from streampipe import codec
>>> from streampipe.readings import Batch, Reading
>>> stage = EdgeStage("edge-1")
>>> frame = codec.encode(Batch.from_readings([Reading("d1", 0, 1.0, {"a": 1.0}, 3.0)]))
>>> out = stage.handle(stage.topics.readings("d1"), frame)
>>> [m.topic for m in out]
['streampipe/predictions/d1']
>>> [m.topic for m in stage.handle(stage.topics.readings("d1"), b"garbage")]
['streampipe/deadletter/edge-1']
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from river import base

from streampipe import codec
from streampipe.deadletter import dead_letter_body
from streampipe.events import anomaly_event, drift_event, promotion_event
from streampipe.learn.challenger import PROMOTE_AFTER, Duel, PromotionRule
from streampipe.learn.drift import DriftMonitor
from streampipe.learn.labels import stricter
from streampipe.learn.learner import LearnResult, OnlineLearner
from streampipe.learn.spec import DEFAULT_MODEL_SPEC, ModelSpec, _final_step
from streampipe.limits import (
    MAX_CLOCK_AHEAD,
    MAX_DEVICES,
    MAX_FEATURES,
    MAX_HELD_BYTES,
    MAX_HELD_BYTES_PER_DEVICE,
    MAX_HELD_PER_DEVICE,
    MAX_SEQ_JUMP,
)
from streampipe.metrics import StageStats
from streampipe.readings import Batch
from streampipe.topics import InvalidName, Topics, check_name, partition_level, partition_of
from streampipe.validate import DEFAULT_MAX_ABS, Rejection, Validated, validate

if TYPE_CHECKING:
    from streampipe.homeassistant import Discovery

__all__ = ["EdgeStage", "Outgoing"]

log = logging.getLogger(__name__)

#: How many refused readings a dead letter lists.
DEADLETTER_MAX_READINGS = 100
#: Frames that wait for their schema, or behind a frame of their device that does: at
#: most this many, none for longer than this (those behind go when the first one does).
MAX_HELD = 1000
HOLD_SECONDS = 10.0
#: What ``--on-drift`` may do: publish the event only, or also replace the device's model.
ON_DRIFT = ("alert", "reset")
#: Checkpoint keys of a challenger's device states: "challenger/<device>" (a device id
#: never holds a "/", so these cannot collide with the champion's).
CHALLENGER = "challenger"
#: Checkpoint keys of the field-name schemas frames have named: "schema/<id>", each
#: written once, so that after a restart the frames queued meanwhile need not wait for
#: the retained schemas (the broker sends those only after what it queued). Schemas no
#: frame named (junk, or one whose frames have not come yet) are not written.
SCHEMA = "schema"
#: The first dead letter of each reason is logged in full; those that follow are summed
#: up in one line at most this often (each is still published and counted).
DEAD_LETTER_LOG_EVERY = 10.0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    content_type: str = "application/json"
    user_properties: tuple[tuple[str, str], ...] = ()  # MQTT v5 (name, value) pairs


@dataclass(slots=True)
class HeldFrame:
    """A readings message that waits: for its schema, or behind a frame of its device
    that does (``schema_id`` is the unknown schema it needs, None until it was tried).
    ``since`` is on the stage's clock, ``received`` on its timer (see :class:`EdgeStage`)."""

    since: float
    topic: str
    payload: bytes
    token: object
    received: float
    schema_id: str | None = None


class HeldFrames:
    """Frames waiting, per device, in the order they came: a device's frames are learned
    in that order, so none can move its watermark past an earlier one that waits.

    The first frame of each device waits for a schema; those behind it wait for it.
    Bounded in frames and bytes, in all and per device, so that one device cannot take
    the room of others (:meth:`has_room` is the one place a bound is checked).
    """

    def __init__(
        self,
        max_frames: int = MAX_HELD,
        max_bytes: int = MAX_HELD_BYTES,
        per_device: int = MAX_HELD_PER_DEVICE,
        bytes_per_device: int = MAX_HELD_BYTES_PER_DEVICE,
    ) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.per_device = per_device
        self.bytes_per_device = bytes_per_device
        self._by_device: dict[str, deque[HeldFrame]] = {}
        self._bytes_of: dict[str, int] = {}
        self._count = 0
        self.bytes = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, device: object) -> bool:
        return device in self._by_device

    def has_room(self, device: str, payload: bytes) -> bool:
        """Whether one more frame (of ``device``, of that size) may wait."""
        size = len(payload)
        frames = self._by_device.get(device)
        return (
            self._count < self.max_frames
            and self.bytes + size <= self.max_bytes
            and (frames is None or len(frames) < self.per_device)
            and self._bytes_of.get(device, 0) + size <= self.bytes_per_device
        )

    def full_because(self, device: str, payload: bytes) -> str:
        """Which bound :meth:`has_room` found reached, in words."""
        frames = self._by_device.get(device, ())
        if len(frames) >= self.per_device:
            return f"{len(frames)} frames of {device} wait already (the most per device)"
        if self._bytes_of.get(device, 0) + len(payload) > self.bytes_per_device:
            return f"{device}'s waiting frames would exceed {self.bytes_per_device:,} bytes"
        if self.bytes + len(payload) > self.max_bytes:
            return f"waiting frames would exceed {self.max_bytes:,} bytes"
        return f"{self._count} frames wait already"

    def most_of_one_device(self) -> tuple[int, int]:
        """The most frames, and the most bytes, that one device has waiting."""
        frames = max(map(len, self._by_device.values()), default=0)
        return frames, max(self._bytes_of.values(), default=0)

    def add(self, device: str, frame: HeldFrame) -> None:
        self._by_device.setdefault(device, deque()).append(frame)
        size = len(frame.payload)
        self._bytes_of[device] = self._bytes_of.get(device, 0) + size
        self.bytes += size
        self._count += 1

    def first(self, device: str) -> HeldFrame | None:
        frames = self._by_device.get(device)
        return frames[0] if frames else None

    def pop_first(self, device: str) -> HeldFrame:
        frames = self._by_device[device]
        frame = frames.popleft()
        self._count -= 1
        size = len(frame.payload)
        self.bytes -= size
        self._bytes_of[device] -= size
        if not frames:
            del self._by_device[device]
            del self._bytes_of[device]
        return frame

    def devices(self) -> list[str]:
        """The devices with frames waiting, in the order their waiting began."""
        return list(self._by_device)

    def waiting_for(self, schema_id: str) -> list[str]:
        """The devices whose first waiting frame needs ``schema_id``."""
        return [d for d, frames in self._by_device.items() if frames[0].schema_id == schema_id]


class DeadLetterLog:
    """Logs dead letters without a line per message: the first of each reason in full
    (the dead letter itself has the rest), then what followed in one line at most every
    ``every`` seconds. A fleet sending what a stage refuses floods no log.

    >>> now = [0.0]
    >>> dl = DeadLetterLog("root/deadletter/e1", every=10.0, timer=lambda: now[0])
    >>> dl.note("root/readings/p0/d1", "invalid_label", "not a label", {"invalid_label": 5})
    >>> now[0] = 4.0
    >>> dl.note("root/readings/p0/d1", "invalid_label", "not a label", {"invalid_label": 5})
    >>> dl.pending()  # logged at 10 s, or by flush(force=True)
    {'invalid_label': 5}
    """

    def __init__(
        self,
        topic: str,
        every: float = DEAD_LETTER_LOG_EVERY,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topic = topic  # where the dead letters go
        self.every = every
        self.timer = timer
        self._logged: set[str] = set()  # reasons logged in full once
        self._refused: dict[tuple[str, str], int] = {}  # (reason, unit): since the last line
        self._letters = 0
        self._since = timer()

    def note(
        self, source: str, reason: str, detail: str, refused: dict[str, int], unit: str = "readings"
    ) -> None:
        """A dead letter for a message from ``source``: ``refused`` counts what it
        refused by reason, in ``unit`` (``readings``, or ``messages`` for a whole one)."""
        if reason not in self._logged:
            self._logged.add(reason)
            log.info(
                "dead letter from %s: %s (%s); every dead letter goes to %s, and this "
                "log sums up further ones every %g s",
                source, reason, detail, self.topic, self.every,
            )  # fmt: skip
        else:
            self._letters += 1
            for why, n in refused.items():
                self._refused[(why, unit)] = self._refused.get((why, unit), 0) + n
        self.flush()

    def pending(self) -> dict[str, int]:
        """What was refused since the last line, by reason (not logged yet)."""
        return {why: n for (why, _), n in self._refused.items()}

    def flush(self, force: bool = False) -> None:
        """Log what was refused since the last line, if ``every`` seconds have passed
        since it (or at once, with ``force``)."""
        now = self.timer()
        if not self._letters or (now - self._since < self.every and not force):
            return
        what = ", ".join(
            f"{n:,} {unit} as {why}"
            for (why, unit), n in sorted(self._refused.items(), key=lambda kv: -kv[1])
        )
        letters = "dead letter" if self._letters == 1 else "dead letters"
        log.info(
            "%s more %s on %s in the last %.0f s, refusing %s",
            f"{self._letters:,}", letters, self.topic, now - self._since, what,
        )  # fmt: skip
        self._refused, self._letters, self._since = {}, 0, now


def _json(obj: Any) -> bytes:
    """Compact UTF-8 JSON. orjson writes floats with the shortest repr that reads back
    to the same double, so ``y_pred`` stays bit-exact, at a sixth of ``json``'s cost."""
    return orjson.dumps(obj)


class EdgeStage:
    """Decode, validate, predict-then-learn and report, one message at a time.

    Per predicted batch, ``on_latency(seconds, readings)`` is told how long ago its
    message was received (on ``timer``, a monotonic clock), and ``on_age(ages)`` how old
    each reading is (``clock`` minus the reading's timestamp).
    """

    def __init__(
        self,
        stage_id: str,
        spec: ModelSpec | None = None,
        *,
        topics: Topics | None = None,
        max_abs: float = DEFAULT_MAX_ABS,
        window: int | None = None,
        mode: str = "exact",
        stats: StageStats | None = None,
        model_name: str | None = None,
        clock: Callable[[], float] = time.time,
        timer: Callable[[], float] = time.monotonic,
        on_latency: Callable[[float, int], None] | None = None,
        on_age: Callable[[np.ndarray], None] | None = None,
        anomaly_threshold: float | None = None,
        drift: str | None = None,
        on_drift: str = "alert",
        challenger: ModelSpec | None = None,
        challenger_name: str | None = None,
        promote: PromotionRule | None = None,
        max_held: int = MAX_HELD,
        max_held_per_device: int = MAX_HELD_PER_DEVICE,
        max_held_bytes: int = MAX_HELD_BYTES,
        max_devices: int = MAX_DEVICES,
        max_features: int = MAX_FEATURES,
        max_seq_jump: int = MAX_SEQ_JUMP,
        max_clock_ahead: float = MAX_CLOCK_AHEAD,
        last_value: bool = False,
        ha_discovery: Discovery | None = None,
        partitions: tuple[int, ...] | None = None,
    ) -> None:
        self.stage_id = check_name(stage_id, "stage id")
        self.partitions = None if partitions is None else frozenset(partitions)
        self.spec = spec or ModelSpec.parse(DEFAULT_MODEL_SPEC)
        self.topics = topics or Topics()
        self.max_abs = max_abs
        kwargs = {} if window is None else {"window": window}
        kwargs.update(max_devices=max_devices, max_features=max_features, max_seq_jump=max_seq_jump)
        self.learner = OnlineLearner(self.spec, mode=mode, **kwargs)
        self.stats = stats or StageStats(stage_id)
        self.stats.model = self.learner
        self.stats.model_name = model_name or self.spec.name
        self.stats.model_version = 1
        self.schemas = codec.SchemaRegistry()
        self._saved_schemas: set[str] = set()  # ids with a row in the checkpoint
        self.stats.limits["schemas"] = lambda: (len(self.schemas), self.schemas.max_schemas)
        self._control_topic = self.topics.control(self.stage_id)
        self.clock = clock  # wall clock: timestamps, ages
        self.timer = timer  # monotonic: durations (received times are on it)
        self.on_latency = on_latency
        self.on_age = on_age
        self.dead_letters = DeadLetterLog(self.topics.deadletter(self.stage_id), timer=timer)
        self._warned_labels = False  # targets that are no labels: said once
        self._held = HeldFrames(
            max_held,
            max_held_bytes,
            max_held_per_device,
            min(max_held_bytes, MAX_HELD_BYTES_PER_DEVICE),
        )
        self.max_clock_ahead = max_clock_ahead
        held = self._held
        self.stats.limits.update(
            devices=lambda: (len(self.learner.devices), self.learner.max_devices),
            features_per_device=lambda: (self.learner.most_features, self.learner.max_features),
            held_frames=lambda: (len(held), held.max_frames),
            held_bytes=lambda: (held.bytes, held.max_bytes),
            held_frames_per_device=lambda: (held.most_of_one_device()[0], held.per_device),
            held_bytes_per_device=lambda: (held.most_of_one_device()[1], held.bytes_per_device),
        )
        kind = self.learner.kind
        self.anomaly_threshold = anomaly_threshold
        if anomaly_threshold is not None and kind != "anomaly":
            raise ValueError("--anomaly-threshold is for anomaly detectors (River's anomaly.*)")
        if anomaly_threshold is not None and isinstance(
            _final_step(self.spec.build()), base.AnomalyFilter
        ):
            raise ValueError(
                f"{self.spec.text} ends in an anomaly filter, which sets its own threshold: "
                "drop --anomaly-threshold"
            )
        if on_drift not in ON_DRIFT:
            raise ValueError(f"--on-drift must be one of {', '.join(ON_DRIFT)}, not {on_drift!r}")
        self.on_drift = on_drift
        if drift is not None and kind == "anomaly":
            raise ValueError(
                "drift detection watches a model's errors; anomaly detectors have none"
            )
        #: Drift monitors by role ("champion", "challenger").
        self.monitors: dict[str, DriftMonitor] = {}
        if drift is not None:
            self.monitors["champion"] = DriftMonitor(drift)
        self.challenger: OnlineLearner | None = None
        self.duel: Duel | None = None
        if challenger is not None:
            self._add_challenger(challenger, challenger_name, drift, promote, mode, kwargs)
        elif promote is not None:
            raise ValueError("--promote-if-better needs a --challenger to promote")
        self.labels = stricter(
            self.learner.labels, self.challenger.labels if self.challenger else None
        )
        self._full_snapshot = False  # after a promotion, the next checkpoint is whole
        # Outputs for tools that read one value (Home Assistant, Node-RED): the newest
        # prediction retained on ROOT/predictions/<device>/last, which discovery points at.
        self.last_value = last_value or ha_discovery is not None
        self.ha_discovery = ha_discovery
        if ha_discovery is not None:
            ha_discovery.numeric = self.learner.kind != "classifier"
        #: Told of every predicted batch, after it was learned: ``(batch, result)``
        #: (the fleet model scores the same readings: streampipe.fleet.edge).
        self.on_predicted: Callable[[Validated, LearnResult], None] | None = None

    def _add_challenger(
        self,
        spec: ModelSpec,
        name: str | None,
        drift: str | None,
        promote: PromotionRule | None,
        mode: str,
        kwargs: dict[str, Any],
    ) -> None:
        kind = self.learner.kind
        if kind == "anomaly":
            raise ValueError("a challenger is judged by its errors: for regressors and classifiers")
        challenger = OnlineLearner(spec, mode=mode, **kwargs)
        if challenger.kind != kind:
            raise ValueError(f"the challenger must be a {kind}, like the served model")
        name = name or spec.name
        if name == self.stats.model_name:  # the model label must tell them apart
            name += "-challenger"
        self.challenger = challenger
        self.stats.challenger = challenger
        self.stats.challenger_name = name
        if drift is not None:
            self.monitors["challenger"] = DriftMonitor(drift)
        if promote is not None:
            self.duel = Duel(promote)

    # -- input ---------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> list[Outgoing]:
        """Process one message from a readings or schemas topic."""
        return self.handle_message(topic, payload, None)[0]

    def handle_message(
        self,
        topic: str,
        payload: bytes,
        token: object,
        *,
        redelivered: bool = False,
        retained: bool = False,
        received: float | None = None,
    ) -> tuple[list[Outgoing], list[object]]:
        """Process one message; return its outputs and the tokens of the messages now
        done with (``token`` itself, unless the message waits for its schema or behind
        a frame of its device that does; those of waiting messages it released).

        ``redelivered``: the broker delivers this message again (MQTT's DUP flag, which
        only the broker sets on what it sends us), after a reconnect before it was
        acknowledged. Readings in it that were already learned are expected, and
        counted as redelivered rather than refused as duplicates.

        ``retained``: the broker kept this message and sends it because we subscribed
        (MQTT's retain flag on what it sends us): a command so sent is an old one.

        ``received``: when the message arrived, on :attr:`timer` (by default now): the
        prediction latency runs from it.
        """
        if topic.startswith(self.topics.schemas("")):
            return self._handle_schema(topic, payload, token)
        if topic == self._control_topic:
            return self._handle_control(topic, payload, retained), [token]
        device = self.topics.device_of_reading_topic(topic)
        if device is None:
            self.stats.messages += 1
            dead = self.dead_letter(topic, payload, "wrong_topic", "not a readings topic")
            return [dead], [token]
        if topic != self.topics.readings(device):  # another edge may own this device
            self.stats.messages += 1
            level = topic.rsplit("/", 2)[-2]
            detail = f"device {device!r} is on partition {partition_level(device)}, not {level!r}"
            return [self.dead_letter(topic, payload, "wrong_partition", detail)], [token]
        if self.partitions is not None and partition_of(device) not in self.partitions:
            # Queued for this stage's session under a subscription it had before it was
            # started with other --partitions: the edge that serves it now learns it.
            self.stats.messages += 1
            level = partition_level(device)
            detail = f"partition {level} is not among this stage's --partitions"
            return [self.dead_letter(topic, payload, "unserved_partition", detail)], [token]
        if received is None:
            received = self.timer()
        if device in self._held:  # learned after the device's frames that wait
            return self._hold(device, HeldFrame(self.clock(), topic, payload, token, received))
        out, missing = self._readings(topic, payload, device, redelivered, received)
        if missing is not None:
            held = HeldFrame(self.clock(), topic, payload, token, received, missing)
            return self._hold(device, held)
        return out, [token]

    def _readings(
        self, topic: str, payload: bytes, device: str, redelivered: bool, received: float
    ) -> tuple[list[Outgoing], str | None]:
        """Decode and learn one readings message; or, when its schema is unknown, do
        nothing and return that schema's id (the message is counted once processed)."""
        try:
            batch = codec.decode(payload, self.schemas)
        except codec.CodecError as exc:
            if exc.reason == "unknown_schema" and exc.schema_id is not None:
                return [], exc.schema_id
            self.stats.messages += 1
            return [self.dead_letter(topic, payload, exc.reason, str(exc))], None
        self.stats.messages += 1
        return self._checked(topic, payload, device, batch, redelivered, received), None

    def _checked(
        self,
        topic: str,
        payload: bytes,
        device: str,
        batch: Batch,
        redelivered: bool,
        received: float,
    ) -> list[Outgoing]:
        try:
            check_name(batch.device)
        except InvalidName as exc:
            return [self.dead_letter(topic, payload, "invalid_device", str(exc), len(batch))]
        if batch.device != device:
            detail = f"frame is from device {batch.device!r} but topic names {device!r}"
            return [self.dead_letter(topic, payload, "device_mismatch", detail, len(batch))]
        return self._learn(topic, payload, batch, redelivered, received)

    # -- frames that arrive before their schema ---------------------------------------

    def _hold(self, device: str, frame: HeldFrame) -> tuple[list[Outgoing], list[object]]:
        """Keep a frame whose schema has not arrived yet (MQTT orders messages per
        topic, not across the schema and readings topics), or that must be learned
        after one of its device's that waits, within bounds."""
        if self._held.has_room(device, frame.payload):
            self._held.add(device, frame)
            return [], []
        self.stats.messages += 1
        if frame.schema_id is not None:
            detail = f"schema {frame.schema_id} is unknown"
        else:  # learned now, it would move the device's watermark past those that wait
            detail = f"an earlier frame of {device} waits for its schema"
        detail += f", and {self._held.full_because(device, frame.payload)}"
        dead = self.dead_letter(frame.topic, frame.payload, "unknown_schema", detail)
        return [dead], [frame.token]

    def _release(
        self, device: str, expired: float | None = None, max_age: float = HOLD_SECONDS
    ) -> tuple[list[Outgoing], list[object]]:
        """Process ``device``'s waiting frames in order, up to the first whose schema is
        still unknown; one that came at or before ``expired`` is dead-lettered instead."""
        out: list[Outgoing] = []
        done: list[object] = []
        while (frame := self._held.first(device)) is not None:
            outputs, missing = self._readings(
                frame.topic, frame.payload, device, False, frame.received
            )
            if missing is not None:
                if expired is None or frame.since > expired:
                    frame.schema_id = missing
                    break
                self.stats.messages += 1
                detail = f"schema {missing} did not arrive within {max_age:g} s of its frame"
                outputs = [self.dead_letter(frame.topic, frame.payload, "unknown_schema", detail)]
            self._held.pop_first(device)
            out += outputs
            done.append(frame.token)
        return out, done

    def expire_held(self, max_age: float = HOLD_SECONDS) -> tuple[list[Outgoing], list[object]]:
        """Dead-letter frames that waited more than ``max_age`` seconds for a schema, and
        process the frames of their devices that waited behind them."""
        out: list[Outgoing] = []
        done: list[object] = []
        cutoff = self.clock() - max_age
        for device in self._held.devices():
            first = self._held.first(device)
            if first is not None and first.since <= cutoff:
                more, finished = self._release(device, cutoff, max_age)
                out += more
                done += finished
        return out, done

    def _handle_schema(
        self, topic: str, payload: bytes, token: object
    ) -> tuple[list[Outgoing], list[object]]:
        if not payload:  # a cleared retained schema
            return [], [token]
        sid = topic.rsplit("/", 1)[-1]
        known = sid in self.schemas
        try:
            self.schemas.add_frame(payload, schema_id=sid)
        except codec.CodecError as exc:
            return [self.dead_letter(topic, payload, exc.reason, str(exc))], [token]
        if known:
            return [], [token]
        out: list[Outgoing] = []
        done = [token]
        for device in self._held.waiting_for(sid):
            more, finished = self._release(device)
            out += more
            done += finished
        return out, done

    def _handle_control(self, topic: str, payload: bytes, retained: bool = False) -> list[Outgoing]:
        """A command: ``{"promote": "challenger"}``, with ``"force": true`` to promote a
        challenger that has scored fewer readings than the promotion rule's window.

        A retained command is never obeyed: the broker sends it again on every restart
        and resubscription, so it would promote again each time.
        """
        if not payload:  # a cleared retained command
            return []
        if retained:
            detail = "a retained command is old: publish commands without retain, and clear it"
            return [self.dead_letter(topic, payload, "retained_command", detail)]
        try:
            command = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return [self.dead_letter(topic, payload, "bad_command", "not JSON")]
        force = command.pop("force", False) if isinstance(command, dict) else False
        if command != {"promote": "challenger"} or not isinstance(force, bool):
            detail = 'unknown command; the stage knows {"promote": "challenger", "force": false}'
            return [self.dead_letter(topic, payload, "bad_command", detail)]
        if self.challenger is None:
            return [self.dead_letter(topic, payload, "bad_command", "no challenger to promote")]
        after = self.duel.rule.after if self.duel is not None else PROMOTE_AFTER
        scored = self.challenger.metrics.as_dict()["count"]
        if scored < after and not force:
            detail = (
                f"the challenger has scored {scored} readings, fewer than {after} "
                '(--promote-after): send "force": true (promote --force) to promote it anyway'
            )
            return [self.dead_letter(topic, payload, "premature_promotion", detail)]
        return [self.promote("command", readings=scored, forced=scored < after)]

    def _learn(
        self, topic: str, payload: bytes, batch: Batch, redelivered: bool, received: float
    ) -> list[Outgoing]:
        stats = self.stats
        stats.readings += len(batch)
        latest = self.clock() + self.max_clock_ahead
        checked = validate(batch, self.max_abs, self.labels, latest)
        stats.cleaned += checked.cleaned
        if checked.rejected and self.labels is not None and not self._warned_labels:
            self._warn_if_no_labels(checked)
        if self.challenger is not None:
            self._keep_in_step(batch.device)
        # Per-device bounds (devices, features, seq jumps), judged once for both models.
        checked = self.learner.admit(checked)
        result = self.learner.process(checked)
        if result.y_pred and self.on_predicted is not None:
            self.on_predicted(checked, result)
        rejected = checked.rejected
        duplicates = result.duplicates
        if redelivered and duplicates:
            stats.redelivered += len(duplicates)
            duplicates = []
        if duplicates or result.stale:
            rejected = list(rejected)
            rejected += [Rejection("duplicate", "already learned", s) for s in duplicates]
            rejected += [Rejection("stale_epoch", "older boot epoch", s) for s in result.stale]
        if result.gap:
            stats.gaps += result.gap
            log.warning("device %s: %d readings missing", batch.device, result.gap)
        if result.first_seq:  # joined mid-stream (0: seen from its first reading)
            stats.joined_midstream += 1
            log.info(
                "device %s: first seen at seq %d of epoch %d",
                batch.device,
                result.first_seq,
                batch.epoch,
            )
        stats.non_finite_predictions += result.non_finite
        out: list[Outgoing] = []
        if result.y_pred:
            if self.ha_discovery is not None:
                out += self.ha_discovery.announce(batch.device, self.stats.model_name)
            out.append(self._predictions(checked, result, received))
            if self.last_value:
                out.append(self._last_value(checked, result))
            if (
                self.challenger is not None
                or self.monitors
                or result.anomalies is not None
                or self.anomaly_threshold is not None
            ):
                out += self._evaluate(checked, result)
        if rejected:
            for r in rejected:
                stats.reject(r.reason)
            out.append(
                self.dead_letter(
                    topic,
                    payload,
                    rejected[0].reason,
                    rejected[0].detail,
                    readings=rejected,
                    count=False,
                )
            )
        return out

    def _warn_if_no_labels(self, checked: Validated) -> None:
        """Warn, once, when every target of a batch is refused as no label of the model:
        most likely a classifier (or an anomaly detector) given a numeric target, which
        would refuse every reading from now on and learn nothing."""
        batch = checked.batch
        if batch.target is None:
            return
        with_target = (
            len(batch) if batch.target_present is None else int(batch.target_present.sum())
        )
        bad = [r.seq for r in checked.rejected if r.reason == "invalid_label"]
        if not bad or len(bad) < with_target:
            return
        self._warned_labels = True
        value = float(batch.target[int(np.flatnonzero(batch.seq == bad[0])[0])])
        name = self.stats.model_name
        if self.learner.kind == "anomaly":
            log.warning(
                "model %s is an anomaly detector, whose target is an evaluation label, 0 "
                "(normal) or 1 (anomaly); target values like %g from %s are not, so every "
                "reading that has one is refused as invalid_label and nothing is learned: "
                "publish readings without a target, or with 0/1 labels",
                name, value, batch.device,
            )  # fmt: skip
            return
        labels = "0 or 1" if self.labels == "binary" else "whole numbers"
        log.warning(
            "model %s is a classifier, whose targets are class labels (%s); target values "
            "like %g from %s are not, so every such reading is refused as invalid_label and "
            'nothing is learned: for a numeric target use a regressor, such as --model "%s"',
            name, labels, value, batch.device, DEFAULT_MODEL_SPEC,
        )  # fmt: skip

    def _keep_in_step(self, device: str) -> None:
        """A challenger new to a device starts from the champion's watermark (one
        restored from a checkpoint, say), so both learn exactly the same readings."""
        if self.challenger is not None and device not in self.challenger.devices:
            champion = self.learner.devices.get(device)
            if champion is not None:
                st = self.challenger.state(device)
                st.epoch, st.seq = champion.epoch, champion.seq
                st.features = set(champion.features)

    # -- evaluation ----------------------------------------------------------------

    def _evaluate(self, checked: Validated, result: LearnResult) -> list[Outgoing]:
        """Anomalies, the challenger, drift and promotion, for one predicted batch."""
        device = checked.batch.device
        start = result.skipped
        seqs, ts = checked.seqs[start:], checked.timestamps[start:].tolist()
        events: list[dict[str, Any]] = []
        if self.learner.kind == "anomaly":
            events += self._anomalies(device, seqs, ts, result)
        results = {"champion": (self.learner, result)}
        if self.challenger is not None:
            results["challenger"] = (self.challenger, self.challenger.process(checked))
        classifier = self.learner.kind == "classifier"
        for role, monitor in self.monitors.items():
            learner, res = results[role]
            name = self.stats.model_name if role == "champion" else self.stats.challenger_name
            found = monitor.update(device, res.y_true, res.y_pred, seqs, ts, classifier=classifier)
            for drift in found:
                self.stats.count_drift(name)
                events.append(
                    drift_event(
                        self.stage_id,
                        name,
                        role,
                        monitor.detector,
                        drift,
                        classifier=classifier,
                        action=self.on_drift,
                    )
                )
            if found and self.on_drift == "reset":  # after the batch its old model predicted
                learner.reset_model(device)
                monitor.reset(device)
        out = [Outgoing(self.topics.events(self.stage_id), _json(e)) for e in events]
        if self.duel is not None and "challenger" in results:
            self.duel.update(
                result.y_true, result.y_pred, results["challenger"][1].y_pred, classifier=classifier
            )
            verdict = self.duel.verdict()
            if verdict is not None:
                out.append(
                    self.promote(
                        "rule",
                        readings=self.duel.rule.after,
                        better_by_pct=self.duel.rule.better_by,
                        error="error_rate" if classifier else "mae",
                        champion_error=verdict[0],
                        challenger_error=verdict[1],
                    )
                )
        return out

    def _anomalies(
        self, device: str, seqs: list[int], ts: list[float], result: LearnResult
    ) -> list[dict[str, Any]]:
        """Events for the readings whose score reached the threshold: the filter's
        verdicts when the model ends in one, else ``--anomaly-threshold``."""
        scores = result.y_pred
        if result.anomalies is not None:
            flags, thresholds = result.anomalies, result.thresholds or []
        elif self.anomaly_threshold is not None:
            limit = self.anomaly_threshold
            flags = [s is not None and s >= limit for s in scores]
            thresholds = [limit] * len(scores)
        else:
            return []
        name = self.stats.model_name
        events = [
            anomaly_event(self.stage_id, name, device, seqs[i], ts[i], scores[i], thresholds[i])
            for i, flag in enumerate(flags)
            if flag
        ]
        self.stats.anomalies += len(events)
        return events

    def promote(self, reason: str, **evidence: Any) -> Outgoing:
        """Make the challenger the champion for every device; the old one retires.

        Its models, metrics and drift monitor become the served ones, the model version
        goes up by one, and the next checkpoint is written whole.
        """
        if self.challenger is None:
            raise ValueError("no challenger to promote")
        stats = self.stats
        old = (stats.model_name, stats.model_version)
        version = max(stats.model_version, self.learner.version) + 1
        self.learner, self.challenger, self.duel = self.challenger, None, None
        self.learner.promoted(version)  # predictions carry the version that made them
        self.spec = self.learner.spec
        stats.model, stats.model_name = self.learner, stats.challenger_name
        stats.model_version = version
        stats.challenger, stats.challenger_name = None, ""
        self.monitors.pop("champion", None)
        if "challenger" in self.monitors:
            self.monitors["champion"] = self.monitors.pop("challenger")
        self._full_snapshot = True
        if reason != "checkpoint":
            stats.promotions += 1
            log.warning("promoted %s over %s (%s)", stats.model_name, old[0], reason)
        body = promotion_event(
            self.stage_id,
            old,
            (stats.model_name, stats.model_version),
            reason,
            now=self.clock(),
            **evidence,
        )
        return Outgoing(self.topics.events(self.stage_id), _json(body))

    # -- checkpoints ---------------------------------------------------------------

    def snapshot(self) -> tuple[dict[str, Any], dict[Any, Any], bool]:
        """What a checkpoint needs: stage-wide state, the device states that changed
        (a challenger's under ``challenger/<device>``), and whether it must replace
        the previous checkpoint whole (after a promotion, or once the rows of schemas
        the registry forgot are as many as it holds)."""
        full, self._full_snapshot = self._full_snapshot, False
        used = self.schemas.used()  # junk that no frame named never reaches the checkpoint
        forgotten = len(self._saved_schemas.difference(used))
        full = full or forgotten >= self.schemas.max_schemas
        meta, changed = self.learner.snapshot(everything=full)
        if self.challenger is not None:
            challenger_meta, challenger_changed = self.challenger.snapshot(everything=full)
            meta = {**meta, CHALLENGER: challenger_meta}
            changed = {
                **changed,
                **{f"{CHALLENGER}/{d}": st for d, st in challenger_changed.items()},
            }
        new = used if full else [sid for sid in used if sid not in self._saved_schemas]
        if new:
            changed = {**changed, **self._schema_rows(new)}
        self._saved_schemas = set(used) if full else self._saved_schemas.union(new)
        return meta, changed, full

    def _schema_rows(self, ids: Iterable[str]) -> dict[str, bytes]:
        """Checkpoint rows of these schemas: their frames, checked again on restore."""
        rows = {}
        for sid in ids:
            schema = self.schemas.peek(sid)
            if schema is not None:
                rows[f"{SCHEMA}/{sid}"] = schema.frame()
        return rows

    def restore(self, meta: dict[str, Any], devices: dict[Any, Any]) -> None:
        """Resume from a checkpoint; one written after a promotion resumes promoted."""
        prefix = f"{SCHEMA}/"
        for key, frame in devices.items():
            if key.startswith(prefix):
                self._saved_schemas.add(key[len(prefix) :])
                try:  # authenticated, but checked as any schema is; frames had named it
                    self.schemas.add_frame(frame, schema_id=key[len(prefix) :], used=True)
                except codec.CodecError as exc:
                    log.warning("checkpointed schema %s refused: %s", key[len(prefix) :], exc)
        if (
            self.challenger is not None
            and CHALLENGER not in meta
            and meta.get("spec") == self.challenger.spec.text
        ):
            self.promote("checkpoint")
        self.learner.restore(meta, {d: s for d, s in devices.items() if "/" not in d})
        saved = meta.get(CHALLENGER)
        if self.challenger is not None and saved and saved.get("spec") == self.challenger.spec.text:
            prefix = f"{CHALLENGER}/"
            self.challenger.restore(
                saved,
                {d[len(prefix) :]: s for d, s in devices.items() if d.startswith(prefix)},
            )

    # -- output --------------------------------------------------------------------

    def _predictions(self, checked: Validated, result: LearnResult, received: float) -> Outgoing:
        """One message with the predictions of a batch, in the topic contract's shape."""
        start = result.skipped
        seqs, ts, ys = checked.seqs, checked.timestamps, result.y_true
        if start:
            seqs, ts = seqs[start:], ts[start:]
        self.stats.predictions += len(seqs)
        # Handed to the client right after: the edge publishes what this returns.
        if self.on_latency is not None:
            self.on_latency(self.timer() - received, len(seqs))
        if self.on_age is not None:
            self.on_age(self.clock() - ts)
        device = checked.batch.device
        if result.proba is None:
            predictions = [
                {"seq": s, "ts": t, "y_pred": p, "y_true": y}
                for s, t, p, y in zip(seqs, ts.tolist(), result.y_pred, ys)
            ]
        else:  # a classifier: the class and its probability
            predictions = [
                {"seq": s, "ts": t, "y_pred": p, "proba": q, "y_true": y}
                for s, t, p, q, y in zip(seqs, ts.tolist(), result.y_pred, result.proba, ys)
            ]
        body = {
            "device": device,
            "model": self.stats.model_name,
            "version": result.version,
            "predictions": predictions,
        }
        if result.fleet_version:  # the device's model started from this fleet model
            body["fleet_version"] = result.fleet_version
        return Outgoing(self.topics.predictions(device), _json(body))

    def _last_value(self, checked: Validated, result: LearnResult) -> Outgoing:
        """The batch's newest prediction as plain text, retained, with its reading's ``ts``
        and ``seq`` as user properties. A non-finite one (``null`` in the JSON) is ``None``,
        which Home Assistant shows as unknown."""
        y = result.y_pred[-1]
        i = result.skipped + len(result.y_pred) - 1  # its reading, paired as _predictions does
        text = y if isinstance(y, str) else "None" if y is None else _json(y).decode()
        props = (("ts", _json(float(checked.timestamps[i])).decode()),
                 ("seq", str(int(checked.seqs[i]))))  # fmt: skip
        return Outgoing(
            self.topics.last_value(checked.batch.device),
            text.encode(),
            retain=True,
            content_type="text/plain",
            user_properties=props,
        )

    def dead_letter(
        self,
        topic: str,
        payload: bytes,
        reason: str,
        detail: str,
        n_readings: int | None = None,
        *,
        readings: list[Rejection] | None = None,
        count: bool = True,
    ) -> Outgoing:
        """A dead letter for one input message; counts it unless the caller did."""
        if count:
            self.stats.reject(reason)
        body = dead_letter_body(self.stage_id, self.clock(), reason, detail, topic, payload)
        if n_readings is not None:
            body["readings_in_message"] = n_readings
        if readings:
            body["rejected_readings"] = len(readings)
            body["readings"] = [
                {"seq": r.seq, "reason": r.reason} for r in readings[:DEADLETTER_MAX_READINGS]
            ]
        if readings:
            self.dead_letters.note(topic, reason, detail, Counter(r.reason for r in readings))
        else:
            self.dead_letters.note(topic, reason, detail, {reason: 1}, "messages")
        return Outgoing(self.topics.deadletter(self.stage_id), _json(body))

    def metrics_message(self) -> Outgoing:
        """The rolling metrics message for ``ROOT/metrics/<stage_id>``."""
        return Outgoing(self.topics.metrics(self.stage_id), _json(self.stats.snapshot()))
