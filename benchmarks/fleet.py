"""Fleet learning against its two yardsticks: starting from scratch and central training.

    python benchmarks/fleet.py [--broker mqtt://HOST:PORT] [--seeds 0,1,2]
        [--train-devices 16] [--holdout 8] [--readings 300] [--first 50] [--folds 5]

Each experiment splits devices in two: the training devices' readings go through two
edges (``--fleet``, half the partitions each) and an aggregator
(:class:`~streampipe.fleet.service.FleetAggregator`) over a real Mosquitto (a private one
unless ``--broker``). Once both edges hold the fleet model that reflects all of them,
the held-out devices start, and the edges' predictions of their readings, from the fleet
model, are scored against

- **scratch**: River's predict-then-learn of the same readings from a fresh model (what
  an edge without ``--fleet`` predicts, bit for bit);
- **central**: one model that learned every training reading in arrival order (the
  order they were published: what one model fed by all edges would have seen, the upper
  bound federated learning approaches), then, copied for each held-out device,
  predict-then-learn of its readings, as an edge does from the fleet model.

Two fleets:

- the simulated one (:class:`~streampipe.sources.simulate.SensorFleet`: devices share
  their physics, power = V·pf·I + R·I² + k·(T − 15), but each has its own supply
  voltage, power factor, resistance, temperature coefficient and baselines):
  ``--train-devices`` x ``--readings`` readings, then ``--holdout`` devices scored over
  their first ``--first`` readings. Readings without faults (no dropouts, no spikes): the
  comparison is of starting points;
- River's ``ChickWeights`` (50 chicks, weighed every two days from birth, on one of four
  diets): one device per chick, features the day (``time``) and the diet one-hot
  (``diet_1`` … ``diet_4``), target the weight in grams. A chick's diet never changes, so
  its own scaler maps the one-hot to 0 and a chick learning alone learns from the day
  only; the fleet's scaler has seen all four diets. Fold ``f`` of ``--folds`` holds out
  the chicks whose number is ``f`` modulo ``--folds`` (each diet is held out in every
  fold), and scores *all* their readings (12 for most chicks, 2 to 11 for the few that
  died): ChickWeights has no 50 readings per chick.

The model is the edge's default, ``StandardScaler | LinearRegression``, in both.
Prints a table per fleet: MAE from the fleet model, from scratch, from the central model,
and the ratios fleet/scratch (the issue asks ≤ 0.5) and fleet/central (≤ 1.10).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from streampipe.broker import PrivateMosquitto
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.fleet.service import AggregatorConfig, FleetAggregator
from streampipe.learn import DEFAULT_MODEL_SPEC
from streampipe.learn.spec import ModelSpec
from streampipe.models.artifact import verify
from streampipe.models.keys import init_keys, load_signing_key, load_verify_key
from streampipe.publish import ReadingPublisher
from streampipe.readings import Reading
from streampipe.sources.simulate import SensorFleet
from streampipe.topics import PARTITIONS, Topics
from streampipe.transport import BrokerURL, Connection, Message

FLEET = "power"
STEP = 30.0  # seconds between a device's readings
#: A fixed start for the simulated readings (2026-01-01 00:00 UTC, chosen before any run
#: with it): the sensors follow the time of day, so a start taken from the clock made the
#: figures move with the hour of the run (seed 1's ratio to scratch: 0.23-0.48). Tests use it.
FIXED_START = 1_767_225_600.0
DIETS = (1, 2, 3, 4)  # ChickWeights' diets


@dataclass(frozen=True)
class ColdStart:
    fleet_mae: float  # held-out devices' readings, predicted by the edges from the fleet model
    scratch_mae: float  # the same readings, starting from scratch
    version: int  # of the fleet model they started from
    trained_readings: int
    holdout_readings: int
    central_mae: float = float("nan")  # the same readings, starting from the central model
    replayed_mae: float = float("nan")  # fleet_mae recomputed offline from the fleet model
    holdout_devices: int = 0


@dataclass(frozen=True)
class FleetRun:
    """What :func:`run_fleet` saw: the edges' predictions of each held-out device's
    readings (in seq order), the fleet model version each started from and those models.
    ``version`` is the first that reflected all training."""

    predictions: dict[str, list[float | None]]
    started: dict[str, int]
    models: dict[int, Any]
    version: int


def _mae(pairs: list[tuple[float, float | None]]) -> float:
    return sum(abs(y - (p if p is not None else 0.0)) for y, p in pairs) / len(pairs)


def predict_then_learn(model: Any, rows: list[Reading]) -> list[float]:
    """River's progressive validation of ``model`` (mutated) over ``rows``."""
    out = []
    for r in rows:
        out.append(model.predict_one(r.x))
        model.learn_one(r.x, r.y)
    return out


