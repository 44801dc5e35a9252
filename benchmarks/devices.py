"""A lean fleet of devices for latency measurements: single-reading frames on time.

    python benchmarks/devices.py mqtt://127.0.0.1:1883 ROOT [--devices 50] [--rate 50]
        [--seconds 10] [--start UNIX_TIME] [--process K/N]

Each device publishes one single-reading frame every ``1 / rate`` seconds (QoS 1) on
``ROOT/readings/<device>``, stamped with the time it was due, so a late publish counts
as latency wherever it is measured. The process wakes every ``--tick`` ms (1) and
sends what fell due meanwhile: waking for each reading would cost the machine more
than the pipeline it measures. Unlike ``streampipe sensors``, which simulates and
encodes each reading as it goes, this encodes every frame before ``--start``: a load
generator that shares a machine with what it measures should cost it as little as it
can. ``--process K/N`` shifts this process's devices by ``K/N`` of a step, so that N
processes together publish evenly. Prints ``published N readings acknowledged``.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from streampipe import codec
from streampipe.sources.simulate import SensorFleet
from streampipe.topics import Topics
from streampipe.transport import BrokerURL
from streampipe.transport.fastpaho import Client, frozen_properties


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("broker", type=BrokerURL.parse)
    parser.add_argument("root", help="topic root")
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--rate", type=float, default=50.0, help="readings/s per device")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--start", type=float, help="Unix time to start at (default: in 1 s)")
    parser.add_argument("--process", default="0/1", metavar="K/N")
    parser.add_argument("--prefix", default="device-")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tick", type=float, default=1.0, help="ms: publish what is due at least this often"
    )
    args = parser.parse_args()
    k, of = (int(v) for v in args.process.split("/"))
    start = time.time() + 1.0 if args.start is None else args.start

    step = 1.0 / (args.rate * args.devices)
    first = start + k * step / of
    fleet = SensorFleet(args.devices, seed=args.seed, prefix=args.prefix, faults=False)
    topics = Topics(args.root)
    n = int(args.devices * args.rate * args.seconds)
    readings = [fleet.read(i % args.devices, first + i * step) for i in range(n)]
    frames = [
        (topics.readings(r.device), codec.encode_reading(r, schema_id=True)) for r in readings
    ]
    schema = codec.Schema(tuple(readings[0].x), readings[0].y is not None)

    # One thread, no network thread: paho's loop runs here between ticks, so a tick
    # costs one wake-up, not one per packet in each of two threads.
    client = Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"devices-{os.getpid()}-{k}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.max_inflight_messages_set(1000)
    client.on_socket_open = lambda _c, _u, sock: sock.setsockopt(
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
    )
    client.connect(args.broker.host, args.broker.port)
    deadline = time.monotonic() + 10
    while not client.is_connected() and time.monotonic() < deadline:
        client.loop(0.05)
    props = frozen_properties(codec.CONTENT_TYPE)
    schema_props = frozen_properties(codec.SCHEMA_CONTENT_TYPE)
    infos = [
        client.publish(
            topics.schemas(schema.id), schema.frame(), qos=1, retain=True, properties=schema_props
        )
    ]
    # No collector pauses while sending: they would delay readings and so count as the
    # pipeline's latency. Full collections over the frames and the growing list of
    # publishes get longer as it grows.
    del readings
    gc.collect()
    gc.freeze()
    gc.disable()
    due = time.monotonic() + (first - time.time())
    sent = 0
    while sent < n:
        # Everything due goes out now; then sleep a tick, or until the
        # next reading is due if that is later, and take in the PUBACKs meanwhile.
        now = time.monotonic()
        while sent < n and due + sent * step <= now:
            topic, frame = frames[sent]
            infos.append(client.publish(topic, frame, qos=1, properties=props))
            sent += 1
        if sent < n:
            time.sleep(max(args.tick / 1000, due + sent * step - now))
        client.loop(0)
    gc.enable()
    deadline = time.monotonic() + 120
    while not all(i.is_published() for i in infos[-100:]) and time.monotonic() < deadline:
        client.loop(0.05)
    acked = sum(info.is_published() for info in infos[1:])
    client.disconnect()
    print(f"published {acked:,} readings acknowledged, of {n:,}")


if __name__ == "__main__":
    main()
