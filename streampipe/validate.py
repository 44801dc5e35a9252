"""Validation and cleaning of decoded readings, one reading at a time.

This is where bad values stop: nothing that leaves :func:`validate` can make a River
model produce NaN or overflow. The rules, applied per reading so that one bad reading
does not cost its neighbours:

- a non-finite feature value (NaN, ±inf) is *cleaned*: dropped from the reading's
  features, which River's models treat as a missing value;
- a feature or target whose magnitude exceeds ``max_abs`` (default 1e15: squares and
  sums of squares stay far from float64 overflow) rejects the reading
  (``value_out_of_range``);
- a non-finite target rejects the reading (``non_finite_target``): a target of NaN
  is a broken label, not a missing one (a missing target is simply absent);
- a non-finite or negative timestamp rejects the reading (``invalid_timestamp``);
- given ``latest`` (the edge's clock plus :data:`MAX_CLOCK_AHEAD`), a timestamp later
  than it rejects the reading (``future_timestamp``), and so does a boot epoch later
  than it in milliseconds (``future_epoch``): one reading cannot make the latency
  histogram's sum −inf, nor move its device's epoch watermark where its next boot
  cannot follow;
- a negative sequence number, or one not above its predecessor in the batch, rejects
  the reading (``invalid_sequence``);
- a reading left with no features rejects (``no_features``);
- for a model that learns labels (see :mod:`streampipe.learn.labels`), a target that is
  not a label rejects the reading (``invalid_label``): ``binary`` labels are 0 or 1,
  ``integer`` labels whole numbers.

>>> from streampipe.readings import Batch, Reading
>>> batch = Batch.from_readings([
...     Reading("d", 0, 1.0, {"a": 1.0, "b": float("nan")}, 2.0),
...     Reading("d", 1, 2.0, {"a": 1e308, "b": 1.0}, 2.0),
... ])
>>> result = validate(batch)
>>> [r.x for r in result.readings], result.cleaned
([{'a': 1.0}], 1)
>>> [(r.seq, r.reason) for r in result.rejected]
[(1, 'value_out_of_range')]
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from streampipe.limits import MAX_CLOCK_AHEAD
from streampipe.readings import Batch, Reading

__all__ = ["DEFAULT_MAX_ABS", "LABELS", "MAX_CLOCK_AHEAD", "Rejection", "Validated", "validate"]

#: Largest accepted magnitude. 1e15² = 1e30, so variances and dot products stay finite.
DEFAULT_MAX_ABS = 1e15
#: What a target must be for a model that learns labels: 0/1, or a whole number.
LABELS = ("binary", "integer")


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one reading (``seq``), or a whole message (``seq is None``), was refused."""

    reason: str
    detail: str
    seq: int | None = None


