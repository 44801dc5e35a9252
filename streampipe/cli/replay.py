"""``streampipe replay``: publish a CSV file's rows as readings."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import threading
import time
from typing import Any

from streampipe.cli.columns import add_columns, column_report, count_rows, csv_source
from streampipe.cli.options import (
    DEFAULT_BROKER,
    add_batching,
    add_broker,
    client_id,
    on_signals,
    rate,
    refused_summary,
)
from streampipe.cli.progress import Progress as _Progress
from streampipe.sources.csv import CsvError, CsvSource
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
    add_columns(replay)
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


#: What the edge does with a feature value that is NaN (streampipe.validate).
CLEANED = "the edge cleans and counts"


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
    source = csv_source(args, epoch=epoch)
    for line in column_report(source, device_id_given=args.device_id is not None):
        print(line, file=sys.stderr)
    total = count_rows(args.file)
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
            f"the broker refused {refused_summary(conn)}"
            if conn.refused
            else "all acknowledged by the broker"
            if acked
            else f"only {s.acked_readings:,} acknowledged within {args.ack_timeout:g} s"
        )
    )
    if source.unparsable:
        log.warning("%s", unparsable_summary(source))
    if not acked or conn.refused:
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
