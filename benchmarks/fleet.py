"""Cold start with fleet learning: held-out devices starting from the fleet model vs from scratch.

    python benchmarks/fleet.py [--broker mqtt://HOST:PORT] [--train-devices 16]
        [--holdout 8] [--readings 300] [--first 50] [--seed 0]

A simulated fleet (:class:`~streampipe.sources.simulate.SensorFleet`: devices share
their physics, power = V·pf·I + R·I² + k·(T − 15), but each has its own supply voltage,
power factor, resistance, temperature coefficient and baselines) is split: the training
devices publish ``--readings`` readings each through two edges (``--fleet``, half the
partitions each) and an aggregator (:class:`~streampipe.fleet.service.FleetAggregator`)
over a real Mosquitto (a private one unless ``--broker``). Once both edges hold the
fleet model that reflects all of it, the held-out devices start: the edges' predictions
of their first ``--first`` readings, from the fleet model, against River's
predict-then-learn of the same readings from a fresh ``StandardScaler |
LinearRegression`` (what an edge without ``--fleet`` predicts, bit for bit). Readings
without faults (no dropouts, no spikes): the comparison is of starting points.

Prints the MAE of both and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from streampipe.broker import PrivateMosquitto
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.fleet.service import AggregatorConfig, FleetAggregator
from streampipe.learn import DEFAULT_MODEL_SPEC
from streampipe.learn.spec import ModelSpec
from streampipe.models.keys import init_keys, load_signing_key
from streampipe.publish import ReadingPublisher
from streampipe.readings import Reading
from streampipe.sources.simulate import SensorFleet
from streampipe.topics import PARTITIONS, Topics
from streampipe.transport import BrokerURL, Connection, Message

FLEET = "power"
STEP = 30.0  # seconds between a device's readings


@dataclass(frozen=True)
class ColdStart:
    fleet_mae: float  # held-out devices' first readings, starting from the fleet model
    scratch_mae: float  # the same readings, starting from scratch
    version: int  # of the fleet model they started from
    trained_readings: int
    holdout_readings: int


def _mae(pairs: list[tuple[float, float | None]]) -> float:
    return sum(abs(y - (p if p is not None else 0.0)) for y, p in pairs) / len(pairs)


def _scratch(rows: list[Reading]) -> list[float]:
    model = ModelSpec.parse(DEFAULT_MODEL_SPEC).build()
    out = []
    for r in rows:
        out.append(model.predict_one(r.x))
        model.learn_one(r.x, r.y)
    return out


def _publish(url: BrokerURL, topics: Topics, readings: list[Reading]) -> None:
    with Connection(url, f"fleet-bench-pub-{time.monotonic_ns()}").connect() as conn:
        pub = ReadingPublisher(conn, topics, batch_size=25)
        for r in readings:
            pub.add(r)
        if not pub.wait_acked(60):
            raise RuntimeError("the broker did not acknowledge the readings")


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def cold_start(
    url: BrokerURL,
    *,
    train_devices: int = 16,
    holdout: int = 8,
    readings: int = 300,
    first: int = 50,
    seed: int = 0,
    root: str | None = None,
) -> ColdStart:
    """Run the experiment on the broker at ``url`` (see the module's docs)."""
    topics = Topics(root or f"fleet-bench-{time.time_ns()}")
    fleet = SensorFleet(train_devices + holdout, seed=seed, faults=False)
    t0 = time.time() - (readings + first) * STEP
    train = [fleet.read(i, t0 + k * STEP) for k in range(readings) for i in range(train_devices)]
    held = [
        fleet.read(i, t0 + k * STEP)
        for k in range(first)
        for i in range(train_devices, train_devices + holdout)
    ]
    got: dict[str, list[dict]] = {}
    lock = threading.Lock()

    def on_prediction(msg: Message) -> None:
        body = orjson.loads(msg.payload)
        with lock:
            got.setdefault(body["device"], []).extend(
                {**p, "fleet_version": body.get("fleet_version")} for p in body["predictions"]
            )

    def predicted(devices: set[str], n: int) -> bool:
        with lock:
            return all(len(got.get(d, ())) >= n for d in devices)

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        keys = init_keys(Path(tmp) / "keys")
        watch = stack.enter_context(
            Connection(url, f"fleet-bench-watch-{time.monotonic_ns()}", on_message=on_prediction)
            .connect()
        )  # fmt: skip
        watch.subscribe(topics.predictions(), qos=1)
        stop = threading.Event()
        agg = FleetAggregator(
            url, topics, AggregatorConfig(FLEET, load_signing_key(keys.private), min_interval=0.5)
        ).start()
        stack.callback(agg.close)
        threads = [threading.Thread(target=agg.run, args=(stop,), daemon=True)]
        half = PARTITIONS // 2
        edges = []
        for n, parts in enumerate((range(half), range(half, PARTITIONS)), 1):
            config = EdgeConfig(
                url,
                f"edge-{n}",
                topic_root=topics.root,
                model_name=FLEET,
                partitions=tuple(parts),
                deploy_key=str(keys.public),
                fleet=FLEET,
                fleet_interval=1.0,
                metrics_interval=60,
                summary_interval=0,
            )
            edges.append(EdgeService(config).start())
            threads.append(threading.Thread(target=edges[-1].run, daemon=True))
        for t in threads:
            t.start()

        def stop_all() -> None:
            for e in edges:
                e.stop()
            stop.set()
            for t in threads:
                t.join(30)

        stack.callback(stop_all)
        _publish(url, topics, train)
        names = set(fleet.device_ids[:train_devices])
        _wait(lambda: predicted(names, readings), 120, "the training devices' predictions")

        # The fleet model reflects every training reading once both edges have sent an
        # update of all they learned and both hold what the aggregator published after
        # those; held for a while, so that no publication was under way meanwhile.
        def reflected() -> bool:
            latest = list(agg.aggregator.latest.values())
            total = sum(u.readings for u in latest)
            version = agg.version
            return (
                len(latest) == 2
                and total == len(train)
                and version > 0
                and all(e.fleet.version == version for e in edges)
            )

        def settled() -> bool:
            if not reflected():
                return False
            time.sleep(1.5)  # longer than the aggregator's min_interval and a publication
            return reflected()

        _wait(settled, 90, "both edges to hold the fleet model of every training reading")
        version = agg.version
        _publish(url, topics, held)
        hold = set(fleet.device_ids[train_devices:])
        _wait(lambda: predicted(hold, first), 60, "the held-out devices' predictions")
    fleet_pairs, scratch_pairs = [], []
    for d in sorted(hold):
        rows = [r for r in held if r.device == d]
        preds = sorted(got[d], key=lambda p: p["seq"])
        assert [p["seq"] for p in preds] == [r.seq for r in rows], d
        # Every held-out device started from a fleet model that reflects all training
        # (a newer one may have come from the held-out devices' own first updates).
        started = {p["fleet_version"] for p in preds}
        assert len(started) == 1 and min(started) >= version, (d, started)
        fleet_pairs += [(r.y, p["y_pred"]) for r, p in zip(rows, preds)]
        scratch_pairs += list(zip((r.y for r in rows), _scratch(rows)))
    return ColdStart(_mae(fleet_pairs), _mae(scratch_pairs), version, len(train), len(held))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", type=BrokerURL.parse, help="default: a private Mosquitto")
    parser.add_argument("--train-devices", type=int, default=16)
    parser.add_argument("--holdout", type=int, default=8)
    parser.add_argument("--readings", type=int, default=300, help="per training device")
    parser.add_argument("--first", type=int, default=50, help="held-out readings scored")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with ExitStack() as stack:
        url = args.broker or stack.enter_context(PrivateMosquitto()).url
        r = cold_start(
            url,
            train_devices=args.train_devices,
            holdout=args.holdout,
            readings=args.readings,
            first=args.first,
            seed=args.seed,
        )
    print(
        f"{args.train_devices} training devices x {args.readings} readings through 2 edges "
        f"and an aggregator; fleet model version {r.version}"
    )
    print(f"{args.holdout} held-out devices, MAE over their first {args.first} readings:")
    print(f"  from the fleet model  {r.fleet_mae:10.2f} W")
    print(f"  from scratch          {r.scratch_mae:10.2f} W")
    print(f"  ratio                 {r.fleet_mae / r.scratch_mae:10.3f}")


if __name__ == "__main__":
    main()
