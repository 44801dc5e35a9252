"""The transport under concurrency, as the edge uses it: several threads publish, paho's
network thread receives and reads acknowledgements, and a worker thread acknowledges
what it received (manual acknowledgement). Safe by construction means no interleaving
can lose, repeat or reorder a message, or raise; this drives many at once, bounded in
time, against a real Mosquitto."""

from __future__ import annotations

import queue
import threading
import time
import uuid

from streampipe.broker import PrivateMosquitto
from streampipe.transport import Connection, Message

PUBLISHERS = 8
PER_PUBLISHER = 1500
SECONDS = 120  # bound on the whole exchange; it takes a few seconds


def test_publishers_a_network_thread_and_an_acknowledging_worker_lose_nothing(
    broker: PrivateMosquitto,
) -> None:
    root = f"stress-{uuid.uuid4().hex[:6]}"
    client_id = f"stress-{uuid.uuid4().hex[:6]}"
    inbox: queue.Queue[Message] = queue.Queue()
    conn = Connection(
        broker.url,
        client_id,
        clean_start=False,
        session_expiry=60,
        manual_ack=True,
        receive_maximum=50,  # a small window: the worker's acks gate what arrives
        on_message=inbox.put,
    ).connect()
    conn.subscribe(f"{root}/#", qos=1)
    total = PUBLISHERS * PER_PUBLISHER
    received: list[bytes] = []
    errors: list[BaseException] = []
    deadline = time.monotonic() + SECONDS

    def worker() -> None:
        try:
            while len(received) < total and time.monotonic() < deadline:
                try:
                    msg = inbox.get(timeout=0.5)
                except queue.Empty:
                    continue
                received.append(msg.payload)
                conn.ack(msg)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def publisher(k: int) -> None:
        try:
            infos = [
                conn.publish(f"{root}/{k}", f"{k}:{i}".encode(), qos=1)
                for i in range(PER_PUBLISHER)
            ]
            for info in infos:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
                assert info.is_published()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker)]
    threads += [threading.Thread(target=publisher, args=(k,)) for k in range(PUBLISHERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 5)
    try:
        assert not any(t.is_alive() for t in threads), "a thread did not finish in time"
        assert not errors, errors
        assert len(received) == len(set(received)) == total
        for k in range(PUBLISHERS):
            mine = [int(p.split(b":")[1]) for p in received if p.startswith(f"{k}:".encode())]
            assert mine == list(range(PER_PUBLISHER)), f"publisher {k}'s order"
    finally:
        conn.close()

    # Every message was acknowledged: the resumed session resends none of them, so the
    # first message on the new connection is one published after it.
    first: queue.Queue[Message] = queue.Queue()
    again = Connection(
        broker.url, client_id, clean_start=False, session_expiry=60, on_message=first.put
    ).connect()
    try:
        assert again.session_present
        again.publish(f"{root}/marker", b"marker", qos=1).wait_for_publish(10)
        assert first.get(timeout=10).payload == b"marker"
    finally:
        again.close()


def test_the_in_flight_window_is_what_the_broker_takes() -> None:
    """A broker that advertises a Receive Maximum below our window (a stock Mosquitto
    says 20) gets no more QoS 1 messages in flight than that: paho ignores it, so the
    connection connects again with the broker's figure."""
    with PrivateMosquitto(extra_config="max_inflight_messages 20\n") as small:
        conn = Connection(small.url, f"window-{uuid.uuid4().hex[:6]}", max_inflight=100)
        with conn.connect():
            assert conn.broker_receive_maximum == 20
            assert conn._client.max_inflight_messages == 20
            infos = [conn.publish("window/t", b"x", qos=1) for _ in range(500)]
            for info in infos:
                info.wait_for_publish(10)
            assert all(info.is_published() for info in infos)
            assert conn.sessions_lost == 0