class Validated:
    """The readings of a batch that may reach a model, and what was refused or cleaned.

    The accepted readings stay columns of the original batch (``index`` names their
    rows, in order, with strictly increasing sequence numbers): a mini-batch learner
    takes them as arrays, a per-reading learner asks for :meth:`features` dicts.
    """

    __slots__ = ("_keep", "_seqs", "_take", "batch", "cleaned", "complete", "index", "rejected")

    def __init__(
        self,
        batch: Batch,
        index: np.ndarray,
        rejected: list[Rejection],
        cleaned: int,
        keep: np.ndarray | None,
    ) -> None:
        self.batch = batch
        self.index = index
        self.rejected = rejected
        self.cleaned = cleaned  # non-finite feature values dropped
        self._seqs: list[int] | None = None
        self._keep = keep  # per-value mask of what is present and finite; None: all are
        # Where every reading is accepted, the batch's own arrays serve as they are.
        self._take: slice | np.ndarray = slice(None) if len(index) == len(batch) else index
        #: True when every accepted reading has every feature, so a model may take the
        #: accepted rows as one matrix.
        self.complete = keep is None or bool(keep[self._take].all())

    def __len__(self) -> int:
        return len(self.index)

    def refuse_from(self, keep: int, reason: str, detail: str) -> Validated:
        """These readings with all but the first ``keep`` accepted ones refused."""
        if keep >= len(self.index):
            return self
        refused = [Rejection(reason, detail, s) for s in self.seqs[keep:]]
        return Validated(
            self.batch, self.index[:keep], self.rejected + refused, self.cleaned, self._keep
        )

    @property
    def seqs(self) -> list[int]:
        """The accepted readings' sequence numbers (made once: learner and stage read them)."""
        if self._seqs is None:
            self._seqs = self.batch.seq[self._take].tolist()
        return self._seqs

    @property
    def timestamps(self) -> np.ndarray:
        return self.batch.ts[self._take]

    @property
    def values(self) -> np.ndarray:
        """The accepted rows' feature values (missing ones are NaN only if not complete)."""
        return self.batch.values[self._take]

    def features(self) -> list[dict[str, float]]:
        """One ``{name: value}`` dict per accepted reading, missing values left out."""
        names = self.batch.features
        rows = self.values.tolist()
        if self.complete:
            if len(rows) < _DICT_OF_FROM:
                return [dict(zip(names, row)) for row in rows]
            return list(itertools.starmap(_dict_of(names), rows))
        kept = self._keep[self._take].tolist()  # type: ignore[index]
        return [{k: v for k, v, p in zip(names, row, mask) if p} for row, mask in zip(rows, kept)]

    def targets(self) -> list[float | None]:
        """Each accepted reading's target, or None where it has none."""
        b = self.batch
        if b.target is None:
            return [None] * len(self.index)
        ys = b.target[self._take].tolist()
        if b.target_present is None:
            return ys
        has = b.target_present[self._take].tolist()
        return [y if h else None for y, h in zip(ys, has)]

    def labels(self, kind: str) -> list[bool | int | None]:
        """Each accepted reading's target as a label: ``binary`` 0/1 as False/True,
        ``integer`` as an int; None where it has none. :func:`validate` with the same
        ``labels`` has refused every target that is not one."""
        b = self.batch
        if b.target is None:
            return [None] * len(self.index)
        y = b.target[self._take]
        ys = (y == 1.0).tolist() if kind == "binary" else y.astype(np.int64).tolist()
        if b.target_present is None:
            return ys
        has = b.target_present[self._take].tolist()
        return [v if h else None for v, h in zip(ys, has)]

    @property
    def readings(self) -> list[Reading]:
        """The accepted readings as :class:`Reading` objects (for tests and tools)."""
        b = self.batch
        return [
            Reading(b.device, seq, ts, x, y, b.epoch)
            for seq, ts, x, y in zip(
                self.seqs, self.timestamps.tolist(), self.features(), self.targets()
            )
        ]


#: Batches at least this long get their dicts from :func:`_dict_of`: compiling one
#: costs ~60 µs, saving ~0.2 µs a reading, so a schema pays it back within a few
#: batches, and even a cache thrashed by more schemas than it holds costs a batch
#: of this size no more than ~1 µs a reading.
_DICT_OF_FROM = 64


@functools.lru_cache(maxsize=256)
def _dict_of(names: tuple[str, ...]) -> Callable[..., dict[str, float]]:
    """A function of one value per feature that returns the reading's ``{name: value}``.

    It is a dict display with the names as constant keys, built once per schema the
    way :func:`collections.namedtuple` builds its classes: ~40 % cheaper per reading
    than ``dict(zip(names, row))``, the largest cost of a stage besides River itself.
    Each name enters the source as its ``repr``, an inert string literal.

    >>> _dict_of(("a", "b'); import os; ('"))(1.0, 2.0)
    {'a': 1.0, "b'); import os; ('": 2.0}
    """
    args = ", ".join(f"v{i}" for i in range(len(names)))
    items = ", ".join(f"{name!r}: v{i}" for i, name in enumerate(names))
    return eval(f"lambda {args}: {{{items}}}", {})  # the names enter as literals


def validate(
    batch: Batch,
    max_abs: float = DEFAULT_MAX_ABS,
    labels: str | None = None,
    latest: float = math.inf,
) -> Validated:
    """Split a batch into clean readings and per-reading rejections; ``labels`` (one of
    :data:`LABELS`) also refuses targets that are not labels of that kind, and
    ``latest`` (seconds since the Unix epoch) timestamps and boot epochs after it."""
    if (
        _all_clean(batch, max_abs)
        and (labels is None or _all_labels(batch, labels))
        and (latest == math.inf or _all_in_time(batch, latest))
    ):
        return Validated(batch, np.arange(len(batch)), [], 0, None)
    return _apply_rules(batch, max_abs, labels, latest)


def _all_in_time(batch: Batch, latest: float) -> bool:
    ts = batch.ts
    late = ts[0] > latest if len(ts) == 1 else bool((ts > latest).any())
    return not late and batch.epoch <= latest * 1000