def _scratch(rows: list[Reading]) -> list[float]:
    return predict_then_learn(ModelSpec.parse(DEFAULT_MODEL_SPEC).build(), rows)


def central_model(train: list[Reading]) -> Any:
    """One model that learned every training reading in arrival order."""
    model = ModelSpec.parse(DEFAULT_MODEL_SPEC).build()
    for r in train:
        model.learn_one(r.x, r.y)
    return model


def _publish(url: BrokerURL, topics: Topics, readings: list[Reading]) -> None:
    with Connection(url, f"fleet-bench-pub-{time.monotonic_ns()}").connect() as conn:
        pub = ReadingPublisher(conn, topics, batch_size=25)
        for r in readings:
            pub.add(r)
        if not pub.wait_acked(60):
            raise RuntimeError("the broker did not acknowledge the readings")


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _counts(rows: list[Reading]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r.device] = out.get(r.device, 0) + 1
    return out


def run_fleet(
    url: BrokerURL, train: list[Reading], held: list[Reading], root: str | None = None
) -> FleetRun:
    """Publish ``train`` through two edges and an aggregator, wait until both edges hold
    the fleet model of all of it, then publish ``held``; return what the edges predicted."""
    topics = Topics(root or f"fleet-bench-{time.time_ns()}")
    got: dict[str, list[dict]] = {}
    models: dict[int, bytes] = {}  # fleet model artifacts by version, as published
    lock = threading.Lock()

    def on_message(msg: Message) -> None:
        body = orjson.loads(msg.payload) if msg.topic != model_topic else None
        with lock:
            if body is None:
                if msg.payload:
                    models[len(models)] = msg.payload
                return
            got.setdefault(body["device"], []).extend(
                {**p, "fleet_version": body.get("fleet_version")} for p in body["predictions"]
            )

    def predicted(want: dict[str, int]) -> bool:
        with lock:
            return all(len(got.get(d, ())) >= n for d, n in want.items())

    model_topic = topics.fleet_model(FLEET)
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        keys = init_keys(Path(tmp) / "keys")
        watch = stack.enter_context(
            Connection(url, f"fleet-bench-watch-{time.monotonic_ns()}", on_message=on_message)
            .connect()
        )  # fmt: skip
        watch.subscribe([topics.predictions(), model_topic], qos=1)
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
        _wait(lambda: predicted(_counts(train)), 120, "the training devices' predictions")

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
        _wait(lambda: predicted(_counts(held)), 60, "the held-out devices' predictions")
        public = load_verify_key(keys.public)
        with lock:
            arts = [verify(data, public) for data in models.values()]
    predictions, started = {}, {}
    for d in _counts(held):
        rows = [r for r in held if r.device == d]
        preds = sorted(got[d], key=lambda p: p["seq"])
        assert [p["seq"] for p in preds] == [r.seq for r in rows], d
        predictions[d] = [p["y_pred"] for p in preds]
        # Every held-out device started from a fleet model that reflects all training
        # (a newer one may have come from other held-out devices' first updates).
        (started[d],) = {p["fleet_version"] for p in preds}
        assert started[d] >= version, (d, started[d])
    models = {a.header.version: a.load() for a in arts if a.header.version in started.values()}
    return FleetRun(predictions, started, models, version)


def score(train: list[Reading], held: list[Reading], run: FleetRun) -> ColdStart:
    """The held-out devices' MAE from the fleet model (as the edges predicted, and as
    replayed offline from it), from scratch and from the central model."""
    central = central_model(train)
    fleet, replayed, scratch, centrally = [], [], [], []
    for d, preds in run.predictions.items():
        rows = [r for r in held if r.device == d]
        ys = [r.y for r in rows]
        fleet += zip(ys, preds)
        start = copy.deepcopy(run.models[run.started[d]])
        replayed += zip(ys, predict_then_learn(start, rows))
        scratch += zip(ys, _scratch(rows))
        centrally += zip(ys, predict_then_learn(copy.deepcopy(central), rows))
    return ColdStart(
        fleet_mae=_mae(fleet),
        scratch_mae=_mae(scratch),
        version=run.version,
        trained_readings=len(train),
        holdout_readings=len(held),
        central_mae=_mae(centrally),
        replayed_mae=_mae(replayed),
        holdout_devices=len(run.predictions),
    )


