"""Readings from a CSV file with a header, for ``streampipe replay``.

Every numeric column other than the target, device and time columns is a feature
(a column is numeric when each non-empty cell among the first 1,000 rows parses as a
float). Values are sent as they are in the file: ``nan``, ``inf`` and ``1e308`` go out
unchanged, because validating them is the edge's job; an empty cell is a missing value.

>>> import io
>>> src = CsvSource.from_text("t,temp,power\\n1.5,21.5,300\\n2.5,,310\\n", target="power",
...                           time_column="t", device_id="boiler-1")
>>> src.features
('temp',)
>>> [(r.seq, r.ts, r.x, r.y) for r in src]
[(0, 1.5, {'temp': 21.5}, 300.0), (1, 2.5, {}, 310.0)]
"""

from __future__ import annotations

import csv
import io
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from streampipe.readings import Reading

__all__ = ["CsvError", "CsvSource"]

SNIFF_ROWS = 1000


class CsvError(ValueError):
    """The file cannot be replayed as asked (missing column, non-numeric target, …)."""


def _is_float(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def parse_time(cell: str) -> float:
    """Seconds since the Unix epoch from a number or an ISO 8601 date (naive = UTC)."""
    try:
        return float(cell)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(cell.strip())
    except ValueError:
        raise CsvError(f"time value {cell!r} is neither a number nor an ISO 8601 date") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


@dataclass
class CsvSource:
    """Iterates a CSV file's rows as readings, numbering each device's readings from 0."""

    open_text: Callable[[], TextIO]
    target: str
    device_id: str = "device"
    device_column: str | None = None
    time_column: str | None = None
    epoch: int = 0
    clock: Callable[[], float] = time.time
    features: tuple[str, ...] = field(init=False)
    header: tuple[str, ...] = field(init=False)
    unparsable: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        with self.open_text() as f:
            reader = csv.reader(f)
            try:
                header = tuple(h.strip() for h in next(reader))
            except StopIteration:
                raise CsvError("the file is empty: a header row is needed") from None
            sample = list(itertools.islice(reader, SNIFF_ROWS))
        if len(set(header)) != len(header):
            raise CsvError("the header names a column twice")
        self.header = header
        for what, col in (
            ("target", self.target),
            ("device", self.device_column),
            ("time", self.time_column),
        ):
            if col is not None and col not in header:
                raise CsvError(
                    f"{what} column {col!r} is not in the header (columns: {', '.join(header)})"
                )
        special = {self.target, self.device_column, self.time_column}
        numeric = []
        for j, name in enumerate(header):
            cells = [row[j] for row in sample if j < len(row) and row[j].strip()]
            if cells and all(_is_float(c) for c in cells):
                numeric.append(name)
        if self.target not in numeric:
            raise CsvError(f"target column {self.target!r} is not numeric")
        self.features = tuple(n for n in numeric if n not in special)
        if not self.features:
            raise CsvError("the file has no numeric feature columns besides the target")

    @classmethod
    def from_path(cls, path: str | Path, **kwargs: object) -> CsvSource:
        p = Path(path)
        if not p.is_file():
            raise CsvError(f"no such file: {p}")
        kwargs.setdefault("device_id", p.stem)
        return cls(lambda: open(p, newline="", encoding="utf-8-sig"), **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_text(cls, text: str, **kwargs: object) -> CsvSource:
        return cls(lambda: io.StringIO(text), **kwargs)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Reading]:
        index = {name: j for j, name in enumerate(self.header)}
        feats = [(name, index[name]) for name in self.features]
        yj = index[self.target]
        dj = index[self.device_column] if self.device_column else None
        tj = index[self.time_column] if self.time_column else None
        seqs: dict[str, int] = {}
        with self.open_text() as f:
            reader = csv.reader(f)
            next(reader)
            for row in reader:
                if not row:
                    continue
                row += [""] * (len(self.header) - len(row))
                device = row[dj].strip() if dj is not None else self.device_id
                x: dict[str, float] = {}
                for name, j in feats:
                    cell = row[j].strip()
                    if cell:
                        x[name] = self._number(cell)
                ycell = row[yj].strip()
                y = self._number(ycell) if ycell else None
                ts = parse_time(row[tj]) if tj is not None else self.clock()
                seq = seqs.get(device, 0)
                seqs[device] = seq + 1
                yield Reading(device, seq, ts, x, y, self.epoch)

    def _number(self, cell: str) -> float:
        try:
            return float(cell)
        except ValueError:
            self.unparsable += 1  # sent as NaN: the edge counts and cleans it
            return float("nan")
