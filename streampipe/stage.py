"""The edge stage's logic: one input message in, the messages it causes out.

:class:`EdgeStage` knows nothing of MQTT connections, threads or sockets — the
service in :mod:`streampipe.edge` feeds it — so it can be tested with plain bytes.
Everything a message can do wrong ends here as a dead letter with a reason and a
count in ``streampipe_rejected_total{reason=...}``; nothing raises out of
:meth:`EdgeStage.handle`.

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

import base64
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from streampipe import codec
from streampipe.learn.learner import LearnResult, OnlineLearner
from streampipe.learn.spec import DEFAULT_MODEL_SPEC, ModelSpec
from streampipe.metrics import StageStats
from streampipe.readings import Batch
from streampipe.topics import InvalidName, Topics, check_name
from streampipe.validate import DEFAULT_MAX_ABS, Rejection, Validated, validate

__all__ = ["EdgeStage", "Outgoing"]

log = logging.getLogger(__name__)

#: How much of a rejected payload a dead letter carries (base64), and how many readings.
DEADLETTER_PREFIX_BYTES = 256
DEADLETTER_MAX_READINGS = 100
#: Frames that wait for their schema: at most this many, for at most this long.
MAX_HELD = 1000
HOLD_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


def _json(obj: Any) -> bytes:
    """Compact UTF-8 JSON. orjson writes floats with the shortest repr that reads back
    to the same double, so ``y_pred`` stays bit-exact, at a sixth of ``json``'s cost."""
    return orjson.dumps(obj)


