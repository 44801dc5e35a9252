"""What one ``streampipe ingest`` gateway takes on its own: a backlog of Zigbee2MQTT-like
JSON messages queued for it at the broker, drained with nothing else competing for the
cores but the broker and the subscriber that counts the readings.

    python benchmarks/ingest_drain.py [--messages 40000] [--devices 100 10] [--runs 3]

The gateway is started once to create its session, stopped, the messages are published
(QoS 1, queued for it), and the gateway is started again; the time runs from its start
to the last native reading's arrival, and its CPU time is read from ``/proc``. Start-up
(~0.3 s of CPU) is included. Medians of ``--runs``.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ingest import MAPPING, cpu_seconds  # benchmarks/ingest.py, beside this script

from streampipe import codec
from streampipe.broker import PrivateMosquitto
from streampipe.sources.formats import Zigbee2MQTT
from streampipe.sources.simulate import SensorFleet
from streampipe.transport import Connection


def payload(fleet: SensorFleet, i: int) -> tuple[str, bytes]:
    """Message ``i`` of ``fleet``'s simulated Zigbee2MQTT plugs, stamped now: as
    ``benchmarks/ingest.py``'s senders make them."""
    reading = fleet.read(i % len(fleet), 1.7e9 + i)
    message = Zigbee2MQTT().encode(reading)[0]
    return message.topic, b'{"sent":%f,' % time.time() + message.payload[1:]


def drain(n: int, devices: int) -> tuple[float, float]:
    """(messages/s, µs CPU per message) of one run."""
    with PrivateMosquitto() as broker, tempfile.TemporaryDirectory() as tmp:
        mapping = Path(tmp) / "z2m.toml"
        mapping.write_text(MAPPING)
        cmd = [sys.executable, "-m", "streampipe", "ingest", "--broker", str(broker.url)]
        cmd += ["--map", str(mapping), "--log-level", "WARNING"]
        status: list[bytes] = []
        online = threading.Event()

        def on_status(m):
            status.append(m.payload)
            if m.payload == b"online":
                online.set()

        with Connection(broker.url, "status", on_message=on_status).connect() as watch:
            watch.subscribe("streampipe/status/ingest", qos=1)
            first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
            assert online.wait(30), "the gateway did not come online"
            first.send_signal(signal.SIGINT)
            first.wait(30)
        with Connection(broker.url, "sender", max_inflight=1000).connect() as sender:
            fleet = SensorFleet(devices, seed=0, faults=False)
            infos = [sender.publish(*payload(fleet, i), qos=1) for i in range(n)]
            for info in infos:
                info.wait_for_publish(60)
        got = [0]
        done = threading.Event()
        schemas = codec.SchemaRegistry()

        def on_reading(m):
            if "/schemas/" in m.topic:
                schemas.add_frame(m.payload)
                return
            got[0] += len(codec.decode(m.payload, schemas).seq)
            if got[0] >= n:
                done.set()

        with Connection(broker.url, "counter", on_message=on_reading).connect() as counter:
            counter.subscribe(["streampipe/readings/#", "streampipe/schemas/+"], qos=1)
            start = time.perf_counter()
            gateway = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
            assert done.wait(300), f"only {got[0]:,} of {n:,} readings arrived"
            elapsed = time.perf_counter() - start
            cpu = cpu_seconds(gateway.pid)
            gateway.send_signal(signal.SIGINT)
            gateway.wait(30)
    return n / elapsed, cpu / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 10])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"# {args.messages:,} queued messages, median of {args.runs} runs")
    print(f"{'devices':>7} | {'messages/s':>10} | {'µs CPU/msg':>10} | runs (messages/s)")
    for devices in args.devices:
        runs = [drain(args.messages, devices) for _ in range(args.runs)]
        rates = [r for r, _ in runs]
        cpu = statistics.median(c for _, c in runs)
        each = ", ".join(f"{r:,.0f}" for r in rates)
        print(f"{devices:>7} | {statistics.median(rates):>10,.0f} | {cpu:>10.0f} | {each}")


if __name__ == "__main__":
    main()
