"""What one ``streampipe ingest`` gateway sustains: Zigbee2MQTT-like JSON messages of one
reading each, mapped to native readings, against the broker's own limit.

    python benchmarks/ingest.py [--runs 3] [--seconds 5] [--quick]

Starts a private Mosquitto and one gateway process (``python -m streampipe ingest --map
…``, its defaults otherwise: batch 100, linger 100 ms, queue 10,000; ``--linger MS``
sets another). Two sender processes, 50 devices each, publish QoS 1 JSON messages like
a Zigbee2MQTT plug's (the simulated fleet's five features, ``power``, ``voltage``,
``linkquality``, ``state``, and ``sent``: the send time), each at half the offered rate,
for ``--seconds``, each over one connection as a Zigbee2MQTT bridge does: by default
``benchmarks/rawsender.py``, a few µs a message, or with ``--sender paho``
``benchmarks/pahosender.py``, paho-mqtt clients, which take a core of their own at
8,000 messages/s. ``mosquitto_sub`` takes the gateway's native readings (and their
schemas) and stamps each as it arrives; this process decodes them after each step. The
mapping makes ``sent`` the reading's time, so a reading's latency is its arrival minus
its send time.

For each offered rate, in the same run:

* **broker**: the same senders to topics no gateway claims, the measuring subscriber
  (``mosquitto_sub``) subscribed to them directly: the broker's (and this machine's)
  own limit and latency;
* **gateway**: the senders to ``zigbee2mqtt/<device>``, through the gateway.

Throughput is readings received divided by the time from the first send to the last
arrival (a gateway that falls behind shows it here, and in its latency). CPU per message
is the gateway's user + system time (``/proc/<pid>/stat``) over the step, divided by the
messages it mapped. Medians of ``--runs`` runs; the ratio (gateway/broker) is taken
within each run, then its median, and so are the latencies the gateway adds (+p50,
+p99: the gateway's percentile minus the broker's). "lost" is the most messages sent
and not received in a run; the broker drops what overflows its queue for the gateway
(``max_queued_messages``), and the table says so when its log does. Everything shares
this machine's cores: senders, broker, gateway and subscriber.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from streampipe.broker import PrivateMosquitto
from streampipe.codec import CodecError, SchemaRegistry, decode
from streampipe.codec.columns import Reader

#: What Mosquitto logs (at notice level) when it drops messages queued for a client.
DROPPED = "Outgoing messages are being dropped for client streampipe-ingest"
DEVICES_PER_SENDER = 50
SENDERS = 2
ROOT = "bench"
MAPPING = """
[[source]]
name = "z2m"
topic = "zigbee2mqtt/{device}"
exclude = ["zigbee2mqtt/bridge/#"]
target = "$.power"
timestamp = { path = "$.sent", format = "unix" }
"""


@dataclass
class Step:
    sent: int = 0
    received: int = 0
    seconds: float = math.nan
    latencies: list[float] = field(default_factory=list)
    cpu: float = math.nan  # gateway CPU seconds over the step

    @property
    def rate(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else math.nan

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return math.nan
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))]


class Subscriber:
    """Receives the gateway's native readings, or the senders' messages directly.

    ``mosquitto_sub`` stamps each message as it receives it (``%U``) and prints it as
    a line; this process reads the lines, counts the readings in each frame's header,
    and decodes them only once a step is over, so the measuring subscriber takes as
    little as it can of the two cores it measures (a paho subscriber here took a
    fifth of a core at 2,000 frames/s).
    """

    def __init__(self, port: int) -> None:
        if shutil.which("mosquitto_sub") is None:
            raise RuntimeError("mosquitto_sub not found: apt-get install mosquitto-clients")
        self.schemas = SchemaRegistry()
        self.lock = threading.Lock()
        self.lines: list[bytes] = []
        self.received = 0  # readings in the lines of this step
        self.last_arrival = 0.0
        self.sub = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-V", "5",
             "-i", f"bench-sub-{time.time_ns()}", "-F", "%U %t %x",
             "-t", f"{ROOT}/readings/+/+", "-t", f"{ROOT}/schemas/+", "-t", "direct/+",
             "-t", f"{ROOT}/status/bench"],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        self.online = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.sub.stdout is not None
        for line in self.sub.stdout:  # "<received> <topic> <hex payload>"
            _, topic, payload = line.split(b" ", 2)
            if topic.startswith(f"{ROOT}/status/".encode()):
                if bytes.fromhex(payload.decode()) == b"online":
                    self.online.set()
                continue
            if topic.startswith(f"{ROOT}/schemas/".encode()):
                self.schemas.add_frame(
                    bytes.fromhex(payload.decode()), topic.rsplit(b"/", 1)[1].decode()
                )
                continue
            n = 1 if topic.startswith(b"direct/") else readings_in(bytes.fromhex(payload.decode()))
            with self.lock:
                self.lines.append(line)
                self.received += n
                self.last_arrival = time.time()

    def reset(self) -> Step:
        """What arrived since the last reset, decoded now."""
        with self.lock:
            lines, self.lines, self.received = self.lines, [], 0
        step = Step()
        for line in lines:
            stamp, topic, payload = line.split(b" ", 2)
            received = float(stamp)
            raw = bytes.fromhex(payload.decode())
            if topic.startswith(b"direct/"):
                sent = [orjson.loads(raw)["sent"]]
            else:
                try:
                    sent = decode(raw, self.schemas).ts.tolist()
                except CodecError as e:
                    print(f"undecodable reading frame: {e}", file=sys.stderr)
                    continue
            step.received += len(sent)
            step.latencies.extend(received - s for s in sent)
        return step

    def close(self) -> None:
        self.sub.terminate()
        self.sub.wait(10)


def readings_in(frame: bytes) -> int:
    """How many readings a frame holds, from its header (0 for anything else)."""
    if len(frame) < 2 or frame[0] != 0xB1 or frame[1] & 0x80:
        return 0
    if frame[1] & 0x04:  # a single-reading frame
        return 1
    r = Reader(frame, 2)
    r.take(r.uvarint())  # the device id
    r.uvarint()  # the epoch
    return r.uvarint()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def send(port: int, base: str, rate: float, seconds: float, sender: str) -> tuple[int, float]:
    """Run the senders; the messages they sent and when they began (Unix time)."""
    start_at = time.time() + 2.0  # after both have started and connected
    per_sender = rate / SENDERS if math.isfinite(rate) else 0.0
    program = [str(Path(__file__).with_name(f"{sender}sender.py"))]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                *program,
                str(port),
                base,
                str(i),
                str(DEVICES_PER_SENDER),
                str(per_sender),
                str(seconds),
                str(start_at),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(SENDERS)
    ]
    sent = 0
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 120)
        n, acked = map(int, out.split())
        if acked < n:
            print(f"a sender had {n - acked} messages unacknowledged", file=sys.stderr)
        sent += n
    return sent, start_at


def step(
    sub: Subscriber, port: int, base: str, rate: float, seconds: float, gw: int, sender: str
) -> Step:
    sub.reset()
    cpu0 = cpu_seconds(gw)
    sent, began = send(port, base, rate, seconds, sender)
    # Until everything arrived, or nothing did for 10 s (a gateway that fell behind).
    while True:
        with sub.lock:
            received, last = sub.received, sub.last_arrival
        if received >= sent or time.time() - max(last, began + seconds) > 10:
            break
        time.sleep(0.05)
    cpu = cpu_seconds(gw) - cpu0
    result = sub.reset()
    result.sent = sent
    result.seconds = sub.last_arrival - began
    result.cpu = cpu
    return result


def start_gateway(port: int, mapping: Path, options: list[str]) -> subprocess.Popen:
    gw = subprocess.Popen(
        [sys.executable, "-m", "streampipe", "ingest", "--broker", f"mqtt://127.0.0.1:{port}",
         "--topic-root", ROOT, "--map", str(mapping), "--id", "bench", *options],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    return gw


def payload_size() -> int:
    from streampipe.sources.formats import Zigbee2MQTT
    from streampipe.sources.simulate import SensorFleet

    reading = SensorFleet(1, faults=False).read(0, 1.7e9)
    return len(Zigbee2MQTT().encode(reading)[0].payload) + len('"sent":1700000000.000000,')


def fmt_rate(rate: float) -> str:
    return "max" if not math.isfinite(rate) else f"{rate:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="sending time per step")
    parser.add_argument(
        "--rates", default="1000,2000,4000,8000,max", help="offered messages/s, comma-separated"
    )
    parser.add_argument("--quick", action="store_true", help="1 run, 3 s steps")
    parser.add_argument(
        "--sender",
        choices=("raw", "paho"),
        default="raw",
        help="raw: benchmarks/rawsender.py, a few µs a message (default); paho: "
        "benchmarks/pahosender.py, ~100 µs a message, which leaves the broker and gateway "
        "less of the cores",
    )
    parser.add_argument("--linger", type=float, help="the gateway's --linger (default: its own)")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.seconds = 1, 3.0
    rates = [math.inf if r == "max" else float(r) for r in args.rates.split(",")]
    results: dict[tuple[float, str], list[Step]] = {(r, w): [] for r in rates for w in ("b", "g")}
    # At notice level Mosquitto logs when it drops messages queued for a slow client.
    with (
        PrivateMosquitto(extra_config="log_type notice\n") as broker,
        tempfile.TemporaryDirectory() as tmp,
    ):
        mapping = Path(tmp) / "z2m.toml"
        mapping.write_text(MAPPING)
        options = [] if args.linger is None else ["--linger", str(args.linger)]
        gw = start_gateway(broker.port, mapping, options)
        sub = Subscriber(broker.port)
        try:
            if not sub.online.wait(30):
                raise RuntimeError("the gateway did not come online")
            for run in range(args.runs):
                for rate in rates:
                    print(f"# run {run + 1}/{args.runs}: {fmt_rate(rate)}/s", file=sys.stderr)
                    results[rate, "b"].append(
                        step(sub, broker.port, "direct", rate, args.seconds, gw.pid, args.sender)
                    )
                    results[rate, "g"].append(
                        step(
                            sub,
                            broker.port,
                            "zigbee2mqtt",
                            rate,
                            args.seconds,
                            gw.pid,
                            args.sender,
                        )
                    )
        finally:
            sub.close()
            gw.send_signal(signal.SIGINT)
            out, _ = gw.communicate(timeout=30)
            broker_log = broker.log.read_text(errors="replace")
    print(
        f"# {SENDERS} senders x {DEVICES_PER_SENDER} devices, QoS 1 JSON (~{payload_size()} B),"
        f" {args.seconds:g} s a step, median of {args.runs} run(s); gateway defaults "
        f"(batch 100, linger {args.linger or 100:g} ms); {args.sender} senders; "
        f"Python {sys.version.split()[0]}, {os.cpu_count()} cores"
    )
    print(f"# gateway: {out.strip()}")
    header = (
        f"{'offered/s':>9} | {'broker/s':>9} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'gateway/s':>9} {'ratio':>5} {'µs CPU/msg':>10} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'+p50 ms':>7} {'+p99 ms':>7} {'lost':>5}"
    )
    print(header)
    print("-" * len(header))
    med = statistics.median
    dropped = False
    for rate in rates:
        b, g = results[rate, "b"], results[rate, "g"]
        ratio = med(gs.rate / bs.rate for gs, bs in zip(g, b))
        cpu = med(gs.cpu / gs.received * 1e6 if gs.received else math.nan for gs in g)
        b50, b99 = med(s.percentile(0.5) for s in b), med(s.percentile(0.99) for s in b)
        g50, g99 = med(s.percentile(0.5) for s in g), med(s.percentile(0.99) for s in g)
        added = med(gs.percentile(0.5) - bs.percentile(0.5) for gs, bs in zip(g, b))
        lost = max(gs.sent - gs.received for gs in g)
        dropped = dropped or (lost > 0 and DROPPED in broker_log)
        added99 = med(gs.percentile(0.99) - bs.percentile(0.99) for gs, bs in zip(g, b))
        print(
            f"{fmt_rate(rate):>9} | {med(s.rate for s in b):>9,.0f} {b50 * 1e3:>7.1f} "
            f"{b99 * 1e3:>7.1f} | {med(s.rate for s in g):>9,.0f} {ratio:>5.2f} {cpu:>10.0f} "
            f"{g50 * 1e3:>7.1f} {g99 * 1e3:>7.1f} {added * 1e3:>7.1f} {added99 * 1e3:>7.1f} "
            f"{lost:>5}"
        )
    if dropped:
        print(
            "# lost: dropped by Mosquitto, whose queue for the gateway (max_queued_messages"
            f" 100,000) overflowed; its log says {DROPPED!r}"
        )


if __name__ == "__main__":
    main()
