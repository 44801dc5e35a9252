"""``streampipe replay``: publish a CSV file's rows as readings."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import threading
import time
from typing import Any

from streampipe.cli.options import (
    DEFAULT_BROKER,
    add_batching,
    add_broker,
    client_id,
    on_signals,
    rate,
)
from streampipe.cli.progress import Progress as _Progress
from streampipe.sources.csv import SNIFF_ROWS, CsvError, CsvSource
from streampipe.topics import Topics

__all__ = ["column_report", "register", "run", "unparsable_summary"]

log = logging.getLogger("streampipe")


DESCRIPTION = """\
Publish a CSV file's rows as readings, as devices would, for an edge to learn from.
The first row names the columns. Before sending, replay prints (to stderr) what each
column became: the target, a feature (by default every column other than the target,
device and time columns whose cells are mostly numbers), the device or time column, or
ignored, and why. A column named device or device_id is the device column unless
--device-column or --device-id says otherwise. A target cell that is not a number stops
the replay with its row, column and value; a feature cell that is not a number is sent
as NaN, for the edge to clean and count, and the summary names the first few.
"""


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``streampipe replay`` to the subcommands ``sub``."""
    replay = sub.add_parser(
        "replay",
        help="replay a CSV file as readings",
        description=DESCRIPTION,
    )
    replay.add_argument("file", help="CSV file with a header row")
    add_broker(replay, DEFAULT_BROKER)
    replay.add_argument(
        "--target", required=True, metavar="COL", help="the column to learn to predict (required)"
    )
    replay.add_argument(
        "--features",
        type=_columns,
        metavar="COL,COL",
        help="only these columns are features (default: every column but the target, "
        "device and time columns whose cells are mostly numbers)",
    )
    devices = replay.add_mutually_exclusive_group()
    devices.add_argument(
        "--device-column",
        metavar="COL",
        help="column holding device ids, one model per device (default: a column named "
        "device or device_id, if the file has one)",
    )
    devices.add_argument(
        "--device-id",
        metavar="ID",
        help="send every row as this one device (default: the file's name without its "
        "extension, when there is no device column)",
    )
    replay.add_argument(
        "--time-column",
        metavar="COL",
        help="column holding timestamps, Unix seconds or ISO 8601 (default: none, "
        "readings are stamped when they are sent)",
    )
    replay.add_argument(
        "--delimiter",
        type=_delimiter,
        metavar="CHAR",
        help="cell delimiter; 'tab' for a tab (default: sniffed from the header among "
        "',' ';' and tab, else ',')",
    )
    replay.add_argument(
        "--rate",
        type=rate,
        default=math.inf,
        help="readings per second, or 'max': as fast as the broker takes them (default: max)",
    )
    replay.add_argument(
        "--epoch",
        type=int,
        metavar="MS",
        help="boot epoch of the replayed devices (default: now, in ms since 1970)",
    )
    replay.add_argument(
        "--ack-timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds to wait for the broker to acknowledge every reading (default: %(default)g)",
    )
    add_batching(replay, batch=100, linger_ms=100)
    replay.set_defaults(run=run)
    return replay


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


#: Column names that read as times: as features, they are usually a mistake.
TIME_NAMES = ("time", "timestamp", "ts", "date", "datetime", "epoch", "unix_time")
#: What the edge does with a feature value that is NaN (streampipe.validate).
CLEANED = "the edge cleans and counts"
#: Devices the column report names; the rest are counted.
REPORT_DEVICES = 8


