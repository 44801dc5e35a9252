"""The pipeline against River offline, a naive JSON pipeline and the broker, in one run.

    python benchmarks/pipeline.py [--readings 100000] [--repeat 3] [--quick] [--only mini]

Starts a private Mosquitto and measures, on River's ``datasets.synth.Friedman``
(seed 42, 10 features) with ``StandardScaler | LinearRegression`` (or ``--model``):

0. the broker alone, with Mosquitto's C clients: one ``mosquitto_pub -l`` publishes
   40-byte messages (QoS 1), one ``mosquitto_sub`` receives them — the most small
   messages per second this broker passes on this machine;
1. River offline: a ``predict_one`` + ``learn_one`` loop over dicts in memory;
2. a naive pipeline: one JSON message per reading (QoS 1, paho's defaults),
   ``predict_one``/``learn_one`` inside ``on_message``, one JSON prediction per
   reading (QoS 1) — on the first ``--naive-readings`` readings, as it is slow;
3. streampipe end to end: ``streampipe replay`` (CSV) → Mosquitto → ``streampipe edge``
   → every prediction received by a subscriber (``mosquitto_sub``, which stamps each
   message as it arrives), in exact and in mini-batch mode. Timed from the first
   reading's timestamp (stamped by replay as it reads the file) to the last prediction
   received; exact mode's predictions are checked against row 1's;
   exact mode also with ``--state-dir``, where input is acknowledged only after a
   checkpoint covers it;
4. latency: 100 devices at 10, 25 and 50 readings/s each (up to 5,000 single-reading
   messages/s offered) for ``--latency-seconds``, in ``--sensor-processes`` processes
   of ``benchmarks/devices.py`` (frames encoded beforehand, published on time, 1 ms
   ticks; ``--latency-feed sensors``: ``streampipe sensors --linger 1``, which
   simulates and encodes as it goes): p50/p99/max of prediction-received time minus
   the time the reading was due; with one edge, then (4b) with two edges that split
   the reading partitions (``--partitions 0-31`` and ``32-63``), one per core, then
   (4c, ``--own-core``) with one edge that has the last core to itself, while the
   devices, the broker and the subscriber share the others;
5. the edge's peak RSS (VmHWM) after learning one model for each of 10,000 devices.

Throughput rows are medians of ``--repeat`` runs; a ratio is the median of the ratios
taken within each run. What streampipe adds to River per reading (exact mode's time
per reading minus River offline's) hardly depends on the model, so exact mode's ratio
to offline is higher the more a model costs: ``--model`` measures another (a spec as
``streampipe edge --model`` takes it).
``--only`` runs some rows only (``--only mini``, ``--only exact,durable``); the ratios
need rows 1 and 2, so they are printed only when those ran.
Every stage runs in its own process, as it would in use: this machine has two cores,
which the replay, the broker, the edge and the subscriber share.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import orjson
import paho.mqtt.client as paho
from river import datasets

# The streampipe of this checkout, here and in the subprocesses (an installed one may
# be another checkout's).
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from streampipe.broker import PrivateMosquitto  # noqa: E402
from streampipe.learn.spec import DEFAULT_MODEL_SPEC, ModelSpec  # noqa: E402
from streampipe.publish import ReadingPublisher  # noqa: E402
from streampipe.sources.simulate import SensorFleet  # noqa: E402
from streampipe.topics import PARTITIONS, Topics  # noqa: E402
from streampipe.transport import BrokerURL, Connection  # noqa: E402

STREAMPIPE = [sys.executable, "-m", "streampipe"]
#: Whether row 4c can give an edge a CPU of its own: Linux, and two CPUs at least.
CAN_PIN = hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1


#: The model of every row, as ``--model`` gives it (by default the edge's own, the
#: issue's ``StandardScaler | LinearRegression``).
MODEL = DEFAULT_MODEL_SPEC


def model():
    return ModelSpec.parse(MODEL).build()


# -- 1. River offline ------------------------------------------------------------------


def river_offline(rows: list) -> tuple[float, list[float]]:
    m = model()
    preds = []
    start = time.perf_counter()
    for x, y in rows:
        preds.append(m.predict_one(x))
        m.learn_one(x, y)
    return len(rows) / (time.perf_counter() - start), preds


# -- helpers -----------------------------------------------------------------------------


class Collector:
    """Receives the predictions and the edge's status, with Mosquitto's own C client.

    ``mosquitto_sub`` stamps each message as it receives it (``%U``) and prints it
    as a line; this process only counts predictions as lines arrive and parses them
    after the run, so the subscriber takes as little as it can of the two cores the
    pipeline it measures runs on (a paho + orjson subscriber took ~45 µs of CPU per
    message: over a tenth of the two cores at 5,000 messages/s).
    """

    def __init__(
        self, url: BrokerURL, topics: Topics, expect: int, keep: bool = False, edges: int = 1
    ) -> None:
        self.topics, self.expect, self.keep, self.edges = topics, expect, keep, edges
        self.count = 0
        self.first_ts = float("inf")
        self.last_received = 0.0
        self.latencies: list[np.ndarray] = []
        self.y_pred: dict[int, float] = {}
        self.online = threading.Event()
        self.done = threading.Event()
        self._lines: list[bytes] = []
        if shutil.which("mosquitto_sub") is None:
            raise RuntimeError("mosquitto_sub not found: apt-get install mosquitto-clients")
        # One SUBSCRIBE for both filters: once the edge's status arrives, the
        # predictions' subscription is in place too.
        self._sub = subprocess.Popen(
            ["mosquitto_sub", "-h", url.host, "-p", str(url.port), "-q", "1",
             "-i", f"bench-{os.getpid()}-{time.monotonic_ns()}", "-F", "%U %t %p",
             "-t", topics.predictions(), "-t", topics.status()],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        self._status = self.topics.status("").encode()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._sub.stdout is not None
        online: set[bytes] = set()
        for line in self._sub.stdout:  # "<received> <topic> <payload>"
            topic = line.split(b" ", 2)[1]
            if topic.startswith(self._status):
                if line.endswith(b" online\n"):
                    online.add(topic)
                    if len(online) >= self.edges:  # every edge is serving
                        self.online.set()
                continue
            self._lines.append(line)
            self.count += line.count(b'{"seq":')
            if self.count >= self.expect:
                self.done.set()

    def close(self) -> None:
        """Stop receiving, then parse what was received."""
        self._sub.terminate()
        self._sub.wait(10)
        self._reader.join(10)
        for line in self._lines:
            received, _, payload = line.split(b" ", 2)
            now = float(received)
            preds = orjson.loads(payload)["predictions"]
            ts = np.fromiter((p["ts"] for p in preds), float, len(preds))
            self.latencies.append(now - ts)
            self.first_ts = min(self.first_ts, float(ts.min()))
            self.last_received = max(self.last_received, now)
            if self.keep:
                self.y_pred.update((p["seq"], p["y_pred"]) for p in preds)
        self._lines.clear()


@contextlib.contextmanager
def edges(
    url: str, topics: Topics, *extra: str, count: int = 1, cpus: set[int] | None = None
) -> Iterator[list[subprocess.Popen]]:
    """``count`` edge processes, each serving an equal share of the reading partitions
    (``--partitions``), as one would run an edge per core; on ``cpus`` if given (as
    ``taskset`` would: the threads an edge starts inherit it)."""
    procs = []
    try:
        for k in range(count):
            command = [*STREAMPIPE, "edge", "--broker", url, "--stage-id", f"bench{k}",
                       "--topic-root", topics.root, "--metrics-port", "-1", "--model", MODEL,
                       *extra]  # fmt: skip
            if count > 1:  # edge k of 2: 0-31, 32-63
                first, last = k * PARTITIONS // count, (k + 1) * PARTITIONS // count - 1
                command += ["--partitions", f"{first}-{last}"]
            procs.append(subprocess.Popen(command, stderr=subprocess.DEVNULL))
            if cpus is not None:  # long before the edge starts a thread
                os.sched_setaffinity(procs[-1].pid, cpus)
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(60)


def run_edge_case(
    broker: PrivateMosquitto,
    n: int,
    keep: bool,
    edge_args: list[str],
    feed: Callable[[str, Topics], int | None],
    count: int = 1,
    cpus: set[int] | None = None,
) -> Collector:
    """Start ``count`` edges (on ``cpus``, if given), ``feed`` them, wait for ``n``
    predictions (or as many as fed)."""
    topics = Topics(f"bench{time.monotonic_ns()}")
    url = f"mqtt://127.0.0.1:{broker.port}"
    col = Collector(broker.url, topics, n, keep, count)
    try:
        with edges(url, topics, *edge_args, count=count, cpus=cpus):
            if not col.online.wait(60):
                raise RuntimeError("the edges did not come online")
            sent = feed(url, topics)
            if sent is not None:
                col.expect = sent
                if col.count >= sent:
                    col.done.set()
            if not col.done.wait(900):
                raise RuntimeError(f"only {col.count:,} of {col.expect:,} predictions arrived")
    finally:
        col.close()
    return col


# -- 0. the broker alone -----------------------------------------------------------------


def broker_alone(broker: PrivateMosquitto, n: int) -> float:
    """Messages/s through the broker alone: Mosquitto's own C clients, QoS 1, one
    publisher (``mosquitto_pub -l``: a message per line) and one subscriber, 40-byte
    payloads like a 1-reading frame. The ceiling for one message per reading."""
    port = str(broker.port)
    sub = subprocess.Popen(
        ["stdbuf", "-oL", "mosquitto_sub", "-d", "-h", "127.0.0.1", "-p", port,
         "-t", "bench/alone", "-q", "1", "-C", str(n)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert sub.stdout is not None
    subscribed = threading.Event()

    def read() -> None:  # -d prints the SUBACK, then a few lines per message
        for line in sub.stdout:  # type: ignore[union-attr]
            if b"SUBACK" in line:
                subscribed.set()

    threading.Thread(target=read, daemon=True).start()
    if not subscribed.wait(10):
        raise RuntimeError("mosquitto_sub did not subscribe")
    start = time.perf_counter()
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-t", "bench/alone", "-q", "1", "-l"],
        input=(b"x" * 39 + b"\n") * n,
        check=True,
    )
    sub.wait(300)
    return n / (time.perf_counter() - start)


# -- 2. the naive pipeline -------------------------------------------------------------


def _naive_edge(port: int, ready: multiprocessing.Event) -> None:
    m = model()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="naive-edge")

    def on_message(c, userdata, msg):
        r = json.loads(msg.payload)
        y_pred = m.predict_one(r["x"])
        m.learn_one(r["x"], r["y"])
        c.publish("naive/predictions", json.dumps({"seq": r["seq"], "y_pred": y_pred}), qos=1)

    client.on_message = on_message
    client.on_subscribe = lambda *a: ready.set()
    client.connect("127.0.0.1", port)
    client.subscribe("naive/readings", qos=1)
    client.loop_forever()


def naive(broker: PrivateMosquitto, rows: list) -> float:
    n = len(rows)
    ready = multiprocessing.Event()
    proc = multiprocessing.get_context("fork").Process(
        target=_naive_edge, args=(broker.port, ready), daemon=True
    )
    proc.start()
    got, done = [0], threading.Event()

    def on_message(c, userdata, msg):
        got[0] += 1
        if got[0] >= n:
            done.set()

    subscribed = threading.Event()
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="naive-sub")
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe("naive/predictions", qos=1)
    sub.loop_start()
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="naive-pub")
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:
        if not (ready.wait(30) and subscribed.wait(30)):
            raise RuntimeError("the naive edge or its subscriber did not subscribe")
        start = time.perf_counter()
        for i, (x, y) in enumerate(rows):
            pub.publish("naive/readings", json.dumps({"seq": i, "x": x, "y": y}), qos=1)
        if not done.wait(600):
            raise RuntimeError(f"naive: only {got[0]} of {n} predictions")
        return n / (time.perf_counter() - start)
    finally:
        pub.loop_stop()
        sub.loop_stop()
        proc.terminate()
        proc.join(10)


# -- 3. streampipe end to end ----------------------------------------------------------


def end_to_end(
    broker,
    csv_path: Path,
    n: int,
    batch: int,
    mode: str,
    offline: list[float],
    state_dir: Path | None = None,
):
    def feed(url: str, topics: Topics) -> None:
        subprocess.run(
            [
                *STREAMPIPE,
                "replay",
                str(csv_path),
                "--broker",
                url,
                "--target",
                "y",
                "--batch",
                str(batch),
                "--topic-root",
                topics.root,
                "--rate",
                "max",
            ],
            capture_output=True,
            check=True,
        )

    extra = ["--mode", mode]
    if state_dir is not None:  # checkpoints before acknowledgements (the commit protocol)
        shutil.rmtree(state_dir, ignore_errors=True)
        extra += ["--state-dir", str(state_dir)]
    col = run_edge_case(broker, n, mode == "exact", extra, feed)
    rate = n / (col.last_received - col.first_ts)
    if mode == "exact":
        got = [col.y_pred[i] for i in range(n)]
        if got != offline:
            raise RuntimeError("exact mode's predictions differ from River offline")
    return rate


# -- 4. latency --------------------------------------------------------------------------


@contextlib.contextmanager
def rest_of_pipeline_on(broker: PrivateMosquitto) -> Iterator[set[int]]:
    """Move the broker and this process (the devices and the collector it starts
    inherit it) off the last CPU, and give that CPU to the edge."""
    every = os.sched_getaffinity(0)
    edge = {max(every)}
    pids = [0, broker.process.pid]  # this (the main) thread, Mosquitto's only one
    for pid in pids:
        os.sched_setaffinity(pid, every - edge)
    try:
        yield edge
    finally:
        for pid in pids:
            os.sched_setaffinity(pid, every)


def latency(
    broker,
    devices: int,
    rate: float,
    seconds: float,
    processes: int,
    feed: str,
    linger: float,
    edge_count: int = 1,
    own_core: bool = False,
):
    """p50/p99/max latency in ms, and how many readings, with the devices split over
    ``processes`` processes (real devices do not share one Python interpreter):
    ``benchmarks/devices.py`` (``feed="frames"``) or ``streampipe sensors``; and the
    partitions over ``edge_count`` edges. With ``own_core`` the edge has the last core
    to itself, and the devices, the broker and the collector share the others."""
    n = int(devices * rate * seconds)

    def command(url: str, topics: Topics, k: int, start: float) -> list[str]:
        each = ["--devices", str(devices // processes), "--rate", str(rate), "--seed", str(k)]
        if feed == "frames":
            return [sys.executable, str(ROOT / "benchmarks" / "devices.py"), url, topics.root,
                    *each, "--seconds", str(seconds), "--start", repr(start),
                    "--process", f"{k}/{processes}", "--prefix", f"d{k}-",
                    "--tick", str(linger)]  # fmt: skip
        return [*STREAMPIPE, "sensors", "--broker", url, "--topic-root", topics.root, *each,
                "--duration", str(seconds), "--linger", str(linger), "--no-faults",
                "--prefix", f"s{k}-"]  # fmt: skip

    def run(url: str, topics: Topics) -> int:
        start = time.time() + 3.0  # time for the device processes to start and encode
        procs = [
            subprocess.Popen(
                command(url, topics, k, start),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for k in range(processes)
        ]
        outs = [p.communicate(timeout=seconds + 180)[0] for p in procs]
        # each prints "published N readings ..."
        return sum(int(out.split()[1].replace(",", "")) for out in outs)

    if own_core:
        with rest_of_pipeline_on(broker) as edge_cpu:
            col = run_edge_case(broker, 2 * n, False, [], run, edge_count, edge_cpu)
    else:
        col = run_edge_case(broker, 2 * n, False, [], run, edge_count)
    lat = np.concatenate(col.latencies) * 1000
    return (
        float(np.percentile(lat, 50)),
        float(np.percentile(lat, 99)),
        float(lat.max()),
        len(lat),
    )


# -- 5. memory ---------------------------------------------------------------------------


def memory(broker, devices: int) -> tuple[float, float]:
    """Peak RSS of an edge that learned one model per device (2 readings each)."""
    peak = {}

    def feed(url: str, topics: Topics) -> None:
        pid = proc_holder["pid"]
        peak["before"] = _status_kb(pid, "VmRSS")
        fleet = SensorFleet(devices, seed=1, faults=False)
        conn = Connection(broker.url, "bench-mem", max_inflight=1000).connect()
        pub = ReadingPublisher(conn, topics, batch_size=2, linger=60)
        now = time.time()
        for _ in range(2):
            for i in range(devices):
                pub.add(fleet.read(i, now))
        pub.wait_acked(300)
        conn.close()

    proc_holder: dict[str, int] = {}
    topics = Topics(f"bench{time.monotonic_ns()}")
    url = f"mqtt://127.0.0.1:{broker.port}"
    col = Collector(broker.url, topics, 2 * devices)
    try:
        with edges(url, topics) as (proc,):
            proc_holder["pid"] = proc.pid
            if not col.online.wait(60):
                raise RuntimeError("the edge did not come online")
            feed(url, topics)
            if not col.done.wait(600):
                raise RuntimeError(f"only {col.count:,} predictions arrived")
            peak["after"] = _status_kb(proc.pid, "VmHWM")
    finally:
        col.close()
    return peak["before"] / 1024, peak["after"] / 1024


def _status_kb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


# -- main --------------------------------------------------------------------------------

#: The throughput rows, by the name ``--only`` knows them by.
THROUGHPUT = {
    "broker": "0. Mosquitto alone (C clients), 40 B messages, QoS 1",
    "offline": "1. River offline predict_one + learn_one",
    "naive": "2. naive pipeline: JSON per reading, QoS 1",
    "exact": "3a. streampipe end to end, exact",
    "durable": "3b. ... exact, with --state-dir (checkpointed acks)",
    "mini": "3c. streampipe end to end, mini-batch",
}
ROWS = (*THROUGHPUT, "latency", "memory")


def main() -> None:
    global MODEL
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readings", type=int, default=100_000)
    parser.add_argument("--naive-readings", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--sensor-processes", type=int, default=2, help="row 4's devices")
    parser.add_argument(
        "--latency-linger",
        type=float,
        default=1.0,
        metavar="MS",
        help="row 4: --linger of the sensors, --tick of devices.py (1)",
    )
    parser.add_argument(
        "--latency-feed",
        choices=("frames", "sensors"),
        default="frames",
        help="row 4's devices: benchmarks/devices.py (lean), or `streampipe sensors`",
    )
    parser.add_argument(
        "--latency-rates",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[10.0, 25.0, 50.0],
        help="row 4: readings/s per device, comma-separated (10,25,50)",
    )
    parser.add_argument(
        "--latency-edges",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 2],
        metavar="COUNTS",
        help="row 4: edges sharing the partitions, comma-separated (1,2: one, then one "
        "per core, each at every rate)",
    )
    parser.add_argument(
        "--own-core",
        action=argparse.BooleanOptionalAction,
        default=CAN_PIN,
        help="row 4c: one edge with a core to itself, the rest of the pipeline on the "
        "others (default: where the OS lets a process choose its CPUs, and it has two)",
    )
    parser.add_argument("--devices", type=int, default=10_000, help="row 5's device count")
    parser.add_argument("--model", default=MODEL, help=f"every row's model ({MODEL})")
    parser.add_argument("--quick", action="store_true", help="small sizes, one run: a smoke test")
    parser.add_argument(
        "--only",
        type=lambda v: set(v.split(",")),
        default=set(ROWS),
        metavar="ROWS",
        help=f"comma-separated rows to run, of {','.join(ROWS)} (default: all)",
    )
    args = parser.parse_args()
    if not all(1 <= k <= PARTITIONS for k in args.latency_edges):
        parser.error(f"--latency-edges: each count is 1 to {PARTITIONS} (an edge per partition)")
    if args.own_core and not CAN_PIN:
        parser.error("--own-core: needs two CPUs and sched_setaffinity (Linux)")
    if unknown := args.only - set(ROWS):
        parser.error(f"--only: no row {', '.join(sorted(unknown))} (rows: {', '.join(ROWS)})")
    MODEL = args.model
    try:
        model()
    except ValueError as exc:
        parser.error(f"--model: {exc}")
    if args.quick:
        args.readings, args.naive_readings, args.repeat = 5_000, 1_000, 1
        args.latency_seconds, args.devices = 2.0, 500

    # One str object per feature name, as River's own datasets and iter_csv give: a
    # dict lookup that meets the very key object it stored skips comparing strings,
    # which makes River ~4 % faster than with a new string per reading.
    names = {k: f"x{k}" for k in range(10)}
    rows = [
        ({names[k]: v for k, v in x.items()}, y)
        for x, y in datasets.synth.Friedman(seed=42).take(args.readings)
    ]
    only = args.only
    runs: dict[str, list[float]] = {k: [] for k in THROUGHPUT if k in only}
    with tempfile.TemporaryDirectory() as tmp, PrivateMosquitto() as broker:
        path = Path(tmp) / "friedman.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            header = list(rows[0][0])
            w.writerow([*header, "y"])
            for x, y in rows:
                w.writerow([repr(x[k]) for k in header] + [repr(y)])
        for i in range(args.repeat if runs else 0):
            print(f"# run {i + 1} of {args.repeat}", file=sys.stderr)
            if "broker" in only:
                runs["broker"].append(broker_alone(broker, min(args.readings, 50_000)))
            offline: list[float] = []
            if only & {"offline", "exact", "durable"}:  # exact mode is checked against it
                rate, offline = river_offline(rows)
                if "offline" in only:
                    runs["offline"].append(rate)
            if "naive" in only:
                runs["naive"].append(naive(broker, rows[: args.naive_readings]))
            if "exact" in only:
                runs["exact"].append(
                    end_to_end(broker, path, len(rows), args.batch, "exact", offline)
                )
            if "durable" in only:
                runs["durable"].append(
                    end_to_end(
                        broker, path, len(rows), args.batch, "exact", offline, Path(tmp) / "state"
                    )
                )
            if "mini" in only:
                runs["mini"].append(
                    end_to_end(broker, path, len(rows), args.batch, "minibatch", [])
                )
        lat_rows = []
        # This process receives every prediction: its collector must not stall on full
        # collections of what the throughput rows left (100,000 rows of dicts).
        gc.collect()
        gc.freeze()
        setups = [(count, False) for count in args.latency_edges]
        if args.own_core:
            setups.append((1, True))
        for count, own_core in setups if "latency" in only else []:
            for rate in args.latency_rates:
                print(f"# latency at {rate:g} readings/s per device, {count} edge(s)"
                      + (" on a core of its own" if own_core else ""),
                      file=sys.stderr)  # fmt: skip
                lat_rows.append(
                    (
                        rate,
                        count,
                        own_core,
                        *latency(
                            broker,
                            100,
                            rate,
                            args.latency_seconds,
                            args.sensor_processes,
                            args.latency_feed,
                            args.latency_linger,
                            count,
                            own_core,
                        ),
                    )
                )
        if "memory" in only:
            print("# memory", file=sys.stderr)
            rss_idle, rss_peak = memory(broker, args.devices)

    med = {k: statistics.median(v) for k, v in runs.items()}
    throughput = (
        f"{len(rows):,} Friedman readings (naive: {args.naive_readings:,}), batch "
        f"{args.batch}, median of {args.repeat}; "
        if runs
        else ""
    )
    print(f"# {throughput}Python {sys.version.split()[0]}, {os.cpu_count()} cores; model {MODEL}")
    print(f"{'what':<52} {'value':>14} {'÷ row 1':>8} {'÷ row 2':>8}")

    def per_run(kind: str, base: str) -> list[float]:
        """The ratios of two rows measured within each run (the machine's load changes
        between runs, and moves both rows of one run alike)."""
        return [a / b for a, b in zip(runs[kind], runs[base], strict=True)]

    def ratio(kind: str, base: str, fmt: str) -> str:
        if base not in runs:
            return f"{'':>8}"
        return f"{statistics.median(per_run(kind, base)):>8{fmt}}"

    for kind, label in THROUGHPUT.items():
        if kind in med:
            v = med[kind]
            print(f"{label:<52} {v:>10,.0f} r/s {ratio(kind, 'offline', '.2f')} "
                  f"{ratio(kind, 'naive', '.1f')}")  # fmt: skip
    for rate, edge_count, own_core, p50, p99, worst, count in lat_rows:
        label = f"4. latency (ms), 100 devices x {rate:g}/s = {100 * rate:,.0f}/s"
        if edge_count > 1:
            label = f"4b. ... {100 * rate:,.0f}/s, {edge_count} edges (--partitions)"
        if own_core:
            label = f"4c. ... {100 * rate:,.0f}/s, 1 edge on a core of its own"
        print(f"{label:<52} p50 {p50:.1f}  p99 {p99:.1f}  max {worst:.1f}  ({count:,} readings)")
    if "memory" in only:
        print(
            f"{f'5. edge RSS, {args.devices:,} devices (MB)':<52} "
            f"peak {rss_peak:.0f}  (idle, before any device: {rss_idle:.0f})"
        )
    if runs:
        print(
            "# per-run readings/s: "
            + "; ".join(f"{k} " + ", ".join(f"{v:,.0f}" for v in vs) for k, vs in runs.items())
        )
    if "offline" in runs and len(runs) > 1:
        print(
            "# per-run ratios to row 1: "
            + "; ".join(
                f"{k} " + ", ".join(f"{r:.2f}" for r in per_run(k, "offline"))
                for k in runs
                if k != "offline"
            )
        )
    if "offline" in runs and "exact" in runs:
        added = [1e6 / e - 1e6 / o for e, o in zip(runs["exact"], runs["offline"], strict=True)]
        print(
            f"# streampipe's cost per reading beyond River's (exact minus offline, µs): "
            f"median {statistics.median(added):.1f}; per run "
            + ", ".join(f"{a:.1f}" for a in added)
        )


if __name__ == "__main__":
    main()
