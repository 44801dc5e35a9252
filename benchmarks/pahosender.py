"""The load generator of ``benchmarks/ingest.py --sender paho``: the messages of
``benchmarks/rawsender.py`` (same arguments, same output), sent with paho-mqtt, one
``publish`` a message, as a Python device would; ~100 µs a message, so at 8,000
messages/s the senders take a core the broker and the gateway then lack.

    python benchmarks/pahosender.py PORT BASE INDEX DEVICES RATE SECONDS START_AT
"""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from rawsender import arguments, payloads  # beside this script


def main() -> None:
    port, base, index, devices, rate, seconds, start_at = arguments()
    made = payloads(base, index, devices)
    acked = 0
    lock = threading.Lock()

    def on_publish(*_: object) -> None:
        nonlocal acked
        with lock:
            acked += 1

    c = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-sender-{index}-{time.time_ns()}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    c.max_inflight_messages_set(100)
    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    c.loop_start()
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.monotonic()
    n = 0
    unlimited = rate <= 0
    while True:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        if not unlimited:
            wait = t0 + n / rate - now
            if wait > 0:
                time.sleep(wait)
        elif n - acked > 1000:  # at full speed, no more than the broker queues for us
            time.sleep(0.0005)
            continue
        topic, rest = made[n % len(made)]
        c.publish(topic, b'{"sent":%.6f,' % time.time() + rest, qos=1)
        n += 1
    deadline = time.monotonic() + 60
    while acked < n and time.monotonic() < deadline:
        time.sleep(0.01)
    c.loop_stop()
    c.disconnect()
    print(n, acked)


if __name__ == "__main__":
    main()
