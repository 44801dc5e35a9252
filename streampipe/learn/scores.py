"""How well a stage's model predicts: metrics since start and over a rolling window.

A stage scores every prediction whose reading carries a target, in River's
progressive-validation order. Scores are updated a batch at a time:

- :class:`RegressionScores` keeps MAE, RMSE and R² with running sums (since start)
  and a ring buffer of the last ``window`` pairs (rolling). It computes the same
  quantities as River's ``metrics.MAE``/``RMSE``/``R2`` and ``utils.Rolling`` — the
  tests hold it to River's numbers on random data — at a small fraction of the cost:
  updating three River metrics and their rolling twins reading by reading took more
  time than the model's own ``learn_one``.
- :class:`BinaryScores` does the same for binary classifiers: River's ``Accuracy``,
  ``F1`` (positive class ``True``) and ``ROCAUC`` (River's default 10 thresholds, on
  the probability of ``True``), from counts: River's own six objects (three metrics and
  their rolling twins) cost ~17 µs a reading, more than ``StandardScaler |
  LogisticRegression`` itself (~14 µs).
- :class:`AnomalyScores`: River's ``ROCAUC`` of anomaly scores against 0/1 labels.
- :class:`ClassificationScores` drives River's own ``metrics.Accuracy`` and
  ``MacroF1`` (and their rolling twins) pair by pair, for multiclass models: their
  labels are not known in advance.

>>> s = RegressionScores(window=2)
>>> s.update_many([3.0, -0.5, 2.0, 7.0], [2.5, 0.0, 2.0, 8.0])
>>> d = s.as_dict()
>>> d["count"], round(d["progressive"]["mae"], 6), round(d["progressive"]["r2"], 4)
(4, 0.5, 0.9486)
>>> d["rolling"]["mae"]  # the last two pairs only
0.5
>>> s.update_many([1.0, None], [None, 2.0])  # a pair without both sides is not scored
>>> s.as_dict()["count"]
4

Until a prediction has been scored, every metric is ``None`` (``null`` in the metrics
message, no sample in Prometheus): a 0.0 there would read as a real score.

>>> RegressionScores().as_dict()["progressive"]
{'mae': None, 'rmse': None, 'r2': None}
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import numpy as np
from river import metrics, utils

__all__ = [
    "AnomalyScores",
    "BinaryScores",
    "ClassificationScores",
    "RegressionScores",
    "Scores",
    "scores_for",
]

#: Rolling metrics cover the last this many scored predictions of a stage.
DEFAULT_WINDOW = 1000
#: Pairs collected before they are summed: numpy's per-call cost dominates below this.
PENDING_PAIRS = 256


class Scores(Protocol):
    """What a learner needs from its scoreboard."""

    window: int

    def update_many(self, y_true: Sequence[Any], y_pred: Sequence[Any]) -> None: ...

    def as_dict(self) -> dict[str, Any]: ...


def _finite(v: float | None) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def _pairs(y_true: Sequence[Any], y_pred: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """The (target, prediction) pairs where both are present, as float arrays."""
    if None in y_true or None in y_pred:
        both = [(t, p) for t, p in zip(y_true, y_pred) if t is not None and p is not None]
        if not both:
            return np.empty(0), np.empty(0)
        t, p = zip(*both)
        return np.asarray(t, dtype=float), np.asarray(p, dtype=float)
    return np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)


def _r2(sse: float, sst: float, n: int) -> float:
    """River's R²: 0.0 below two samples or for a constant target."""
    if n < 2 or sst == 0:
        return 0.0
    return 1.0 - sse / sst