def cold_start(
    url: BrokerURL,
    *,
    train_devices: int = 16,
    holdout: int = 8,
    readings: int = 300,
    first: int = 50,
    seed: int = 0,
    root: str | None = None,
    start: float | None = None,
) -> ColdStart:
    """The simulated fleet's experiment on the broker at ``url`` (see the module's docs).
    Its readings start at ``start`` (Unix time; by default so that they end now): the
    simulated sensors follow the time of day, and so do the figures."""
    fleet = SensorFleet(train_devices + holdout, seed=seed, faults=False)
    t0 = time.time() - (readings + first) * STEP if start is None else start
    train = [fleet.read(i, t0 + k * STEP) for k in range(readings) for i in range(train_devices)]
    held = [
        fleet.read(i, t0 + k * STEP)
        for k in range(first)
        for i in range(train_devices, train_devices + holdout)
    ]
    return score(train, held, run_fleet(url, train, held, root))


def chick_readings(t0: float) -> list[Reading]:
    """River's ChickWeights as readings, in the dataset's order (by day, then chick): one
    device per chick, the day and the diet one-hot as features, the weight as target."""
    from river import datasets

    seqs: dict[int, int] = {}
    out = []
    for x, y in datasets.ChickWeights():
        chick = int(x["chick"])
        seq = seqs.get(chick, 0)
        seqs[chick] = seq + 1
        features = {"time": float(x["time"])}
        features |= {f"diet_{d}": float(x["diet"] == d) for d in DIETS}
        out.append(Reading(f"chick-{chick:02d}", seq, t0 + x["time"] * STEP, features, float(y)))
    return out


def chick_weights(
    url: BrokerURL, *, fold: int = 0, folds: int = 5, root: str | None = None
) -> ColdStart:
    """ChickWeights' experiment, holding out the chicks numbered ``fold`` mod ``folds``."""
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in 0..{folds - 1}, not {fold}")
    rows = chick_readings(time.time() - 30 * STEP)
    held = [r for r in rows if int(r.device.split("-")[1]) % folds == fold]
    train = [r for r in rows if int(r.device.split("-")[1]) % folds != fold]
    return score(train, held, run_fleet(url, train, held, root))


def _table(title: str, key: str, rows: list[tuple[object, ColdStart]]) -> None:
    print(title)
    print(
        f"  {key:>5} {'version':>7} {'fleet MAE':>10} {'scratch':>10} {'central':>10} "
        f"{'fleet/scratch':>13} {'fleet/central':>13}"
    )
    for k, r in rows:
        print(
            f"  {k!s:>5} {r.version:>7} {r.fleet_mae:>10.2f} {r.scratch_mae:>10.2f} "
            f"{r.central_mae:>10.2f} {r.fleet_mae / r.scratch_mae:>13.3f} "
            f"{r.fleet_mae / r.central_mae:>13.3f}"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", type=BrokerURL.parse, help="default: a private Mosquitto")
    parser.add_argument("--seeds", default="0,1,2", help="simulated fleets, by seed")
    parser.add_argument("--train-devices", type=int, default=16)
    parser.add_argument("--holdout", type=int, default=8)
    parser.add_argument("--readings", type=int, default=300, help="per training device")
    parser.add_argument("--first", type=int, default=50, help="held-out readings scored")
    parser.add_argument("--folds", type=int, default=5, help="ChickWeights folds; 0: none")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    with ExitStack() as stack:
        url = args.broker or stack.enter_context(PrivateMosquitto()).url
        sim = []
        for seed in seeds:
            r = cold_start(
                url,
                train_devices=args.train_devices,
                holdout=args.holdout,
                readings=args.readings,
                first=args.first,
                seed=seed,
            )
            sim.append((seed, r))
            print(f"simulated fleet, seed {seed}: done", file=sys.stderr)
        chicks = []
        for fold in range(args.folds):
            chicks.append((fold, chick_weights(url, fold=fold, folds=args.folds)))
            print(f"ChickWeights, fold {fold}: done", file=sys.stderr)
    if sim:
        _table(
            f"Simulated fleet: {args.train_devices} training devices x {args.readings} "
            f"readings through 2 edges and an aggregator; {args.holdout} held-out devices, "
            f"MAE (W) over their first {args.first} readings",
            "seed",
            sim,
        )
    if chicks:
        r = chicks[0][1]
        _table(
            f"ChickWeights: one device per chick, {args.folds} folds; the held-out chicks "
            f"(~{r.holdout_devices} a fold) scored over all their readings (~12 each), "
            f"MAE (g); the others ({r.trained_readings}-odd readings) through 2 edges and "
            "an aggregator",
            "fold",
            chicks,
        )
    for name, rows in (("simulated", sim), ("ChickWeights", chicks)):
        for k, r in rows:
            if abs(r.replayed_mae - r.fleet_mae) > 1e-6 * max(1.0, r.fleet_mae):
                print(
                    f"note: {name} {k}: the edges' fleet MAE {r.fleet_mae:.6f} differs from "
                    f"predict-then-learn from the fleet model, {r.replayed_mae:.6f}"
                )


if __name__ == "__main__":
    main()
