"""Per-device online learning in River's progressive-validation order.

For every reading, in sequence order: ``predict_one``, then the metrics are updated
with the prediction and the target, then ``learn_one`` — exactly what
``river.evaluate.progressive_val_score`` does, so predictions equal River's own.

Each device has its own model and a watermark ``(epoch, seq)``: a reading at or below
the watermark has been learned already and is refused as a ``duplicate``, so a
redelivered message changes no model. A sensor that reboots starts a new, larger epoch
and its sequence numbers start again; a smaller epoch is ``stale_epoch``.

>>> from streampipe.learn.spec import ModelSpec
>>> from streampipe.readings import Reading
>>> learner = OnlineLearner(ModelSpec.parse("linear_model.LinearRegression"))
>>> out = learner.process("d", 0, [Reading("d", 0, 0.0, {"a": 1.0}, 2.0)])
>>> [(p.seq, p.y_pred) for p in out.predictions]
[(0, 0.0)]
>>> learner.process("d", 0, [Reading("d", 0, 0.0, {"a": 1.0}, 2.0)]).duplicates
[0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from river import metrics, utils

from streampipe.learn.spec import ModelSpec
from streampipe.readings import Reading

__all__ = ["DeviceState", "LearnResult", "ModelMetrics", "OnlineLearner", "Prediction"]

#: Rolling metrics cover the last this many predictions of a stage.
DEFAULT_WINDOW = 1000

_REGRESSION = {"mae": metrics.MAE, "rmse": metrics.RMSE, "r2": metrics.R2}
_CLASSIFICATION = {"accuracy": metrics.Accuracy}


@dataclass(frozen=True, slots=True)
class Prediction:
    seq: int
    ts: float
    y_pred: Any
    y_true: Any


@dataclass(slots=True)
class DeviceState:
    """What a stage keeps per device; checkpointed as one piece."""

    model: Any
    epoch: int = -1
    seq: int = -1  # highest sequence number learned in ``epoch``
    learned: int = 0


@dataclass(slots=True)
class LearnResult:
    predictions: list[Prediction] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    gap: int = 0  # readings missing before this batch (sequence numbers skipped)
    non_finite: int = 0  # predictions that were not finite numbers (published as null)


class ModelMetrics:
    """Progressive (since start) and rolling-window River metrics of one model."""

    def __init__(self, kind: str, window: int = DEFAULT_WINDOW) -> None:
        factories = _CLASSIFICATION if kind == "classifier" else _REGRESSION
        self.window = window
        self.progressive = {name: make() for name, make in factories.items()}
        self.rolling = {
            name: utils.Rolling(make, window_size=window) for name, make in factories.items()
        }
        self.count = 0

    def update(self, y_true: Any, y_pred: Any) -> None:
        for m in self.progressive.values():
            m.update(y_true, y_pred)
        for m in self.rolling.values():
            m.update(y_true, y_pred)
        self.count += 1

    def as_dict(self) -> dict[str, Any]:
        def values(ms: dict[str, Any]) -> dict[str, float | None]:
            out: dict[str, float | None] = {}
            for name, m in ms.items():
                v = m.get()
                out[name] = float(v) if v is not None and math.isfinite(v) else None
            return out

        return {
            "count": self.count,
            "progressive": values(self.progressive),
            "rolling": values(self.rolling),
            "window": self.window,
        }


class OnlineLearner:
    """One River model per device, learned reading by reading."""

    def __init__(self, spec: ModelSpec, *, window: int = DEFAULT_WINDOW) -> None:
        self.spec = spec
        self.kind = spec.kind
        self.devices: dict[str, DeviceState] = {}
        self.metrics = ModelMetrics(self.kind, window)

    def snapshot(self) -> dict[str, Any]:
        """Models, watermarks and metrics, to be checkpointed as one piece."""
        return {"spec": self.spec.text, "devices": self.devices, "metrics": self.metrics}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Resume from :meth:`snapshot`; refuse one learned with another model spec."""
        if snapshot.get("spec") != self.spec.text:
            raise ValueError(
                f"the checkpoint holds models of {snapshot.get('spec')!r}, not "
                f"{self.spec.text!r}: use the same --model or another --state-dir"
            )
        self.devices = snapshot["devices"]
        self.metrics = snapshot["metrics"]

    def state(self, device: str) -> DeviceState:
        st = self.devices.get(device)
        if st is None:
            st = self.devices[device] = DeviceState(self.spec.build())
        return st

    def process(self, device: str, epoch: int, readings: list[Reading]) -> LearnResult:
        """Predict, score, then learn each reading of one device, in order."""
        out = LearnResult()
        st = self.state(device)
        if epoch < st.epoch:
            out.stale = [r.seq for r in readings]
            return out
        if epoch > st.epoch:
            st.epoch, st.seq = epoch, -1
        model = st.model
        predict, learn = model.predict_one, model.learn_one
        update = self.metrics.update
        preds = out.predictions
        last = st.seq
        for r in readings:
            if r.seq <= last:
                out.duplicates.append(r.seq)
                continue
            out.gap += r.seq - last - 1
            last = r.seq
            y_pred = predict(r.x)
            if isinstance(y_pred, float) and not math.isfinite(y_pred):
                out.non_finite += 1
                y_pred = None
            if r.y is not None:
                if y_pred is not None:
                    update(r.y, y_pred)
                learn(r.x, r.y)
            preds.append(Prediction(r.seq, r.ts, y_pred, r.y))
        st.seq = last
        st.learned += len(preds)
        return out
