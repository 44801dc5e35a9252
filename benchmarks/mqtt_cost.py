"""CPU per message of an MQTT v5 client, in the patterns an edge uses: paho-mqtt as it
comes against streampipe's :class:`~streampipe.transport.fastpaho.FastClient`.

    python benchmarks/mqtt_cost.py [--rate 1500] [--seconds 6] [--repeat 3]

Starts a private Mosquitto. A publisher in another process sends 40-byte QoS 1
messages (with a content type, as sensors do) to 100 topics at ``--rate`` messages/s;
this process receives them (MQTT v5, network thread started by ``loop_start``) and
reports its own CPU time (user + system, from ``os.times``) per
message received, for:

- ``auto-ack``: paho acknowledges in its network thread; ``on_message`` only counts;
- ``queue + ack``: ``on_message`` puts the message on a bounded queue, a worker thread
  takes it and acknowledges it (``manual_ack``), as the edge does;
- ``queue + ack + publish``: the same, and the worker publishes one QoS 1 message
  with a content type per message received, as the edge does with predictions.

Each pattern runs with plain ``paho.Client`` (publisher and receiver) and with
``FastClient``, alternately, so their ratio is measured in the same run. Nothing else of
streampipe runs but the private broker: the figures are the floor an edge pays per
single-reading message before decoding or learning anything. Medians of ``--repeat``
runs.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import subprocess
import sys
import threading
import time

import paho.mqtt.client as paho
from paho.mqtt import __version__ as paho_version
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from streampipe.broker import PrivateMosquitto
from streampipe.transport.fastpaho import FastClient, frozen_properties

PUBLISHER = """
import sys, time
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from streampipe.transport.fastpaho import FastClient, frozen_properties
port, n, rate, fast = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
p = (FastClient if fast else paho.Client)(
    CallbackAPIVersion.VERSION2, client_id="cost-pub", protocol=MQTTProtocolVersion.MQTTv5)
p.max_inflight_messages_set(100)
p.connect("127.0.0.1", port)
p.loop_start()
ct = "application/vnd.streampipe.batch"
if fast:
    props = frozen_properties(ct)
else:
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = ct
start = time.monotonic()
for k in range(n):
    wait = start + k / rate - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    p.publish(f"cost/in/d{k % 100:03d}", b"x" * 40, qos=1, properties=props)
deadline = time.monotonic() + 30
while p.want_write() and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.5)
p.disconnect()
"""

MODES = ("auto-ack", "queue + ack", "queue + ack + publish")
CLIENTS = {"paho": paho.Client, "FastClient": FastClient}


def one_run(port: int, mode: str, n: int, rate: float, client: str) -> float:
    """µs of this process's CPU per message received, in ``mode``, with ``client``."""
    fast = client == "FastClient"
    done = threading.Event()
    received = 0
    q: queue.Queue[paho.MQTTMessage] = queue.Queue(1000)
    c = CLIENTS[client](
        CallbackAPIVersion.VERSION2,
        client_id=f"cost-{time.monotonic_ns()}",
        protocol=MQTTProtocolVersion.MQTTv5,
        manual_ack=mode != "auto-ack",
    )
    c.max_inflight_messages_set(100)
    if fast:
        props = frozen_properties("application/json")
    else:
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        nonlocal received
        if mode == "auto-ack":
            received += 1
            if received >= n:
                done.set()
        else:
            q.put(msg)

    def worker() -> None:
        for _ in range(n):
            msg = q.get()
            if mode == "queue + ack + publish":
                c.publish("cost/out/" + msg.topic, b'{"y_pred": 1.0}', qos=1, properties=props)
            c.ack(msg.mid, msg.qos)
        done.set()

    subscribed = threading.Event()
    c.on_message = on_message
    c.on_subscribe = lambda *_: subscribed.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.subscribe("cost/in/#", qos=1)
    if not subscribed.wait(10):
        raise RuntimeError("no SUBACK")
    if mode != "auto-ack":
        threading.Thread(target=worker, daemon=True).start()
    before = os.times()
    argv = [sys.executable, "-c", PUBLISHER, str(port), str(n), str(rate), str(int(fast))]
    pub = subprocess.Popen(argv)
    try:
        if not done.wait(n / rate + 60):
            raise RuntimeError(f"{mode}: not every message arrived")
    finally:
        pub.wait(60)
    after = os.times()
    c.loop_stop()
    c.disconnect()
    cpu = (after.user - before.user) + (after.system - before.system)
    return cpu / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1500.0, help="messages/s offered")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n = int(args.rate * args.seconds)
    results: dict[tuple[str, str], list[float]] = {(m, c): [] for m in MODES for c in CLIENTS}
    with PrivateMosquitto() as broker:
        for i in range(args.repeat):
            print(f"# run {i + 1} of {args.repeat}", file=sys.stderr)
            for mode, client in results:
                results[mode, client].append(one_run(broker.port, mode, n, args.rate, client))
    print(
        f"# paho-mqtt {paho_version} receiver, MQTT v5, QoS 1, {n:,} messages at "
        f"{args.rate:,.0f}/s, median of {args.repeat}; "
        f"Python {sys.version.split()[0]}, {os.cpu_count()} cores"
    )
    print(f"{'pattern':<24} {'paho µs/msg':>12} {'FastClient':>11} {'ratio':>6}   runs")
    for mode in MODES:
        slow, fast = (statistics.median(results[mode, c]) for c in CLIENTS)
        runs = " | ".join(", ".join(f"{v:.0f}" for v in results[mode, c]) for c in CLIENTS)
        print(f"{mode:<24} {slow:>12.0f} {fast:>11.0f} {fast / slow:>6.2f}   {runs}")


if __name__ == "__main__":
    main()