class EdgeStage:
    """Decode, validate, predict-then-learn and report, one message at a time."""

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
        on_latency: Callable[[np.ndarray], None] | None = None,
    ) -> None:
        self.stage_id = check_name(stage_id, "stage id")
        self.spec = spec or ModelSpec.parse(DEFAULT_MODEL_SPEC)
        self.topics = topics or Topics()
        self.max_abs = max_abs
        kwargs = {} if window is None else {"window": window}
        self.learner = OnlineLearner(self.spec, mode=mode, **kwargs)
        self.stats = stats or StageStats(stage_id)
        self.stats.model = self.learner
        self.stats.model_name = model_name or self.spec.name
        self.stats.model_version = 1
        self.schemas = codec.SchemaRegistry()
        self.clock = clock
        self.on_latency = on_latency
        # schema id -> frames waiting for it: (arrival time, topic, payload, token)
        self._held: dict[str, list[tuple[float, str, bytes, object]]] = {}
        self._held_count = 0

    # -- input ---------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> list[Outgoing]:
        """Process one message from a readings or schemas topic."""
        return self.handle_message(topic, payload, None)[0]

    def handle_message(
        self, topic: str, payload: bytes, token: object
    ) -> tuple[list[Outgoing], list[object]]:
        """Process one message; return its outputs and the tokens of the messages now
        done with (``token`` itself, unless the message waits for its schema; those
        of waiting messages that a schema released)."""
        if topic.startswith(self.topics.schemas("")):
            return self._handle_schema(topic, payload, token)
        self.stats.messages += 1
        device = self.topics.device_of_reading_topic(topic)
        if device is None:
            return [self.dead_letter(topic, payload, "wrong_topic", "not a readings topic")], [
                token
            ]
        try:
            batch = codec.decode(payload, self.schemas)
        except codec.CodecError as exc:
            if exc.reason == "unknown_schema" and exc.schema_id is not None:
                return self._hold(topic, payload, token, exc)
            return [self.dead_letter(topic, payload, exc.reason, str(exc))], [token]
        return self._checked(topic, payload, device, batch), [token]

    def _checked(self, topic: str, payload: bytes, device: str, batch: Batch) -> list[Outgoing]:
        try:
            check_name(batch.device)
        except InvalidName as exc:
            return [self.dead_letter(topic, payload, "invalid_device", str(exc), len(batch))]
        if batch.device != device:
            detail = f"frame is from device {batch.device!r} but topic names {device!r}"
            return [self.dead_letter(topic, payload, "device_mismatch", detail, len(batch))]
        return self._learn(topic, payload, batch)

    # -- frames that arrive before their schema ---------------------------------------

    def _hold(
        self, topic: str, payload: bytes, token: object, exc: codec.CodecError
    ) -> tuple[list[Outgoing], list[object]]:
        """Keep a frame whose schema has not arrived yet (MQTT orders messages per
        topic, not across the schema and readings topics), within bounds."""
        if self._held_count >= MAX_HELD:
            return [self.dead_letter(topic, payload, exc.reason, str(exc))], [token]
        sid = exc.schema_id
        assert sid is not None
        self._held.setdefault(sid, []).append((self.clock(), topic, payload, token))
        self._held_count += 1
        self.stats.messages -= 1  # counted when it is processed
        return [], []

    def expire_held(self, max_age: float = HOLD_SECONDS) -> tuple[list[Outgoing], list[object]]:
        """Dead-letter frames that waited more than ``max_age`` seconds for a schema."""
        out: list[Outgoing] = []
        done: list[object] = []
        cutoff = self.clock() - max_age
        for sid in list(self._held):
            waiting = self._held[sid]
            while waiting and waiting[0][0] <= cutoff:
                _, topic, payload, token = waiting.pop(0)
                self._held_count -= 1
                self.stats.messages += 1
                detail = f"schema {sid} did not arrive within {max_age:g} s of its frame"
                out.append(self.dead_letter(topic, payload, "unknown_schema", detail))
                done.append(token)
            if not waiting:
                del self._held[sid]
        return out, done

    def _handle_schema(
        self, topic: str, payload: bytes, token: object
    ) -> tuple[list[Outgoing], list[object]]:
        if not payload:  # a cleared retained schema
            return [], [token]
        sid = topic.rsplit("/", 1)[-1]
        try:
            self.schemas.add_frame(payload, schema_id=sid)
        except codec.CodecError as exc:
            return [self.dead_letter(topic, payload, exc.reason, str(exc))], [token]
        out: list[Outgoing] = []
        done = [token]
        for _, held_topic, held_payload, held_token in self._held.pop(sid, []):
            self._held_count -= 1
            more, finished = self.handle_message(held_topic, held_payload, held_token)
            out += more
            done += finished
        return out, done

    def _learn(self, topic: str, payload: bytes, batch: Batch) -> list[Outgoing]:
        stats = self.stats
        stats.readings += len(batch)
        checked = validate(batch, self.max_abs)
        stats.cleaned += checked.cleaned
        result = self.learner.process(checked)
        rejected = checked.rejected
        if result.duplicates or result.stale:
            rejected = list(rejected)
            rejected += [Rejection("duplicate", "already learned", s) for s in result.duplicates]
            rejected += [Rejection("stale_epoch", "older boot epoch", s) for s in result.stale]
        if result.gap:
            stats.gaps += result.gap
            log.warning("device %s: %d readings missing", batch.device, result.gap)
        stats.non_finite_predictions += result.non_finite
        out: list[Outgoing] = []
        if result.y_pred:
            out.append(self._predictions(checked, result))
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

    # -- output --------------------------------------------------------------------

    def _predictions(self, checked: Validated, result: LearnResult) -> Outgoing:
        """One message with the predictions of a batch, in the topic contract's shape."""
        start = result.skipped
        seqs, ts, ys = checked.seqs, checked.timestamps, checked.targets()
        if start:
            seqs, ts, ys = seqs[start:], ts[start:], ys[start:]
        self.stats.predictions += len(seqs)
        if self.on_latency is not None:
            self.on_latency(self.clock() - ts)
        device = checked.batch.device
        body = {
            "device": device,
            "model": self.stats.model_name,
            "version": result.version,
            "predictions": [
                {"seq": s, "ts": t, "y_pred": p, "y_true": y}
                for s, t, p, y in zip(seqs, ts.tolist(), result.y_pred, ys)
            ],
        }
        return Outgoing(self.topics.predictions(device), _json(body))

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
        body: dict[str, Any] = {
            "stage": self.stage_id,
            "ts": self.clock(),
            "reason": reason,
            "detail": detail,
            "topic": topic,
            "size": len(payload),
            "payload_prefix": base64.b64encode(payload[:DEADLETTER_PREFIX_BYTES]).decode(),
            "payload_truncated": len(payload) > DEADLETTER_PREFIX_BYTES,
        }
        if n_readings is not None:
            body["readings_in_message"] = n_readings
        if readings:
            body["rejected_readings"] = len(readings)
            body["readings"] = [
                {"seq": r.seq, "reason": r.reason} for r in readings[:DEADLETTER_MAX_READINGS]
            ]
        log.info("dead letter from %s: %s (%s)", topic, reason, detail)
        return Outgoing(self.topics.deadletter(self.stage_id), _json(body))

    def metrics_message(self) -> Outgoing:
        """The rolling metrics message for ``ROOT/metrics/<stage_id>``."""
        return Outgoing(self.topics.metrics(self.stage_id), _json(self.stats.snapshot()))