class _Shared:
    """A scoreboard the worker updates and a scrape reads, under a lock; checkpointed
    (pickled) with what is pending scored first, and without the lock."""

    _lock: threading.Lock

    def _flush(self) -> None:
        """Score what waits to be scored (nothing, unless a subclass batches)."""

    def __getstate__(self) -> dict[str, Any]:
        with self._lock:
            self._flush()
            state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class RegressionScores(_Shared):
    """MAE, RMSE and R², progressive and over the last ``window`` scored pairs."""

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self.count = 0
        self._abs = 0.0  # sum of |y - p|
        self._sq = 0.0  # sum of (y - p)²
        self._mean = 0.0  # mean of y (Welford/Chan, for R²'s total sum of squares)
        self._m2 = 0.0  # sum of (y - mean)²
        self._y = np.zeros(window)
        self._p = np.zeros(window)
        self._next = 0  # where the next pair goes in the ring
        self._pending_y: list[Any] = []
        self._pending_p: list[Any] = []
        self._lock = threading.Lock()  # the worker updates, a scrape reads

    def update_many(self, y_true: Sequence[Any], y_pred: Sequence[Any]) -> None:
        """Score pairs; small batches wait in a list and are summed with numpy together."""
        with self._lock:
            self._pending_y.extend(y_true)
            self._pending_p.extend(y_pred)
            if len(self._pending_y) >= PENDING_PAIRS:
                self._flush()

    def _flush(self) -> None:
        y, p = _pairs(self._pending_y, self._pending_p)
        self._pending_y, self._pending_p = [], []
        n = len(y)
        if n == 0:
            return
        err = y - p
        self._abs += float(np.abs(err).sum())
        self._sq += float((err * err).sum())
        # Chan et al.'s merge of (count, mean, M2) with the batch's own.
        batch_mean = float(y.mean())
        batch_m2 = float(((y - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self._mean
        self._m2 += batch_m2 + delta * delta * self.count * n / total
        self._mean += delta * n / total
        self.count = total
        # The ring keeps the newest ``window`` pairs.
        if n >= self.window:
            self._y[:] = y[-self.window :]
            self._p[:] = p[-self.window :]
            self._next = 0
            return
        end = self._next + n
        if end <= self.window:
            self._y[self._next : end] = y
            self._p[self._next : end] = p
        else:
            split = self.window - self._next
            self._y[self._next :], self._y[: n - split] = y[:split], y[split:]
            self._p[self._next :], self._p[: n - split] = p[:split], p[split:]
        self._next = end % self.window

    def _rolling(self) -> dict[str, float | None]:
        n = min(self.count, self.window)
        if n == 0:
            return dict.fromkeys(("mae", "rmse", "r2"))
        y, p = self._y[:n], self._p[:n]
        err = y - p
        sq = float((err * err).sum())
        return {
            "mae": _finite(float(np.abs(err).sum()) / n),
            "rmse": _finite(math.sqrt(sq / n)),
            "r2": _finite(_r2(sq, float(((y - y.mean()) ** 2).sum()), n)),
        }

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            self._flush()
            return self._as_dict()

    def _as_dict(self) -> dict[str, Any]:
        n = self.count
        progressive = {
            "mae": _finite(self._abs / n) if n else None,
            "rmse": _finite(math.sqrt(self._sq / n)) if n else None,
            "r2": _finite(_r2(self._sq, self._m2, n)) if n else None,
        }
        return {
            "count": n,
            "progressive": progressive,
            "rolling": self._rolling(),
            "window": self.window,
        }


class BinaryScores(_Shared):
    """River's Accuracy, F1 and ROCAUC of a binary model, progressive and rolling.

    ``update_many(y_true, y_pred, p_true)`` takes labels (``True`` is the positive
    class), the predicted labels and the probabilities of ``True`` (as River's
    ``ROCAUC`` reads them: ``predict_proba_one(x).get(True, 0.0)``).

    >>> s = BinaryScores(window=2)
    >>> s.update_many([True, False, True], [True, True, False], [0.9, 0.6, 0.4])
    >>> d = s.as_dict()
    >>> d["count"], round(d["progressive"]["accuracy"], 4), d["progressive"]["f1"]
    (3, 0.3333, 0.5)
    >>> d["rolling"]["accuracy"], d["progressive"]["rocauc"]
    (0.0, 0.5)
    """

    NAMES: ClassVar[tuple[str, ...]] = ("accuracy", "f1", "rocauc")
    #: River's ``ROCAUC`` default: the ROC curve is read at this many thresholds.
    THRESHOLDS = 10

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self.count = 0
        # River's thresholds, nudged out of [0, 1] at both ends exactly as River does.
        t = [i / (self.THRESHOLDS - 1) for i in range(self.THRESHOLDS)]
        t[0] -= 1e-7
        t[-1] += 1e-7
        self._thresholds = np.asarray(t)
        self._counts = np.zeros(4, dtype=np.int64)  # correct, tp, fp, fn (decisions)
        self._positives = 0
        self._roc = np.zeros((2, self.THRESHOLDS), dtype=np.int64)  # tp, fp per threshold
        self._y = np.zeros(window, dtype=bool)
        self._d = np.zeros(window, dtype=bool)
        self._s = np.zeros(window)
        self._next = 0
        self._pending: list[tuple[Any, Any, Any]] = []
        self._lock = threading.Lock()  # the worker updates, a scrape reads

    def update_many(
        self, y_true: Sequence[Any], y_pred: Sequence[Any], p_true: Sequence[Any]
    ) -> None:
        """Score triples; a triple without a label or a prediction is not scored."""
        with self._lock:
            self._pending.extend(zip(y_true, y_pred, p_true))
            if len(self._pending) >= PENDING_PAIRS:
                self._flush()

    def _flush(self) -> None:
        kept = [t for t in self._pending if t[0] is not None and t[1] is not None]
        self._pending = []
        if not kept:
            return
        ys, ds, ss = zip(*kept)
        y = np.asarray(ys, dtype=bool)
        d = np.asarray(ds, dtype=bool)
        s = np.asarray([math.nan if v is None else v for v in ss], dtype=float)
        self._counts += _decision_counts(y, d)
        self._positives += int(y.sum())
        self._roc += _roc_counts(y, s, self._thresholds)
        self.count += len(y)
        n = len(y)
        if n >= self.window:
            self._y[:], self._d[:], self._s[:] = (
                y[-self.window :],
                d[-self.window :],
                s[-self.window :],
            )
            self._next = 0
            return
        idx = (self._next + np.arange(n)) % self.window
        self._y[idx], self._d[idx], self._s[idx] = y, d, s
        self._next = (self._next + n) % self.window

    def _values(
        self, n: int, counts: np.ndarray, positives: int, roc: np.ndarray
    ) -> dict[str, float | None]:
        if n == 0:  # nothing scored: no value, rather than River's 0.0
            return dict.fromkeys(self.NAMES)
        correct, tp, fp, fn = counts.tolist()
        values = {
            "accuracy": correct / n,
            "f1": _f1(tp, fp, fn),
            "rocauc": _rocauc(roc, positives, n - positives),
        }
        return {k: _finite(values[k]) for k in self.NAMES}

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            self._flush()
            n = min(self.count, self.window)
            y, d, s = self._y[:n], self._d[:n], self._s[:n]
            rolling = self._values(
                n, _decision_counts(y, d), int(y.sum()), _roc_counts(y, s, self._thresholds)
            )
            return {
                "count": self.count,
                "progressive": self._values(self.count, self._counts, self._positives, self._roc),
                "rolling": rolling,
                "window": self.window,
            }


class AnomalyScores(BinaryScores):
    """River's ROCAUC of anomaly scores against labels (``True``: an anomaly).

    River's ``ROCAUC`` reads the curve at thresholds in [0, 1], so it suits detectors
    whose scores lie there (``HalfSpaceTrees``); scores of other scales need scaling.

    >>> s = AnomalyScores(window=10)
    >>> s.update_many([False, False, True, True], [0.1, 0.4, 0.35, 0.8])
    >>> s.as_dict()["progressive"]  # River's value; the exact area is 0.75
    {'rocauc': 0.875}
    """

    NAMES: ClassVar[tuple[str, ...]] = ("rocauc",)

    def update_many(  # type: ignore[override]
        self, y_true: Sequence[Any], y_pred: Sequence[Any], p_true: Sequence[Any] | None = None
    ) -> None:
        """Score (label, anomaly score) pairs."""
        super().update_many(y_true, y_pred, y_pred if p_true is None else p_true)


def _decision_counts(y: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.array(
        [
            np.count_nonzero(y == d),
            np.count_nonzero(y & d),
            np.count_nonzero(~y & d),
            np.count_nonzero(y & ~d),
        ],
        dtype=np.int64,
    )


def _roc_counts(y: np.ndarray, s: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    above = s[:, None] > thresholds[None, :]  # NaN is above nothing, as in River
    return np.stack([(above & y[:, None]).sum(axis=0), (above & ~y[:, None]).sum(axis=0)])


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def _f1(tp: int, fp: int, fn: int) -> float:
    """River's ``F1``: its FBeta with beta 1, 0.0 where a ratio is undefined."""
    p, r, b2 = _div(tp, tp + fp), _div(tp, tp + fn), 1.0
    try:
        return (1 + b2) * p * r / (b2 * p + r)
    except ZeroDivisionError:
        return 0.0


def _rocauc(roc: np.ndarray, positives: int, negatives: int) -> float:
    """River's ``ROCAUC.get``: the trapezoidal area under the thresholded ROC curve."""
    from scipy import integrate  # as River does; scipy is one of River's dependencies

    tp, fp = roc.tolist()
    tprs = [_div(t, positives) for t in tp]
    fprs = [_div(f, negatives) for f in fp]
    return float(-integrate.trapezoid(x=fprs, y=tprs))


class ClassificationScores(_Shared):
    """River's Accuracy and MacroF1 since start and over the last ``window`` scored
    pairs, for multiclass models (labels of any number of classes)."""

    FACTORIES: ClassVar[dict[str, Any]] = {
        "accuracy": metrics.Accuracy,
        "macro_f1": metrics.MacroF1,
    }

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        self.window = window
        self.count = 0
        self.progressive = {name: make() for name, make in self.FACTORIES.items()}
        self.rolling = {
            name: utils.Rolling(make, window_size=window) for name, make in self.FACTORIES.items()
        }
        self._lock = threading.Lock()  # the worker updates, a scrape reads

    def update_many(
        self, y_true: Sequence[Any], y_pred: Sequence[Any], p_true: Sequence[Any] | None = None
    ) -> None:
        """Score pairs; ``p_true`` is not used (no multiclass ROC AUC)."""
        ms = [*self.progressive.values(), *self.rolling.values()]
        with self._lock:
            for t, p in zip(y_true, y_pred):
                if t is None or p is None:
                    continue
                for m in ms:
                    m.update(t, p)
                self.count += 1

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            scored = self.count > 0  # else no value, rather than River's 0.0
            return {
                "count": self.count,
                "progressive": {
                    k: _finite(m.get()) if scored else None for k, m in self.progressive.items()
                },
                "rolling": {
                    k: _finite(m.get()) if scored else None for k, m in self.rolling.items()
                },
                "window": self.window,
            }


def scores_for(kind: str, window: int = DEFAULT_WINDOW, labels: str | None = None) -> Scores:
    """The scoreboard for a model kind (``"regressor"``, ``"classifier"`` or
    ``"anomaly"``) and, for a classifier, its labels (``"binary"`` or ``"integer"``)."""
    if kind == "anomaly":
        return AnomalyScores(window)
    if kind == "classifier":
        return BinaryScores(window) if labels == "binary" else ClassificationScores(window)
    return RegressionScores(window)
