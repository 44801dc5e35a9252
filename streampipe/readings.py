"""Readings and batches: the values that flow from sensors to edge stages.

A :class:`Reading` is one measurement of one device. A :class:`Batch` is a run of
readings of one device, held column by column, which is how they travel on the wire
and how they are decoded.

>>> b = Batch.from_readings([
...     Reading("boiler-1", seq=0, ts=10.0, x={"temp": 21.5, "rh": 40.0}, y=3.0),
...     Reading("boiler-1", seq=1, ts=11.0, x={"temp": 21.6}, y=None),
... ])
>>> b.device, b.features, len(b)
('boiler-1', ('temp', 'rh'), 2)
>>> [r.x for r in b.readings()]
[{'temp': 21.5, 'rh': 40.0}, {'temp': 21.6}]
>>> [r.y for r in b.readings()]
[3.0, None]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Batch", "Reading"]


@dataclass(frozen=True, slots=True)
class Reading:
    """One reading of one device.

    ``seq`` numbers the device's readings within one boot ``epoch``; ``ts`` is the
    time the reading was made (seconds since the Unix epoch); ``x`` holds the feature
    values and ``y`` the target, ``None`` when it is not known.
    """

    device: str
    seq: int
    ts: float
    x: dict[str, float]
    y: float | None = None
    epoch: int = 0


@dataclass(frozen=True, slots=True, eq=False)
class Batch:
    """Readings of one device, column by column.

    ``values[i, j]`` is feature ``features[j]`` of reading ``i``; where ``present`` is
    given, ``present[i, j]`` is False for a value the reading did not carry (its slot in
    ``values`` is then meaningless). ``target`` is ``None`` when no reading carries a
    target; otherwise ``target_present`` (or all-present when ``None``) says which do.
    """

    device: str
    epoch: int
    seq: np.ndarray  # int64, shape (n,)
    ts: np.ndarray  # float64, shape (n,)
    features: tuple[str, ...]
    values: np.ndarray  # float64, shape (n, f)
    present: np.ndarray | None = None  # bool, shape (n, f)
    target: np.ndarray | None = None  # float64, shape (n,)
    target_present: np.ndarray | None = None  # bool, shape (n,)
    _n: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.seq)
        f = len(self.features)
        object.__setattr__(self, "_n", n)
        if self.ts.shape != (n,) or self.values.shape != (n, f):
            raise ValueError(
                f"column shapes disagree: seq {self.seq.shape}, ts {self.ts.shape}, "
                f"values {self.values.shape} for {f} features"
            )
        if not all(isinstance(name, str) for name in self.features):
            raise ValueError("feature names must be strings")
        if self.present is not None and self.present.shape != (n, f):
            raise ValueError("present mask must have the shape of values")
        if self.target is not None and self.target.shape != (n,):
            raise ValueError("target must have one value per reading")
        if self.target_present is not None and (
            self.target is None or self.target_present.shape != (n,)
        ):
            raise ValueError("target_present needs a target column of the same length")

    def __len__(self) -> int:
        return self._n

    @classmethod
    def built(
        cls,
        device: str,
        epoch: int,
        seq: np.ndarray,
        ts: np.ndarray,
        features: tuple[str, ...],
        values: np.ndarray,
        present: np.ndarray | None = None,
        target: np.ndarray | None = None,
        target_present: np.ndarray | None = None,
    ) -> Batch:
        """A batch from columns its caller made consistent (a decoder that checked the
        frame), without the constructor's checks: they cost more than decoding a
        one-reading frame does.

        >>> columns = ("d", 0, np.array([7]), np.array([1.0]), ("t",), np.ones((1, 1)))
        >>> b = Batch.built(*columns)
        >>> len(b), b.same_as(Batch(*columns))
        (1, True)
        """
        b = object.__new__(cls)
        set_ = object.__setattr__
        set_(b, "device", device)
        set_(b, "epoch", epoch)
        set_(b, "seq", seq)
        set_(b, "ts", ts)
        set_(b, "features", features)
        set_(b, "values", values)
        set_(b, "present", present)
        set_(b, "target", target)
        set_(b, "target_present", target_present)
        set_(b, "_n", len(seq))
        return b

    @classmethod
    def from_readings(cls, readings: Sequence[Reading]) -> Batch:
        """Build a batch from readings of one device and one epoch.

        Features are ordered as they first appear, so a reading's ``x`` comes back
        with the same key order it went in with.
        """
        if not readings:
            raise ValueError("a batch holds at least one reading")
        device, epoch = readings[0].device, readings[0].epoch
        first = readings[0].x.keys()
        if all(
            r.device == device and r.epoch == epoch and r.y is not None and r.x.keys() == first
            for r in readings
        ):  # the common case: the same fields, and a target, in every reading
            names_ = tuple(first)
            return cls(
                device=device,
                epoch=epoch,
                seq=np.array([r.seq for r in readings], dtype=np.int64),
                ts=np.array([r.ts for r in readings], dtype=np.float64),
                features=names_,
                values=np.array(
                    [list(map(r.x.__getitem__, names_)) for r in readings], dtype=np.float64
                ).reshape(len(readings), len(names_)),
                target=np.array([r.y for r in readings], dtype=np.float64),
            )
        names: dict[str, int] = {}
        for r in readings:
            if r.device != device or r.epoch != epoch:
                raise ValueError("a batch holds readings of one device and one epoch")
            for k in r.x:
                names.setdefault(k, len(names))
        n, f = len(readings), len(names)
        values = np.zeros((n, f), dtype=np.float64)
        present = np.zeros((n, f), dtype=bool)
        for i, r in enumerate(readings):
            for k, v in r.x.items():
                j = names[k]
                values[i, j] = v
                present[i, j] = True
        has_target = [r.y is not None for r in readings]
        target = target_present = None
        if any(has_target):
            target = np.array([r.y if r.y is not None else 0.0 for r in readings], dtype=np.float64)
            target_present = None if all(has_target) else np.array(has_target, dtype=bool)
        return cls(
            device=device,
            epoch=epoch,
            seq=np.array([r.seq for r in readings], dtype=np.int64),
            ts=np.array([r.ts for r in readings], dtype=np.float64),
            features=tuple(names),
            values=values,
            present=None if present.all() else present,
            target=target,
            target_present=target_present,
        )

    def readings(self) -> Iterator[Reading]:
        """The batch's readings, in order, as :class:`Reading` values."""
        names = self.features
        seqs = self.seq.tolist()
        tss = self.ts.tolist()
        rows = self.values.tolist()
        mask = self.present.tolist() if self.present is not None else None
        ys = self.targets()
        for i in range(self._n):
            row = rows[i]
            if mask is None:
                x = dict(zip(names, row))
            else:
                m = mask[i]
                x = {k: v for k, v, p in zip(names, row, m) if p}
            yield Reading(self.device, seqs[i], tss[i], x, ys[i], self.epoch)

    def targets(self) -> list[float | None]:
        """Each reading's target, ``None`` where it has none."""
        if self.target is None:
            return [None] * self._n
        ys: list[float | None] = self.target.tolist()
        if self.target_present is not None:
            ys = [y if p else None for y, p in zip(ys, self.target_present.tolist())]
        return ys

    def same_as(self, other: Batch) -> bool:
        """True when both batches hold bit-identical readings (NaN, -0.0 included)."""

        def bits(a: np.ndarray | None) -> bytes | None:
            return None if a is None else np.ascontiguousarray(a).tobytes()

        def mask(m: np.ndarray | None, shape: tuple[int, ...]) -> bytes:
            return bits(m if m is not None else np.ones(shape, dtype=bool)) or b""

        if (self.device, self.epoch, self.features, self._n) != (
            other.device,
            other.epoch,
            other.features,
            other._n,
        ):
            return False
        shape = self.values.shape
        mine = mask(self.present, shape)
        theirs = mask(other.present, shape)
        if mine != theirs or bits(self.seq.astype(np.int64)) != bits(other.seq.astype(np.int64)):
            return False
        if bits(self.ts) != bits(other.ts):
            return False
        # Values that are not present carry no meaning: compare only present ones.
        p = np.frombuffer(mine, dtype=bool).reshape(shape)
        if bits(self.values[p]) != bits(other.values[p]):
            return False
        if (self.target is None) != (other.target is None):
            return False
        if self.target is None or other.target is None:
            return True
        tp = mask(self.target_present, (self._n,))
        if tp != mask(other.target_present, (self._n,)):
            return False
        tmask = np.frombuffer(tp, dtype=bool)
        return bits(self.target[tmask]) == bits(other.target[tmask])
