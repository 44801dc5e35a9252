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
from streampipe.topics import Topics

__all__ = ["register", "run"]

log = logging.getLogger("streampipe")


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``streampipe replay`` to the subcommands ``sub``."""
    replay = sub.add_parser("replay", help="replay a CSV file as readings")
    replay.add_argument("file", help="CSV file with a header row")
    add_broker(replay, DEFAULT_BROKER)
    replay.add_argument("--target", required=True, metavar="COLUMN", help="target column")
    replay.add_argument("--device-id", help="device id (default: the file's stem)")
    replay.add_argument("--device-column", metavar="COL", help="column holding device ids")
    replay.add_argument("--time-column", metavar="COL", help="column holding timestamps")
    replay.add_argument(
        "--rate", type=rate, default=math.inf, help="readings per second, or 'max' (default)"
    )
    replay.add_argument(
        "--epoch", type=int, help="boot epoch of the replayed devices (default: now, in ms)"
    )
    replay.add_argument(
        "--ack-timeout", type=float, default=120.0, help="seconds to wait for acknowledgements"
    )
    add_batching(replay, batch=100, linger_ms=100)
    replay.set_defaults(run=run)
    return replay


class _Progress:
    """A one-line progress display on a terminal; silent otherwise."""

    def __init__(self, total: int | None, stream: Any = sys.stderr) -> None:
        self.total = total
        self.stream = stream
        self.enabled = stream.isatty()
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < 0.2):
            return
        self._last = now
        rate = done / max(now - self.start, 1e-9)
        if self.total:
            frac = min(done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            text = f"[{bar:<30}] {done:,}/{self.total:,} readings  {rate:,.0f}/s"
        else:
            text = f"{done:,} readings  {rate:,.0f}/s"
        self.stream.write("\r" + text)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")


def _pace(start: float, count: int, rate: float) -> None:
    """Sleep until reading number ``count`` is due at ``rate`` readings per second."""
    if math.isfinite(rate):
        delay = start + count / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def run(args: argparse.Namespace) -> int:
    from streampipe.publish import ReadingPublisher
    from streampipe.sources.csv import CsvSource
    from streampipe.transport import Connection

    epoch = args.epoch if args.epoch is not None else int(time.time() * 1000)
    kwargs: dict[str, Any] = {
        "target": args.target,
        "device_column": args.device_column,
        "time_column": args.time_column,
        "epoch": epoch,
    }
    if args.device_id:
        kwargs["device_id"] = args.device_id
    source = CsvSource.from_path(args.file, **kwargs)
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
            batch = next(batches, None)  # read (and stamped) when it is due
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
        log.warning("%d cells were not numbers and were sent as NaN", source.unparsable)
    if not acked:
        return 1
    return 130 if stopped.is_set() else 0
