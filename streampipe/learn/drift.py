"""Concept drift: a River drift detector on each device's error stream.

A stage that serves a model keeps asking whether the model still fits the stream.
:class:`DriftMonitor` feeds each scored prediction's error — absolute error for a
regressor, 0/1 for a classifier — to a River detector of its own per device
(``drift.ADWIN`` or ``drift.PageHinkley``) and reports a :class:`Drift` when the
detector fires *and the error went up*: River's detectors also fire when a model gets
better (a learning curve, a problem that got easier), which needs no one's attention.

``error_before`` is the mean error from the previous drift (or the start) up to the
last :data:`CONTEXT` scored readings, ``error_after`` the mean of those last ones, up
to and including the reading that made the detector fire; ADWIN needs a few dozen
readings of evidence, so the last ones are mostly after the change.

Detectors:

- ``adwin`` (the default): ``drift.ADWIN()`` with River's defaults (delta 0.002). It
  compares sub-windows with a bound that adapts to the errors' variance, so it needs
  no tuning to the errors' scale, and costs ~0.15 µs a reading.
- ``page-hinkley``: ``drift.PageHinkley(mode="up")`` with River's other defaults
  (threshold 50, delta 0.005). Its threshold is in units of the error: right for 0/1
  errors and errors of a few units, too sensitive for errors in hundreds.

>>> m = DriftMonitor("adwin")
>>> errors = [0.0] * 300 + [1.0] * 100
>>> y_true = [False] * len(errors)
>>> y_pred = [e == 1.0 for e in errors]
>>> (d,) = m.update("d1", y_true, y_pred, list(range(400)), [0.0] * 400, classifier=True)
>>> d.seq, d.error_before, d.error_after
(319, 0.0, 0.4)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from river import drift

__all__ = ["CONTEXT", "DETECTORS", "Drift", "DriftMonitor", "make_detector"]

#: Detectors a stage can run, by the name ``--drift`` takes.
DETECTORS = ("adwin", "page-hinkley")
#: Readings that ``error_after`` covers (see the module's docstring).
CONTEXT = 50


def make_detector(name: str) -> Any:
    """A new River drift detector for one error stream."""
    if name == "adwin":
        return drift.ADWIN()
    if name == "page-hinkley":
        return drift.PageHinkley(mode="up")  # only a growing error is a drift worth a look
    raise ValueError(f"drift detector must be one of {', '.join(DETECTORS)}, not {name!r}")


@dataclass(frozen=True, slots=True)
class Drift:
    """A detected rise of one device's error: where, and by how much."""

    device: str
    seq: int
    ts: float
    error_before: float
    error_after: float


class _Stream:
    """One device's detector and what ``error_before``/``error_after`` are made of."""

    __slots__ = ("detector", "recent", "since_count", "since_sum")

    def __init__(self, detector: Any) -> None:
        self.detector = detector
        self.recent: deque[float] = deque(maxlen=CONTEXT)
        self.since_sum = 0.0  # errors since the previous drift or the start
        self.since_count = 0


class DriftMonitor:
    """A drift detector per device on the errors of one model's predictions."""

    def __init__(self, detector: str = "adwin") -> None:
        make_detector(detector)  # a bad name fails here, at start-up
        self.detector = detector
        self._streams: dict[str, _Stream] = {}

    def reset(self, device: str) -> None:
        """Forget a device's errors: its model was replaced, its errors start anew."""
        self._streams.pop(device, None)

    def update(
        self,
        device: str,
        y_true: Sequence[Any],
        y_pred: Sequence[Any],
        seqs: Sequence[int],
        ts: Sequence[float],
        *,
        classifier: bool,
    ) -> list[Drift]:
        """Feed one batch's scored predictions; return the rises of error detected."""
        st = self._streams.get(device)
        if st is None:
            st = self._streams[device] = _Stream(make_detector(self.detector))
        det, recent = st.detector, st.recent
        update, append = det.update, recent.append
        found: list[Drift] = []
        for y, p, seq, t in zip(y_true, y_pred, seqs, ts):
            if y is None or p is None:
                continue
            e = float(p != y) if classifier else abs(y - p)
            update(e)
            append(e)
            st.since_sum += e
            st.since_count += 1
            if det.drift_detected:
                drift = self._measure(device, st, seq, t)
                if drift is not None:
                    found.append(drift)
        return found

    @staticmethod
    def _measure(device: str, st: _Stream, seq: int, ts: float) -> Drift | None:
        recent = sum(st.recent)
        n_before = st.since_count - len(st.recent)
        before = (st.since_sum - recent) / n_before if n_before > 0 else None
        after = recent / len(st.recent)
        st.since_sum, st.since_count = 0.0, 0
        if before is None or after <= before:
            return None  # the model got better, or there is nothing to compare with
        return Drift(device, seq, ts, before, after)
