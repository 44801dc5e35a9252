"""The CSV column options of ``replay``, ``train`` and ``evaluate``, and the report of
what each column became.

``add_columns(parser)`` adds ``--target``, ``--features``, ``--device-column``,
``--device-id``, ``--time-column`` and ``--delimiter``; ``csv_source(args)`` opens the
file as they say, and ``column_report`` tells the user what was decided and why.

>>> import argparse
>>> parser = argparse.ArgumentParser()
>>> add_columns(parser)
>>> args = parser.parse_args(["--target", "power", "--features", "volts, amps"])
>>> args.features, args.device_column
(('volts', 'amps'), None)
"""

from __future__ import annotations

import argparse
from typing import Any

from streampipe.sources.csv import SNIFF_ROWS, CsvSource

__all__ = ["add_columns", "column_report", "count_rows", "csv_source"]

#: Column names that read as times: as features, they are usually a mistake.
TIME_NAMES = ("time", "timestamp", "ts", "date", "datetime", "epoch", "unix_time")
#: Devices the column report names; the rest are counted.
REPORT_DEVICES = 8
#: How replay and the edge use a device column.
PER_DEVICE = "one model per device"


def add_columns(parser: argparse.ArgumentParser, device_use: str = PER_DEVICE) -> None:
    """Add the options that say what a CSV file's columns are; ``device_use`` says in
    ``--help`` what the command does with a device column."""
    parser.add_argument(
        "--target", required=True, metavar="COL", help="the column to learn to predict (required)"
    )
    parser.add_argument(
        "--features",
        type=_columns,
        metavar="COL,COL",
        help="only these columns are features (default: every column but the target, "
        "device and time columns whose cells are mostly numbers)",
    )
    devices = parser.add_mutually_exclusive_group()
    devices.add_argument(
        "--device-column",
        metavar="COL",
        help=f"column holding device ids, {device_use} (default: a column named "
        "device or device_id, if the file has one)",
    )
    devices.add_argument(
        "--device-id",
        metavar="ID",
        help="take every row as this one device (default: the file's name without its "
        "extension, when there is no device column)",
    )
    parser.add_argument(
        "--time-column",
        metavar="COL",
        help="column holding timestamps, Unix seconds or ISO 8601 (default: none, "
        "readings are stamped when they are read)",
    )
    parser.add_argument(
        "--delimiter",
        type=_delimiter,
        metavar="CHAR",
        help="cell delimiter; 'tab' for a tab (default: sniffed from the header among "
        "',' ';' and tab, else ',')",
    )


def csv_source(args: argparse.Namespace, **kwargs: Any) -> CsvSource:
    """``args.file`` as the column options in ``args`` say; ``kwargs`` go to
    :class:`CsvSource` too (``epoch``, say)."""
    kwargs.update(
        target=args.target,
        device_column=args.device_column,
        time_column=args.time_column,
        feature_columns=args.features,
        delimiter=args.delimiter,
        guess_device_column=args.device_id is None,
    )
    if args.device_id:
        kwargs["device_id"] = args.device_id
    return CsvSource.from_path(args.file, **kwargs)


def count_rows(path: str) -> int:
    """The rows of a CSV file after its header, counted as lines (for a progress bar)."""
    with open(path, "rb") as f:
        return max(sum(1 for _ in f) - 1, 0)


def _columns(value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("name at least one column, as COL,COL")
    return names


def _delimiter(value: str) -> str:
    value = {"tab": "\t", "\\t": "\t"}.get(value, value)
    if len(value) != 1:
        raise argparse.ArgumentTypeError(f"a delimiter is one character (or 'tab'), not {value!r}")
    return value


def column_report(
    source: CsvSource, device_id_given: bool = False, device_use: str = PER_DEVICE
) -> list[str]:
    """What becomes of each column of ``source``, and why, as lines for the user;
    ``device_use`` says what the command does with a device column.

    >>> from streampipe.sources.csv import CsvSource
    >>> text = "time,device,volts,power\\n2024-03-04T00:00:00Z,m1,230,500\\n"
    >>> src = CsvSource.from_text(text, target="power", guess_device_column=True, name="r.csv")
    >>> print("\\n".join(column_report(src)))
    r.csv: delimiter ',' (sniffed from the header)
      time:   times, not a feature (use --time-column time to stamp readings with them)
      device: device ids, one model per device (named so; --device-id ID for one device)
      volts:  feature
      power:  target
    1 device in the first 1,000 rows: m1
    """
    how = {
        "given": "--delimiter",
        "sniffed": "sniffed from the header",
        "default": "the header has none of ',' ';' and tab",
    }[source.delimiter_source]
    lines = [f"{source.name or 'the file'}: delimiter {source.delimiter!r} ({how})"]
    width = min(max(len(name or "(no name)") for name in source.header) + 1, 24)
    for name in source.header:
        lines.append(f"  {(name or '(no name)') + ':':<{width}} {_role(source, name, device_use)}")
    if source.device_column is None:
        why = "--device-id" if device_id_given else "the file's name; --device-id ID to change it"
        lines.append(f"1 device, every row: {source.device_id} ({why})")
    else:
        devices = source.sample_devices
        shown = ", ".join(devices[:REPORT_DEVICES])
        if len(devices) > REPORT_DEVICES:
            shown += f" and {len(devices) - REPORT_DEVICES:,} more"
        lines.append(
            f"{len(devices):,} device{'s' if len(devices) != 1 else ''} in the first "
            f"{SNIFF_ROWS:,} rows: {shown}"
        )
    return lines


def _role(source: CsvSource, name: str, device_use: str) -> str:
    if name == source.target:
        return "target"
    if name == source.device_column:
        if source.device_guessed:
            return f"device ids, {device_use} (named so; --device-id ID for one device)"
        return f"device ids, {device_use} (--device-column)"
    if name == source.time_column:
        return "timestamps (--time-column)"
    if name in source.features:
        if name.lower() in TIME_NAMES and source.time_column is None:
            return f"feature (if these numbers are times, use --time-column {name} instead)"
        return "feature"
    why = source.ignored[name]
    if why == "unlisted":
        return "numbers, not a feature (not in --features)"
    if why == "unnamed":
        return "not a feature (the header gives this column no name)"
    if why == "empty":
        return f"empty in the first {SNIFF_ROWS:,} rows, not a feature"
    if why == "times":
        if source.time_column is None:
            return f"times, not a feature (use --time-column {name} to stamp readings with them)"
        return "times, not a feature"
    if source.device_column is None:
        return f"text, not a feature (use --device-column {name} to split readings by device)"
    return "text, not a feature"