def _not_label(y: np.ndarray, labels: str) -> np.ndarray:
    if labels == "binary":
        return (y != 0.0) & (y != 1.0)
    if labels == "integer":
        return y != np.round(y)
    raise ValueError(f"labels must be one of {', '.join(LABELS)}, not {labels!r}")


def _all_labels(batch: Batch, labels: str) -> bool:
    y = batch.target
    if y is None:
        return True
    if batch.target_present is not None:  # absent targets' slots hold anything: ask the rules
        return False
    return not _not_label(y, labels).any()


def _apply_rules(
    batch: Batch, max_abs: float, labels: str | None = None, latest: float = math.inf
) -> Validated:
    n = len(batch)
    values = batch.values
    present = batch.present

    finite = np.isfinite(values)
    all_finite = bool(finite.all())
    if all_finite and present is None:
        keep = None
        cleaned = 0
        too_big = np.abs(values) > max_abs
    else:
        present = present if present is not None else np.ones(values.shape, bool)
        with np.errstate(invalid="ignore"):
            too_big = finite & (np.abs(values) > max_abs) & present
        keep = present & finite  # cleaned: present but non-finite values are dropped
        cleaned = int(np.count_nonzero(present & ~finite))

    seq = batch.seq
    bad = [
        ((seq < 0) | (seq <= np.concatenate(([-1], seq[:-1]))), "invalid_sequence"),
        (~np.isfinite(batch.ts) | (batch.ts < 0), "invalid_timestamp"),
        (np.full(n, batch.epoch > latest * 1000), "future_epoch"),
        (batch.ts > latest, "future_timestamp"),
        (too_big.any(axis=1), "value_out_of_range"),
    ]
    if batch.target is not None:
        y = batch.target
        has_y = batch.target_present if batch.target_present is not None else True
        finite_y = np.isfinite(y)
        bad.append((has_y & ~finite_y, "non_finite_target"))
        with np.errstate(invalid="ignore"):
            bad.append((has_y & finite_y & (np.abs(y) > max_abs), "value_out_of_range"))
            if labels is not None:
                bad.append((has_y & finite_y & _not_label(y, labels), "invalid_label"))
    if keep is not None:
        bad.append((~keep.any(axis=1), "no_features"))
    elif values.shape[1] == 0:
        bad.append((np.ones(n, bool), "no_features"))

    refused = np.zeros(n, bool)
    for mask, _ in bad:
        refused |= mask
    rejected: list[Rejection] = []
    if refused.any():
        seqs = seq.tolist()
        for i in np.flatnonzero(refused).tolist():
            why = next(why for mask, why in bad if mask[i])  # the first rule that applies
            rejected.append(Rejection(why, _DETAILS[why], seqs[i]))
    return Validated(batch, np.flatnonzero(~refused), rejected, cleaned, keep)


def _all_clean(batch: Batch, max_abs: float) -> bool:
    """True when no rule below applies to any reading: the common case, in a few
    whole-array comparisons (each false for NaN), which matters for small batches."""
    seq, ts, y = batch.seq, batch.ts, batch.target
    if len(seq) == 1:  # one reading: plain Python, numpy's per-call cost would dominate
        m = max_abs
        return (
            batch.present is None
            and batch.values.shape[1] > 0
            and all(-m <= v <= m for v in batch.values[0].tolist())
            and seq[0] >= 0
            and 0 <= ts[0] < math.inf
            and (y is None or -m <= y[0] <= m)
        )
    return (
        seq.size > 0
        and batch.present is None
        and batch.values.shape[1] > 0
        and bool((np.abs(batch.values) <= max_abs).all())
        and seq[0] >= 0
        and (len(seq) == 1 or bool((seq[1:] > seq[:-1]).all()))
        and bool(((ts >= 0) & (ts < np.inf)).all())
        and (y is None or bool((np.abs(y) <= max_abs).all()))
    )


_DETAILS = {
    "invalid_sequence": "sequence number negative or not above the previous one in its batch",
    "invalid_timestamp": "timestamp is not a finite, non-negative number",
    "value_out_of_range": f"a value's magnitude exceeds the limit ({DEFAULT_MAX_ABS:g} by default)",
    "non_finite_target": "target is NaN or infinite",
    "future_epoch": "boot epoch is later than the edge's clock (in ms) allows",
    "future_timestamp": "timestamp is later than the edge's clock allows",
    "no_features": "no finite feature values",
    "invalid_label": "target is not a label of this model (0 or 1 for a binary one, "
    "a whole number for a multiclass one)",
}
