"""Time per checkpoint commit with 10,000 devices, by how many devices changed.

    python benchmarks/checkpoint.py [--devices 10000] [--repeat 15] [--journal-mode wal]

Each device holds what the edge checkpoints for it: a ``DeviceState`` whose model,
``preprocessing.StandardScaler() | linear_model.LinearRegression()``, has learned 5
readings of a simulated sensor (``SensorFleet``, five features); the stage row is the
spec and ``RegressionScores`` with the default 1,000-pair rolling window, as the edge's.

The store is filled by one full save, then each row times ``--repeat`` commits and
reports their median (and mean: WAL checkpoints and page reuse come in bursts). Before
each commit the changed devices, drawn at random, learn one more reading, outside the
timing; a commit's time includes pickling and HMAC-ing what it writes. ``full`` is
``save(..., full=True)`` of every device, what the edge does until it tracks which
devices changed; ``old format`` is the single-file checkpoint this store replaced
(pickle everything, HMAC it, write a temporary file, fsync, rename, fsync the
directory). The disk is whatever ``--dir`` (default: a temporary directory) is on.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import pickle
import platform
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from river import linear_model, preprocessing

from streampipe import state
from streampipe.learn.learner import DeviceState
from streampipe.learn.scores import RegressionScores
from streampipe.sources.simulate import SensorFleet

SPEC = "preprocessing.StandardScaler | linear_model.LinearRegression"


class Fleet:
    """Devices with a model each, and a way to make some of them learn one more reading."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.sensors = SensorFleet(n, seed=seed, faults=False)
        self.ts = 1795732390.0
        self.devices: dict[str, DeviceState] = {}
        for i, name in enumerate(self.sensors.device_ids):
            self.devices[name] = DeviceState(
                preprocessing.StandardScaler() | linear_model.LinearRegression()
            )
            for _ in range(5):
                self.learn(i)
        self.scores = RegressionScores()
        rng = random.Random(seed)
        ys = [rng.gauss(1000, 200) for _ in range(5000)]
        self.scores.update_many(ys, [y + rng.gauss(0, 20) for y in ys])

    def learn(self, i: int) -> str:
        self.ts += 0.1
        r = self.sensors.read(i, self.ts)
        st = self.devices[r.device]
        st.model.learn_one(r.x, r.y)
        st.epoch, st.seq, st.learned = r.epoch, r.seq, st.learned + 1
        return r.device

    def meta(self) -> dict:
        return {"spec": SPEC, "metrics": self.scores}


def old_format_save(path: Path, key: bytes, snapshot: dict) -> None:
    """The single-file checkpoint this store replaced, as it was written."""
    body = pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL)
    tag = hmac.new(key, body, hashlib.sha256).digest()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(b"SPCK1\n" + tag + body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def timed(repeat: int, prepare: Callable[[], object], run: Callable[[object], None]) -> list:
    times = []
    for _ in range(repeat):
        arg = prepare()
        t0 = time.perf_counter()
        run(arg)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--journal-mode", choices=["wal", "delete"], default=state.JOURNAL_MODE)
    parser.add_argument("--dir", help="where the store goes (default: a temporary directory)")
    args = parser.parse_args()
    state.JOURNAL_MODE = args.journal_mode
    rng = random.Random(1)

    t0 = time.perf_counter()
    fleet = Fleet(args.devices)
    names = list(fleet.devices)
    row_bytes = statistics.median(
        len(pickle.dumps(fleet.devices[n], protocol=pickle.HIGHEST_PROTOCOL)) for n in names[:100]
    )
    meta_bytes = len(pickle.dumps(fleet.meta(), protocol=pickle.HIGHEST_PROTOCOL))
    built = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        store = state.CheckpointStore(d, "bench")
        store.save(fleet.meta(), fleet.devices, full=True)

        def changed(n: int) -> Callable[[], dict]:
            def prepare() -> dict:
                picked = rng.sample(range(len(names)), n)
                return {fleet.learn(i): fleet.devices[names[i]] for i in picked}

            return prepare

        rows: list[tuple[str, int, list[float]]] = []  # label, devices written, times
        for n in (10, 100, len(names)):
            times = timed(args.repeat, changed(n), lambda devs: store.save(fleet.meta(), devs))
            rows.append((f"{n:,} changed", n, times))
        rows.append(
            (
                "full=True (all)",
                len(names),
                timed(
                    max(3, args.repeat // 3),
                    lambda: None,
                    lambda _: store.save(fleet.meta(), fleet.devices, full=True),
                ),
            )
        )
        key = os.urandom(32)
        rows.append(
            (
                "old format (all)",
                len(names),
                timed(
                    max(3, args.repeat // 3),
                    lambda: None,
                    lambda _: old_format_save(
                        Path(d) / "old.checkpoint",
                        key,
                        {"devices": fleet.devices, **fleet.meta()},
                    ),
                ),
            )
        )
        db = Path(store.path)
        wal = db.with_name(db.name + "-wal")
        db_mb = db.stat().st_size / 1e6
        wal_mb = [wal.stat().st_size / 1e6 if wal.exists() else 0.0]
        store.save(fleet.meta(), changed(10)())  # the WAL is cut back on the next commit
        wal_mb.append(wal.stat().st_size / 1e6 if wal.exists() else 0.0)
        loads = timed(3, lambda: None, lambda _: store.load())
        store.close()
        closed_mb = db.stat().st_size / 1e6
        old_mb = (Path(d) / "old.checkpoint").stat().st_size / 1e6

    print(
        f"# {platform.machine()}, Python {platform.python_version()}, SQLite "
        f"{sqlite3.sqlite_version}, journal_mode={args.journal_mode}, synchronous=FULL"
    )
    print(
        f"# {len(names):,} devices, {row_bytes:,.0f} B pickled each, stage row "
        f"{meta_bytes:,} B; built in {built:.1f} s; median (mean) of {args.repeat} commits"
    )
    print(f"{'commit':<22}{'median ms':>11}{'mean ms':>10}{'per device us':>15}")
    for label, n, times in rows:
        med, mean = statistics.median(times), statistics.fmean(times)
        print(f"{label:<22}{med * 1e3:>11.2f}{mean * 1e3:>10.2f}{med / n * 1e6:>15.1f}")
    print(f"{'load() all':<22}{statistics.median(loads) * 1e3:>11.2f}")
    print(
        f"# database {db_mb:.1f} MB + WAL {wal_mb[0]:.1f} MB after a full commit, "
        f"{wal_mb[1]:.1f} MB after the next; {closed_mb:.1f} MB closed; old format file "
        f"{old_mb:.1f} MB"
    )


if __name__ == "__main__":
    main()
