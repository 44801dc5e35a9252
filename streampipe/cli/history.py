"""A CSV file's rows as the readings ``train`` and ``evaluate`` learn from, cleaned and
refused as an edge would (:func:`streampipe.validate.validate`).

Rows come as :class:`~streampipe.readings.Batch` es. With ``one_model``, every row is
one device's, in file order, whatever the device column says; otherwise each device's
rows come in file order, as an edge receives them, and ``device`` keeps one device's.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from streampipe.cli.columns import PER_DEVICE, column_report, count_rows, csv_source
from streampipe.readings import Batch
from streampipe.sources.csv import CHUNK_ROWS, CsvError, CsvSource
from streampipe.validate import Validated, validate

__all__ = ["History", "Refusals", "open_history"]


@dataclass
class History:
    """What to read (``source``), what the user is told of its columns (``report``),
    the one ``device`` kept (None: all) and the file's ``rows`` (for a progress bar)."""

    source: CsvSource
    report: list[str]
    device: str | None
    rows: int

    def batches(self) -> Iterator[Batch]:
        for batch in self.source.batches(CHUNK_ROWS):
            if self.device is None or batch.device == self.device:
                yield batch

    def unreadable(self) -> str:
        """A line on the feature cells that were not numbers, or ``""`` if none was."""
        n = self.source.unparsable
        if not n:
            return ""
        where = "; ".join(
            f"row {line}, column {col!r}: {cell!r}"
            for line, col, cell in self.source.unparsable_examples
        )
        if n == 1:
            cells, rows = "1 feature cell was not a number", "its row"
        else:
            cells, rows = f"{n:,} feature cells were not numbers", "their rows"
        more = "; …" if n > len(self.source.unparsable_examples) else ""
        return f"{cells}, left out of {rows} as an edge cleans them ({where}{more})"


@dataclass
class Refusals:
    """Readings an edge would refuse, by reason, and the first one's detail per reason."""

    counts: Counter[str] = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def validate(self, batch: Batch, labels: str | None) -> Validated:
        """``batch`` validated as an edge does for a model learning ``labels``."""
        checked = validate(batch, labels=labels)
        for r in checked.rejected:
            self.counts[r.reason] += 1
            self.first.setdefault(r.reason, r.detail)
        return checked

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        """``value_out_of_range 2 (first: ...), ...``"""
        return ", ".join(
            f"{reason} {n:,} (first: {self.first[reason]})" for reason, n in self.counts.items()
        )


def open_history(args: argparse.Namespace, *, one_model: bool) -> History:
    """``args.file`` read as ``args``' column options say, for one model over every row
    (``one_model``) or a model per device; ``args.device`` keeps one device's rows."""
    source = csv_source(args)
    device = getattr(args, "device", None)
    if device is not None:
        if source.device_column is None:
            raise CsvError(
                f"--device {device}: the file has no device column "
                "(name the one it has with --device-column COL)"
            )
        use = f"only {device}'s rows (--device)"
    elif one_model:
        use = "one model over every device's rows, in file order"
    else:
        use = PER_DEVICE
    report = column_report(source, device_id_given=args.device_id is not None, device_use=use)
    if one_model and device is None and source.device_column is not None:
        # One device: the rows stay in file order (a device column groups each chunk).
        source = CsvSource.from_path(
            args.file,
            target=source.target,
            time_column=source.time_column,
            feature_columns=source.features,
            delimiter=source.delimiter,
        )
    return History(source, report, device, count_rows(args.file))
