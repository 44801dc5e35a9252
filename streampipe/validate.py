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
- a negative sequence number, or one not above its predecessor in the batch, rejects
  the reading (``invalid_sequence``);
- a reading left with no features rejects (``no_features``).

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

from dataclasses import dataclass, field

import numpy as np

from streampipe.readings import Batch, Reading

__all__ = ["DEFAULT_MAX_ABS", "Rejection", "Validated", "validate"]

#: Largest accepted magnitude. 1e15² = 1e30, so variances and dot products stay finite.
DEFAULT_MAX_ABS = 1e15


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one reading (``seq``), or a whole message (``seq is None``), was refused."""

    reason: str
    detail: str
    seq: int | None = None


@dataclass(slots=True)
class Validated:
    """The readings of a batch that may reach a model, and what was refused or cleaned."""

    readings: list[Reading] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    cleaned: int = 0  # non-finite feature values dropped


def validate(batch: Batch, max_abs: float = DEFAULT_MAX_ABS) -> Validated:
    """Split a batch into clean readings and per-reading rejections."""
    n = len(batch)
    out = Validated()
    values = batch.values
    present = batch.present if batch.present is not None else np.ones(values.shape, bool)

    finite = np.isfinite(values)
    with np.errstate(invalid="ignore"):
        too_big = finite & (np.abs(values) > max_abs) & present
    keep = present & finite  # cleaned: present but non-finite values are dropped
    out.cleaned = int(np.count_nonzero(present & ~finite))

    reason = np.full(n, "", dtype=object)

    def reject(mask: np.ndarray, why: str) -> None:
        reason[(reason == "") & mask] = why

    seq = batch.seq
    previous = np.concatenate(([-1], seq[:-1])) if n else seq
    reject((seq < 0) | (seq <= previous), "invalid_sequence")
    reject(~np.isfinite(batch.ts) | (batch.ts < 0), "invalid_timestamp")
    reject(too_big.any(axis=1), "value_out_of_range")
    if batch.target is not None:
        y = batch.target
        has_y = batch.target_present if batch.target_present is not None else np.ones(n, bool)
        reject(has_y & ~np.isfinite(y), "non_finite_target")
        with np.errstate(invalid="ignore"):
            reject(has_y & np.isfinite(y) & (np.abs(y) > max_abs), "value_out_of_range")
    reject(~keep.any(axis=1), "no_features")

    names = batch.features
    seqs = seq.tolist()
    tss = batch.ts.tolist()
    rows = values.tolist()
    all_kept = bool(keep.all())
    kept = None if all_kept else keep.tolist()
    ys = batch.targets()
    device, epoch = batch.device, batch.epoch
    reasons = reason.tolist()
    for i in range(n):
        why = reasons[i]
        if why:
            out.rejected.append(Rejection(why, _DETAILS[why], seqs[i]))
            continue
        if kept is None:
            x = dict(zip(names, rows[i]))
        else:
            x = {k: v for k, v, p in zip(names, rows[i], kept[i]) if p}
        out.readings.append(Reading(device, seqs[i], tss[i], x, ys[i], epoch))
    return out


_DETAILS = {
    "invalid_sequence": "sequence number negative or not above the previous one in its batch",
    "invalid_timestamp": "timestamp is not a finite, non-negative number",
    "value_out_of_range": f"a value's magnitude exceeds the limit ({DEFAULT_MAX_ABS:g} by default)",
    "non_finite_target": "target is NaN or infinite",
    "no_features": "no finite feature values",
}