def column_report(source: CsvSource, device_id_given: bool = False) -> list[str]:
    """What replay does with each column of ``source``, and why, as lines for the user.

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
        lines.append(f"  {(name or '(no name)') + ':':<{width}} {_role(source, name)}")
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


def _role(source: CsvSource, name: str) -> str:
    if name == source.target:
        return "target"
    if name == source.device_column:
        if source.device_guessed:
            return "device ids, one model per device (named so; --device-id ID for one device)"
        return "device ids, one model per device (--device-column)"
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


def _pace(start: float, count: int, rate: float) -> None:
    """Sleep until reading number ``count`` is due at ``rate`` readings per second."""
    if math.isfinite(rate):
        delay = start + count / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def run(args: argparse.Namespace) -> int:
    from streampipe.publish import ReadingPublisher
    from streampipe.transport import Connection

    epoch = args.epoch if args.epoch is not None else int(time.time() * 1000)
    kwargs: dict[str, Any] = {
        "target": args.target,
        "device_column": args.device_column,
        "time_column": args.time_column,
        "feature_columns": args.features,
        "delimiter": args.delimiter,
        "guess_device_column": args.device_id is None,
        "epoch": epoch,
    }
    if args.device_id:
        kwargs["device_id"] = args.device_id
    source = CsvSource.from_path(args.file, **kwargs)
    for line in column_report(source, device_id_given=args.device_id is not None):
        print(line, file=sys.stderr)
    with open(args.file, "rb") as f:
        total = max(sum(1 for _ in f) - 1, 0)
    conn = Connection(args.broker, client_id("replay")).connect()
    stopped = threading.Event()
    on_signals(stopped.set)
    pub = ReadingPublisher(
        conn, Topics(args.topic_root), batch_size=args.batch, linger=args.linger / 1000
    )
    progress = _Progress(total)
    # Without a rate limit, read and send whole batches; with one, a batch is what the
    # rate produces within the linger bound, so no reading waits longer than that.
    rows = args.batch
    if not math.isinf(args.rate):
        rows = max(1, min(args.batch, int(args.rate * args.linger / 1000)))
    batches = source.batches(rows)
    start = time.monotonic()
    try:
        sent = 0
        while not stopped.is_set():
            _pace(start, sent, args.rate)
            try:
                batch = next(batches, None)  # read (and stamped) when it is due
            except CsvError as exc:  # a bad target after the rows checked up front
                acked = pub.wait_acked(args.ack_timeout)
                raise CsvError(
                    f"{exc}; replay stopped there, after {sent:,} readings"
                    + ("" if acked else f", not all acknowledged within {args.ack_timeout:g} s")
                ) from None
            if batch is None:
                break
            pub.send(batch)
            sent += len(batch)
            progress.update(sent)
        progress.update(pub.stats.readings, force=True)
        acked = pub.wait_acked(args.ack_timeout)
    finally:
        progress.close()
        conn.close()
    elapsed = time.monotonic() - start
    s = pub.stats
    print(
        f"replayed {s.readings:,} readings in {elapsed:.2f} s "
        f"({s.readings / max(elapsed, 1e-9):,.0f} readings/s), {s.bytes:,} bytes in "
        f"{s.messages:,} messages ({s.bytes / max(s.readings, 1):.1f} bytes/reading); "
        + (
            "all acknowledged by the broker"
            if acked
            else f"only {s.acked_readings:,} acknowledged within {args.ack_timeout:g} s"
        )
    )
    if source.unparsable:
        log.warning("%s", unparsable_summary(source))
    if not acked:
        return 1
    return 130 if stopped.is_set() else 0


def unparsable_summary(source: CsvSource) -> str:
    """One line: how many feature cells were not numbers, and where the first were.

    >>> from streampipe.sources.csv import CsvSource
    >>> src = CsvSource.from_text("a,y\\n1,1\\n2,1\\nn/a,2\\n", target="y", name="r.csv")
    >>> _ = list(src)
    >>> print(unparsable_summary(src))  # doctest: +ELLIPSIS
    1 feature cell was not a number ... as NaN (...): r.csv row 4, column 'a': 'n/a'
    """
    n = source.unparsable
    shown = source.unparsable_examples
    where = "; ".join(f"row {line}, column {col!r}: {cell!r}" for line, col, cell in shown)
    if source.name:
        where = f"{source.name} {where}"
    if n > len(shown):
        where += "; …"
    if n == 1:
        return f"1 feature cell was not a number and went out as NaN ({CLEANED} it): {where}"
    return f"{n:,} feature cells were not numbers and went out as NaN ({CLEANED} them): {where}"
