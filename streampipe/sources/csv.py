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
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import numpy as np
import orjson

from streampipe.readings import Batch, Reading

__all__ = ["CsvError", "CsvSource"]

SNIFF_ROWS = 1000
#: Rows read at a time when iterating readings one by one.
CHUNK_ROWS = 256


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


#: Bytes of a chunk that can only be numbers to JSON (no true/false/null, no brackets).
_NUMERIC_BYTES = b"0123456789.eE+-, \t\r\n"
#: A bare ``-0`` is the integer 0 to JSON, but -0.0 to ``float()``.
_BARE_MINUS_ZERO = re.compile(rb"-0(?![0-9.eE])")


def _numeric_table(lines: list[str], columns: list[int], width: int) -> np.ndarray | None:
    """``columns`` of comma-separated lines when every cell there is a number (read
    exactly as ``float()`` reads it), else None: an empty cell, a word, a short row."""
    table = _json_table(lines, width)
    if table is not None:
        return table[:, columns]
    try:
        table = np.loadtxt(lines, delimiter=",", usecols=columns, dtype=np.float64, ndmin=2)
    except ValueError:
        return None
    return table if len(table) else None


def _json_table(lines: list[str], width: int) -> np.ndarray | None:
    """Lines of exactly ``width`` numbers each, parsed as one JSON array by orjson
    (correctly rounded, so the same doubles as ``float()``, at a quarter of
    ``np.loadtxt``'s cost), else None: let numpy or csv read anything else."""
    if not lines or set(map(str.count, lines, itertools.repeat(","))) != {width - 1}:
        return None
    data = "".join(lines).encode()
    if data.translate(None, _NUMERIC_BYTES) or _BARE_MINUS_ZERO.search(data):
        return None
    try:
        flat = orjson.loads(b"[" + data.replace(b"\n", b",").rstrip(b", \t\r") + b"]")
        table = np.array(flat, dtype=np.float64)
    except (orjson.JSONDecodeError, ValueError, TypeError, OverflowError):
        return None  # "1.", ".5", "+1", "1e999", an empty cell: numpy decides
    return table.reshape(len(lines), width) if table.size == len(lines) * width else None


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
        """The readings one by one (each chunk of rows is stamped when it is read)."""
        for batch in self.batches(CHUNK_ROWS):
            yield from batch.readings()

    def batches(self, rows: int) -> Iterator[Batch]:
        """The file as batches: up to ``rows`` rows at a time, one batch per device.

        Columns are converted with numpy a chunk at a time, so replay costs a few
        microseconds per row rather than a Python dict per reading. Without a time
        column, a chunk's readings are stamped with the clock when the chunk is read.
        """
        if rows < 1:
            raise ValueError("rows must be at least 1")
        index = {name: j for j, name in enumerate(self.header)}
        cols = [index[name] for name in self.features]
        yj = index[self.target]
        dj = index[self.device_column] if self.device_column else None
        tj = index[self.time_column] if self.time_column else None
        width = len(self.header)
        seqs: dict[str, int] = {}
        with self.open_text() as f:
            next(csv.reader(f))  # the header, checked when the source was made
            lines: Iterator[str] = f
            # One device, no time column: orjson (or numpy) parses plain numeric lines,
            # several times faster than csv + float(); any other chunk takes the csv path.
            plain = dj is None and tj is None
            reader = None if plain else csv.reader(lines)
            while True:
                if reader is None:
                    text = list(itertools.islice(lines, rows))
                    if not text:
                        break
                    if any('"' in line for line in text):
                        # Quoted cells may span lines: csv from here to the end.
                        reader = csv.reader(itertools.chain(text, lines))
                        continue
                    table = _numeric_table(text, [*cols, yj], width)
                    if table is not None:
                        first = seqs.get(self.device_id, 0)
                        seqs[self.device_id] = first + len(table)
                        yield self._table_batch(first, table)
                        continue
                    chunk = [row for row in csv.reader(text) if row]
                else:
                    chunk = [row for row in itertools.islice(reader, rows) if row]
                if not chunk:
                    if reader is None:
                        continue  # blank lines only
                    break
                for row in chunk:
                    if len(row) < width:
                        row += [""] * (width - len(row))
                if dj is None:
                    groups = {self.device_id: chunk}
                else:
                    groups = {}
                    for row in chunk:
                        groups.setdefault(row[dj].strip(), []).append(row)
                now = self.clock()
                for device, group in groups.items():
                    first = seqs.get(device, 0)
                    seqs[device] = first + len(group)
                    yield self._batch(device, first, group, cols, yj, tj, now)

    def _table_batch(self, first: int, table: np.ndarray) -> Batch:
        """A batch of fully numeric rows: features, then the target, as numpy read them."""
        n = len(table)
        return Batch(
            device=self.device_id,
            epoch=self.epoch,
            seq=np.arange(first, first + n, dtype=np.int64),
            ts=np.full(n, self.clock()),
            features=self.features,
            values=np.ascontiguousarray(table[:, :-1]),
            target=np.ascontiguousarray(table[:, -1]),
        )

    def _batch(
        self,
        device: str,
        first: int,
        rows: list[list[str]],
        cols: list[int],
        yj: int,
        tj: int | None,
        now: float,
    ) -> Batch:
        n = len(rows)
        values = np.empty((n, len(cols)))
        present = np.ones((n, len(cols)), dtype=bool)
        for k, j in enumerate(cols):
            values[:, k], present[:, k] = self._column([row[j] for row in rows])
        target, has_target = self._column([row[yj] for row in rows])
        if tj is None:
            ts = np.full(n, now)
        else:
            ts = np.array([parse_time(row[tj]) for row in rows], dtype=np.float64)
        return Batch(
            device=device,
            epoch=self.epoch,
            seq=np.arange(first, first + n, dtype=np.int64),
            ts=ts,
            features=self.features,
            values=values,
            present=None if present.all() else present,
            target=target if has_target.any() else None,
            target_present=None if has_target.all() or not has_target.any() else has_target,
        )

    def _column(self, cells: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """A column's values and which cells are not empty (empty = missing)."""
        try:  # the common case: every cell a number
            return np.fromiter(map(float, cells), np.float64, len(cells)), np.ones(len(cells), bool)
        except ValueError:
            pass
        values = np.zeros(len(cells))
        present = np.ones(len(cells), dtype=bool)
        for i, cell in enumerate(cells):
            cell = cell.strip()
            if not cell:
                present[i] = False
                continue
            try:
                values[i] = float(cell)
            except ValueError:
                self.unparsable += 1  # sent as NaN: the edge counts and cleans it
                values[i] = math.nan
        return values, present
