"""Readings from a CSV file with a header, for ``streampipe replay``.

Every column other than the target, device and time columns whose cells (among the first
1,000 rows) are mostly numbers is a feature, unless ``feature_columns`` names the features.
Values are sent as they are in the file: ``nan``, ``inf`` and ``1e308`` go out unchanged,
because validating them is the edge's job; an empty cell is a missing value, and a
feature cell that is not a number is sent as NaN and counted (:attr:`CsvSource.unparsable`,
with the first few in :attr:`CsvSource.unparsable_examples`). A target cell must be a
number or empty: anything else is a :class:`CsvError` naming its row (the header is
row 1), column and value, as is a bad time or device cell.

>>> src = CsvSource.from_text("t,temp,power\\n1.5,21.5,300\\n2.5,,310\\n", target="power",
...                           time_column="t", device_id="boiler-1")
>>> src.features
('temp',)
>>> [(r.seq, r.ts, r.x, r.y) for r in src]
[(0, 1.5, {'temp': 21.5}, 300.0), (1, 2.5, {}, 310.0)]
>>> try:
...     CsvSource.from_text("a,power\\n1,300\\n2,ON\\n", target="power", name="readings.csv")
... except CsvError as exc:
...     print(exc)
readings.csv row 3, column 'power': 'ON' is not a number (a target must be a number or empty)
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import orjson

from streampipe.readings import Batch, Reading
from streampipe.topics import InvalidName, check_name

__all__ = ["DEVICE_COLUMN_NAMES", "CsvError", "CsvSource", "sniff_delimiter"]

#: Rows read to decide what each column is (and to check the target, time and devices)
#: before anything is sent.
SNIFF_ROWS = 1000
#: Rows read at a time when iterating readings one by one.
CHUNK_ROWS = 256
#: Delimiters a header line is sniffed for.
DELIMITERS = ",;\t"
#: Columns taken as the device column when the source is asked to guess one.
DEVICE_COLUMN_NAMES = ("device", "device_id")
#: Non-number feature cells kept as examples for the summary; the rest are only counted.
EXAMPLES = 3
_TARGET_RULE = "a target must be a number or empty"
_DECIMAL_COMMA = re.compile(r"[-+]?[0-9]+,[0-9]+")


class CsvError(ValueError):
    """The file cannot be replayed as asked (missing column, non-numeric target, …)."""


def _is_float(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _is_time(cell: str) -> bool:
    try:
        datetime.fromisoformat(cell)
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
        raise CsvError(f"{cell!r} is neither a number nor an ISO 8601 date") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def sniff_delimiter(header: str) -> str | None:
    """The delimiter of a header line among ``,`` ``;`` and tab, or None if it has none.

    >>> sniff_delimiter("time;device;power"), sniff_delimiter("power")
    (';', None)
    """
    try:
        delimiter = csv.Sniffer().sniff(header, delimiters=DELIMITERS).delimiter
    except csv.Error:
        return None
    return delimiter if delimiter in DELIMITERS else None


#: Bytes of a chunk that can only be numbers to JSON (no true/false/null, no brackets).
_NUMERIC_BYTES = b"0123456789.eE+-, \t\r\n"
#: A bare ``-0`` is the integer 0 to JSON, but -0.0 to ``float()``.
_BARE_MINUS_ZERO = re.compile(rb"-0(?![0-9.eE])")


def _numeric_table(
    lines: list[str], columns: list[int], width: int, delimiter: str = ","
) -> np.ndarray | None:
    """``columns`` of delimited lines when every cell there is a number (read exactly
    as ``float()`` reads it), else None: an empty cell, a word, a short row."""
    table = _json_table(lines, width, delimiter)
    if table is not None:
        return table[:, columns]
    try:
        table = np.loadtxt(lines, delimiter=delimiter, usecols=columns, dtype=np.float64, ndmin=2)
    except ValueError:
        return None
    return table if len(table) else None


def _json_table(lines: list[str], width: int, delimiter: str = ",") -> np.ndarray | None:
    """Lines of exactly ``width`` numbers each, parsed as one JSON array by orjson
    (correctly rounded, so the same doubles as ``float()``, at a quarter of
    ``np.loadtxt``'s cost), else None: let numpy or csv read anything else."""
    if not lines or set(map(str.count, lines, itertools.repeat(delimiter))) != {width - 1}:
        return None
    data = "".join(lines).encode()
    if delimiter != ",":
        if b"," in data:
            return None  # a decimal comma, say: not a number to float()
        data = data.replace(delimiter.encode(), b",")
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
    """Iterates a CSV file's rows as readings, numbering each device's readings from 0.

    ``feature_columns`` names the features (default: every column but the target, device
    and time columns whose cells are mostly numbers); ``delimiter`` defaults to the one
    sniffed from the header line, else ``,``. With ``guess_device_column``, a column named
    ``device`` or ``device_id`` is the device column when ``device_column`` is not given.
    ``name`` (the path, for :meth:`from_path`) starts every message about a cell.

    What was decided is kept for the user to see: :attr:`features`, :attr:`ignored`
    (column → why not a feature: ``"text"``, ``"times"`` for text that reads as ISO 8601
    dates, ``"empty"`` in the first 1,000 rows, ``"unnamed"`` (an empty name in the header),
    or ``"unlisted"``: numbers, but not among ``feature_columns``), :attr:`delimiter` and
    :attr:`delimiter_source` (``"given"``, ``"sniffed"`` or ``"default"``),
    :attr:`device_guessed` and :attr:`sample_devices` (the devices of the first 1,000 rows).
    """

    open_text: Callable[[], TextIO]
    target: str
    device_id: str = "device"
    device_column: str | None = None
    time_column: str | None = None
    epoch: int = 0
    clock: Callable[[], float] = time.time
    feature_columns: Sequence[str] | None = None
    delimiter: str | None = None
    guess_device_column: bool = False
    name: str = ""
    features: tuple[str, ...] = field(init=False)
    header: tuple[str, ...] = field(init=False)
    ignored: dict[str, str] = field(init=False)
    delimiter_source: str = field(init=False)
    device_guessed: bool = field(init=False, default=False)
    sample_devices: tuple[str, ...] = field(init=False, default=())
    unparsable: int = field(init=False, default=0)
    #: (row, column, cell) of the first few feature cells that were not numbers.
    unparsable_examples: list[tuple[int, str, str]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._choose_delimiter()
        try:
            with self.open_text() as f:
                reader = csv.reader(f, delimiter=self.delimiter)
                try:
                    header = tuple(h.strip() for h in next(reader))
                except StopIteration:
                    raise CsvError("the file is empty: a header row is needed") from None
                except csv.Error as exc:
                    raise CsvError(f"{self._where(1)}: {exc}") from None
                sample = list(itertools.islice(self._rows(reader, 0), SNIFF_ROWS))
        except UnicodeDecodeError:
            raise CsvError(f"{self.name or 'the file'} is not UTF-8 text") from None
        for name in header:
            if name and header.count(name) > 1:  # unnamed ones are never read
                raise CsvError(f"the header names column {name!r} twice")
        self.header = header
        index = {name: j for j, name in enumerate(header)}

        def cells(name: str) -> list[tuple[int, str]]:
            j = index[name]
            return [
                (line, row[j].strip()) for line, row in sample if j < len(row) and row[j].strip()
            ]

        if self.guess_device_column and self.device_column is None:
            named = [n for n in header if n in DEVICE_COLUMN_NAMES]
            if len(named) > 1:
                raise CsvError(
                    f"columns {named[0]!r} and {named[1]!r} could both hold device ids: "
                    "choose one with --device-column, or name one device with --device-id"
                )
            if named:
                self.device_column, self.device_guessed = named[0], True
        roles = {"target": self.target, "device": self.device_column, "time": self.time_column}
        for what, col in roles.items():
            if col is not None and col not in index:
                raise CsvError(
                    f"{what} column {col!r} is not in the header (columns: {', '.join(header)})"
                )
        special = {col: what for what, col in reversed(roles.items()) if col is not None}
        if len(special) < sum(col is not None for col in roles.values()):
            raise CsvError(f"the target column {self.target!r} is also the device or time column")

        target = cells(self.target)
        for line, cell in target:
            if not _is_float(cell):
                raise CsvError(self._not_a_number(line, self.target, cell, _TARGET_RULE))
        if not target:
            raise CsvError(
                f"target column {self.target!r} is empty in the first {SNIFF_ROWS:,} rows"
            )
        if self.time_column is not None:
            tj = index[self.time_column]
            for line, row in sample:
                self._time(line, row[tj] if tj < len(row) else "")
        if self.device_column is not None:
            dj = index[self.device_column]
            devices = {}
            for line, row in sample:
                device = row[dj].strip() if dj < len(row) else ""
                if device not in devices:
                    devices[self._check_device(line, device)] = None
            self.sample_devices = tuple(devices)

        kinds = {}
        for name in header:
            if not name:
                kinds[name] = "unnamed"  # a row index (pandas' to_csv), say: not a feature
            elif name not in special:
                found = cells(name)
                numbers = sum(_is_float(cell) for _, cell in found)
                if not found:
                    kinds[name] = "empty"
                elif 2 * numbers > len(found):
                    kinds[name] = "numbers"
                else:
                    kinds[name] = "times" if all(_is_time(c) for _, c in found) else "text"
        if self.feature_columns is None:
            self.features = tuple(n for n, kind in kinds.items() if kind == "numbers")
        else:
            self.features = tuple(dict.fromkeys(self.feature_columns))
            for name in self.features:
                if name not in index:
                    raise CsvError(
                        f"feature column {name!r} is not in the header "
                        f"(columns: {', '.join(header)})"
                    )
                if name in special:
                    raise CsvError(f"{name!r} is the {special[name]} column, not a feature")
                if kinds[name] in ("text", "times"):
                    line, cell = next((ln, c) for ln, c in cells(name) if not _is_float(c))
                    why = "most of this column is not numbers, so it cannot be a feature"
                    raise CsvError(self._not_a_number(line, name, cell, why))
        self.ignored = {
            name: "unlisted" if kind == "numbers" else kind
            for name, kind in kinds.items()
            if name not in self.features
        }
        if not self.features:
            raise CsvError("the file has no numeric feature columns besides the target")

    def _choose_delimiter(self) -> None:
        if self.delimiter is not None:
            self.delimiter_source = "given"
            if len(self.delimiter) != 1 or self.delimiter in '"\r\n':
                raise CsvError(
                    f"a delimiter is one character, not a quote or a newline: {self.delimiter!r}"
                )
            return
        try:
            with self.open_text() as f:
                sniffed = sniff_delimiter(f.readline())
        except UnicodeDecodeError:
            raise CsvError(f"{self.name or 'the file'} is not UTF-8 text") from None
        self.delimiter = sniffed or ","
        self.delimiter_source = "sniffed" if sniffed else "default"

    @classmethod
    def from_path(cls, path: str | Path, **kwargs: Any) -> CsvSource:
        p = Path(path)
        if not p.is_file():
            raise CsvError(f"no such file: {p}")
        kwargs.setdefault("device_id", p.stem)
        kwargs.setdefault("name", str(path))
        return cls(lambda: open(p, newline="", encoding="utf-8-sig"), **kwargs)

    @classmethod
    def from_text(cls, text: str, **kwargs: Any) -> CsvSource:
        return cls(lambda: io.StringIO(text), **kwargs)

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
        delimiter = self.delimiter
        assert delimiter is not None  # chosen when the source was made
        seqs: dict[str, int] = {}
        with self.open_text() as f:
            header = csv.reader(f, delimiter=delimiter)
            next(header)  # checked when the source was made
            read = header.line_num  # lines of the file read so far, while reading plainly
            lines: Iterator[str] = f
            # One device, no time column: orjson (or numpy) parses plain numeric lines,
            # several times faster than csv + float(); any other chunk takes the csv path.
            plain = dj is None and tj is None
            numbered = None if plain else self._rows(csv.reader(lines, delimiter=delimiter), read)
            while True:
                if numbered is None:
                    text = list(itertools.islice(lines, rows))
                    if not text:
                        break
                    if any('"' in line for line in text):
                        # Quoted cells may span lines: csv from here to the end.
                        rest = csv.reader(itertools.chain(text, lines), delimiter=delimiter)
                        numbered = self._rows(rest, read)
                        continue
                    table = _numeric_table(text, [*cols, yj], width, delimiter)
                    if table is not None:
                        read += len(text)
                        first = seqs.get(self.device_id, 0)
                        seqs[self.device_id] = first + len(table)
                        yield self._table_batch(first, table)
                        continue
                    chunk = list(self._rows(csv.reader(text, delimiter=delimiter), read))
                    read += len(text)
                else:
                    chunk = list(itertools.islice(numbered, rows))
                if not chunk:
                    if numbered is None:
                        continue  # blank lines only
                    break
                for _, row in chunk:
                    if len(row) < width:
                        row += [""] * (width - len(row))
                if dj is None:
                    groups = {self.device_id: chunk}
                else:
                    groups = {}
                    for item in chunk:
                        groups.setdefault(item[1][dj].strip(), []).append(item)
                now = self.clock()
                for device, group in groups.items():
                    first = seqs.get(device)
                    if first is None:
                        first = 0
                        if dj is not None:
                            self._check_device(group[0][0], device)
                    seqs[device] = first + len(group)
                    yield self._batch(device, first, group, cols, yj, tj, now)

    def _rows(self, reader: Any, before: int) -> Iterator[tuple[int, list[str]]]:
        """The non-blank rows of a csv ``reader``, each with the row of the file it starts
        on (the header is row 1); ``before`` lines of the file were read before it."""
        last = reader.line_num
        try:
            for row in reader:
                if row:
                    yield before + last + 1, row
                last = reader.line_num
        except csv.Error as exc:  # a NUL byte, a field too large, …
            raise CsvError(f"{self._where(before + reader.line_num)}: {exc}") from None

    def _where(self, line: int) -> str:
        return f"{self.name} row {line}" if self.name else f"row {line}"

    def _at(self, line: int, column: str) -> str:
        return f"{self._where(line)}, column {column!r}"

    def _not_a_number(self, line: int, column: str, cell: str, why: str) -> str:
        if _DECIMAL_COMMA.fullmatch(cell):
            why = f"decimal commas are not read: write {cell.replace(',', '.')}"
        return f"{self._at(line, column)}: {cell!r} is not a number ({why})"

    def _time(self, line: int, cell: str) -> float:
        try:
            return parse_time(cell)
        except CsvError as exc:
            raise CsvError(f"{self._at(line, str(self.time_column))}: {exc}") from None

    def _check_device(self, line: int, device: str) -> str:
        try:
            return check_name(device)
        except InvalidName as exc:
            raise CsvError(
                f"{self._at(line, str(self.device_column))}: {device!r} cannot be a device "
                f"id ({exc})"
            ) from None

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
        group: list[tuple[int, list[str]]],
        cols: list[int],
        yj: int,
        tj: int | None,
        now: float,
    ) -> Batch:
        n = len(group)
        rows = [row for _, row in group]
        values = np.empty((n, len(cols)))
        present = np.ones((n, len(cols)), dtype=bool)
        for k, j in enumerate(cols):
            values[:, k], present[:, k] = self._column([row[j] for row in rows], j, group)
        target, has_target = self._column([row[yj] for row in rows], yj, group)
        if tj is None:
            ts = np.full(n, now)
        else:
            ts = np.array([self._time(line, row[tj]) for line, row in group], dtype=np.float64)
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

    def _column(
        self, cells: list[str], j: int, group: list[tuple[int, list[str]]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Column ``j``'s values and which cells are not empty (empty = missing)."""
        try:  # the common case: every cell a number
            return np.fromiter(map(float, cells), np.float64, len(cells)), np.ones(len(cells), bool)
        except ValueError:
            pass
        name = self.header[j]
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
                line = group[i][0]
                if name == self.target:
                    raise CsvError(self._not_a_number(line, name, cell, _TARGET_RULE)) from None
                self.unparsable += 1  # sent as NaN: the edge counts and cleans it
                examples = self.unparsable_examples
                if len(examples) < EXAMPLES or (line, name) < examples[-1][:2]:
                    examples.append((line, name, cell))
                    examples.sort()  # the first in the file, whatever the column
                    del examples[EXAMPLES:]
                values[i] = math.nan
        return values, present
