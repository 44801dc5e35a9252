"""One device floods an edge with frames naming a schema nobody published (issue 18 §1):
another device's readings, measured end to end through a real Mosquitto, are not slowed.

Run with ``-s`` to see the table of latencies.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time

import pytest

from streampipe import codec
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.readings import Batch, Reading
from streampipe.transport import Connection

PROBES = 40
FLOOD_RATE = int(
    os.environ.get("FLOOD_RATE", 500)
)  # frames/s naming an unknown schema, from one device
#: The flooding device, in a process of its own (in this one it would take the GIL).
FLOODER = """
import signal, sys, time
from streampipe import codec
from streampipe.readings import Batch, Reading
from streampipe.transport import BrokerURL, Connection
url, topic, rate = BrokerURL.parse(sys.argv[1]), sys.argv[2], float(sys.argv[3])
by_id = sys.argv[4] == "unknown_schema"  # else frames the edge learns
conn = Connection(url, "flooder-" + topic.replace("/", "-"))
conn.connect()
seq, t0, stop = 0, time.monotonic(), []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
while not stop and time.monotonic() - t0 < 30:
    batch = Batch.from_readings([Reading("flood", seq, time.time(), {"zz": 1.0}, 1.0)])
    info = conn.publish(topic, codec.encode(batch, schema_id=by_id), qos=1)
    seq += 1
    if seq % 100 == 0:  # paced, each hundred acknowledged
        info.wait_for_publish(5)
        time.sleep(max(0.0, t0 + seq / rate - time.monotonic()))
conn.close()
print(seq)
"""


def probe_latencies(conn: Connection, topics, cap, start: int) -> list[float]:
    """Publish one reading of device ``probe`` at a time; seconds until its prediction."""
    seen: set[int] = set()

    def arrived(seq: int) -> bool:
        for body in cap.json(topics.predictions("probe")):
            seen.update(p["seq"] for p in body["predictions"])
        return seq in seen

    out = []
    for seq in range(start, start + PROBES):
        payload = codec.encode(
            Batch.from_readings([Reading("probe", seq, time.time(), {"a": 1.0}, 1.0)])
        )
        t0 = time.perf_counter()
        conn.publish(topics.readings("probe"), payload, qos=1)
        assert cap.wait(lambda s=seq: arrived(s), timeout=5), f"no prediction for seq {seq}"
        out.append(time.perf_counter() - t0)
    return out


@pytest.mark.parametrize("kind", ["unknown_schema", "learned"])
def test_a_device_naming_an_unknown_schema_does_not_slow_another(broker, topics, capture, kind):
    cap = capture([topics.predictions("probe")])
    service = EdgeService(
        EdgeConfig(broker.url, "flood-edge", topic_root=topics.root, queue_size=100)
    ).start()
    worker = threading.Thread(target=service.run, daemon=True)
    worker.start()
    probe = Connection(broker.url, f"probe-{topics.root}")
    probe.connect()
    command = [sys.executable, "-c", FLOODER, str(broker.url), topics.readings("flood")]
    flooder = None
    try:
        probe_latencies(probe, topics, cap, 0)  # warm up: the device's model, the paths
        idle = probe_latencies(probe, topics, cap, PROBES)
        flooder = subprocess.Popen(
            [*command, str(FLOOD_RATE), kind], stdout=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 10
        while service.stats.messages < 2 * PROBES + 200:  # the flood is on (the hold full)
            assert time.monotonic() < deadline, "the flood did not reach the edge"
            time.sleep(0.01)  # polling a counter, bounded by the deadline
        flooded = probe_latencies(probe, topics, cap, 2 * PROBES)
    finally:
        sent = 0
        if flooder is not None:
            flooder.terminate()
            sent = int(flooder.communicate(timeout=10)[0] or 0)
        probe.close()
        service.stop()
        worker.join(30)
    held = len(service.stage._held)  # all the flooding device's

    def row(name: str, xs: list[float]) -> str:
        q = statistics.quantiles(xs, n=10)
        ms = [statistics.median(xs), q[-1], max(xs)]
        return f"| {name} | " + " | ".join(f"{v * 1e3:.2f}" for v in ms) + " |"

    print(
        f"\nprobe latency, publish to prediction (ms), {PROBES} readings each; "
        f"flood of {sent} frames ({kind}) at {FLOOD_RATE}/s, {held} held\n"
        "| while | median | p90 | max |\n|---|---|---|---|\n"
        + row("idle", idle) + "\n" + row("flooded", flooded)
    )  # fmt: skip
    if kind == "unknown_schema":  # (the other kind is the reference: any sender's cost)
        assert held <= 16
        assert statistics.median(flooded) - statistics.median(idle) < 0.005
