"""End-to-end pipeline throughput against River offline, in the same run.

    python benchmarks/pipeline.py [--readings 100000] [--batch 1000] [--repeat 3]

Measures, on River's ``datasets.synth.Friedman`` (seed 42):

1. River offline: a ``predict_one`` + ``learn_one`` loop of
   ``StandardScaler | LinearRegression``, readings/s;
3. streampipe end to end: ``streampipe replay`` (CSV) → private Mosquitto →
   ``streampipe edge`` (exact mode) → every prediction received by a subscriber,
   readings/s, from the start of the replay to the last prediction.

It prints medians of ``--repeat`` runs and the ratio 3/1. (The naive JSON pipeline,
mini-batch mode, latency and memory rows are still to come.)
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from river import datasets, linear_model, preprocessing

from streampipe.broker import PrivateMosquitto
from streampipe.transport import Connection, Message


def river_offline(rows: list) -> float:
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    start = time.perf_counter()
    for x, y in rows:
        model.predict_one(x)
        model.learn_one(x, y)
    return len(rows) / (time.perf_counter() - start)


def end_to_end(csv_path: Path, n: int, batch: int) -> tuple[float, str]:
    streampipe = [sys.executable, "-m", "streampipe"]
    with PrivateMosquitto() as broker:
        url = f"mqtt://127.0.0.1:{broker.port}"
        received = [0]
        online = threading.Event()
        done = threading.Event()

        def on_message(msg: Message) -> None:
            if msg.topic.startswith("streampipe/status/"):
                if msg.payload == b"online":
                    online.set()
                return
            received[0] += len(json.loads(msg.payload)["predictions"])
            if received[0] >= n:
                done.set()

        watch = Connection(broker.url, "bench-watch", on_message=on_message).connect()
        watch.subscribe(["streampipe/predictions/+", "streampipe/status/+"])
        edge = subprocess.Popen(
            [*streampipe, "edge", "--broker", url, "--stage-id", "bench", "--metrics-port", "-1"],
            stderr=subprocess.DEVNULL,
        )
        try:
            if not online.wait(30):
                raise RuntimeError("edge did not come online")
            start = time.perf_counter()
            replay = subprocess.run(
                [
                    *streampipe,
                    "replay",
                    str(csv_path),
                    "--broker",
                    url,
                    "--target",
                    "y",
                    "--batch",
                    str(batch),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            if not done.wait(600):
                raise RuntimeError(f"only {received[0]} of {n} predictions arrived")
            rate = n / (time.perf_counter() - start)
        finally:
            edge.terminate()
            edge.wait(30)
            watch.close()
    return rate, replay.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readings", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    rows = [
        ({f"x{k}": v for k, v in x.items()}, y)
        for x, y in datasets.synth.Friedman(seed=42).take(args.readings)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "friedman.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            names = list(rows[0][0])
            w.writerow([*names, "y"])
            for x, y in rows:
                w.writerow([repr(x[k]) for k in names] + [repr(y)])
        offline, e2e, summary = [], [], ""
        for _ in range(args.repeat):
            offline.append(river_offline(rows))
            rate, summary = end_to_end(path, len(rows), args.batch)
            e2e.append(rate)
    o, e = statistics.median(offline), statistics.median(e2e)
    print(f"# {len(rows):,} Friedman readings, batch {args.batch}, median of {args.repeat}")
    print(f"# last replay: {summary}")
    print(f"{'what':<40} {'readings/s':>12} {'ratio':>7}")
    print(f"{'1. River offline predict+learn':<40} {o:>12,.0f} {1.0:>7.2f}")
    print(f"{'3. streampipe end to end (exact)':<40} {e:>12,.0f} {e / o:>7.2f}")


if __name__ == "__main__":
    main()
