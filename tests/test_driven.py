"""Connections driven from one thread (``streampipe.transport.driven``), against a real
Mosquitto: no network thread, callbacks on the driving thread, waits that drive, writes
joined, and reconnects (through a proxy the test cuts) that paho's own loop would make.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from faults import TcpProxy

from streampipe.transport import BrokerURL, ConnectError, Connection, Message, Will
from streampipe.transport.driven import MAX_BLOCK, Driver


def _id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def _paho_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("paho-mqtt-client")]


@pytest.fixture
def driver():
    d = Driver()
    yield d
    d.close()


def test_two_driven_connections_exchange_qos1_messages_on_the_calling_thread(
    broker, topics, driver
):
    got: list[tuple[bytes, int]] = []
    threads_before = _paho_threads()
    sub = Connection(
        broker.url,
        _id("in"),
        manual_ack=True,
        on_message=lambda m: got.append((m.payload, threading.get_ident())),
        driver=driver,
    ).connect()
    pub = Connection(broker.url, _id("out"), driver=driver).connect()
    try:
        assert _paho_threads() == threads_before  # no network thread was started
        sub.subscribe(topics.root + "/t", qos=1)
        infos = [pub.publish(topics.root + "/t", b"%d" % i, qos=1) for i in range(200)]
        # publish only queued: nothing was written on this stack
        assert not any(i.is_published() for i in infos)
        assert pub.wait_published(infos[-1], 10)
        assert all(i.is_published() for i in infos)
        assert driver.run_until(lambda: len(got) == 200, 10)
    finally:
        sub.close()
        pub.close()
    assert [p for p, _ in got] == [b"%d" % i for i in range(200)]
    assert {t for _, t in got} == {threading.get_ident()}


def test_a_driven_manual_ack_is_sent_and_not_redelivered(broker, topics, driver):
    """Acknowledged from the driving thread (as the gateway does after its commit), a
    message is not redelivered when the session resumes; one left unacknowledged is."""
    received: list[Message] = []
    cid = _id("acker")

    def connect() -> Connection:
        return Connection(
            broker.url, cid, clean_start=False, session_expiry=60, manual_ack=True,
            on_message=received.append, driver=driver,
        ).connect()  # fmt: skip

    conn = connect()
    conn.subscribe(topics.root + "/a", qos=1)
    with Connection(broker.url, _id("pub")).connect() as pub:
        for p in (b"acked", b"left"):
            pub.publish(topics.root + "/a", p, qos=1).wait_for_publish(10)
    assert driver.run_until(lambda: len(received) == 2, 10)
    conn.ack(received[0], conn.connects)
    conn.close()
    received.clear()
    conn = connect()
    try:
        assert driver.run_until(lambda: len(received) == 1, 10)
        assert received[0].payload == b"left" and received[0].dup
    finally:
        conn.close()


def test_wake_returns_a_blocked_run_once(driver):
    woken = threading.Event()

    def wake() -> None:
        woken.wait(10)
        driver.wake()

    t = threading.Thread(target=wake)
    t.start()
    start = time.monotonic()
    woken.set()
    driver.run_once(MAX_BLOCK)
    t.join()
    assert time.monotonic() - start < MAX_BLOCK / 2


def test_a_driven_connection_reconnects_and_resubscribes_after_a_cut(broker, topics, driver):
    proxy = TcpProxy(broker.port)
    received: list[bytes] = []
    conn = Connection(
        BrokerURL("127.0.0.1", proxy.port), _id("cut"), clean_start=False,
        session_expiry=60, on_message=lambda m: received.append(m.payload), driver=driver,
    ).connect()  # fmt: skip
    try:
        conn.subscribe(topics.root + "/c", qos=1)
        proxy.cut()
        assert driver.run_until(lambda: not conn.connected, 10)
        with Connection(broker.url, _id("pub")).connect() as pub:
            pub.publish(topics.root + "/c", b"while cut", qos=1).wait_for_publish(10)
        proxy.restore()
        # the first retry is 1 s after the loss, as paho's own loop waits
        assert conn.wait_connected(10)
        assert driver.run_until(lambda: received == [b"while cut"], 10)
        with Connection(broker.url, _id("pub")).connect() as pub:
            pub.publish(topics.root + "/c", b"after", qos=1).wait_for_publish(10)
        assert driver.run_until(lambda: received == [b"while cut", b"after"], 10)
    finally:
        conn.close()
        proxy.close()
    assert conn.connects == 2 and conn.sessions_lost == 0
    assert not conn.connected


def test_close_returns_once_the_disconnect_is_written_and_is_final(broker, driver):
    """Writing the DISCONNECT closes the socket; the wait must see that at once rather
    than block a whole select round on the sockets left (seen: Ctrl-C took 1 s)."""
    conn = Connection(broker.url, _id("closed"), driver=driver).connect()
    start = time.monotonic()
    conn.close()
    assert time.monotonic() - start < MAX_BLOCK / 2
    driver.run_once(0.0)
    assert not conn.connected and conn._client.socket() is None


def test_a_driven_connection_to_nothing_fails_as_a_threaded_one_does(driver):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectError, match="cannot reach broker"):
        Connection(BrokerURL("127.0.0.1", port), _id("none"), driver=driver).connect()


def test_a_driven_connection_takes_a_stock_brokers_window(driver):
    """A stock Mosquitto takes 20 QoS 1 messages in flight: the connection connects
    again with that window (driving the disconnect in between), then 500 go through."""
    from streampipe.broker import PrivateMosquitto

    with PrivateMosquitto(extra_config="max_inflight_messages 20\n") as small:
        conn = Connection(small.url, _id("window"), max_inflight=100, driver=driver)
        conn.connect()
        try:
            assert conn._client.max_inflight_messages == 20 and conn.connects == 2
            infos = [conn.publish("window/t", b"x", qos=1) for _ in range(500)]
            assert conn.wait_published(infos[-1], 10)
            assert all(info.is_published() for info in infos)
        finally:
            conn.close()


@pytest.mark.parametrize("driven", [True, False])
def test_close_right_after_publishing_delivers_everything_and_no_will(
    broker, topics, capture, driven
):
    """Closed without waiting for acknowledgements, a connection still has the broker's
    PUBACKs unread in its socket. Closing a socket with unread bytes resets it, and the
    broker drops what it had not read yet: the last messages, and the DISCONNECT, so the
    will was published. Closed gently, everything sent arrives and the will does not."""
    will_topic = f"{topics.root}/will"
    cap = capture([f"{topics.root}/#"])
    rounds, n = 10, 100  # n: the in-flight window; paho holds back the rest
    for r in range(rounds):
        driver = Driver() if driven else None
        conn = Connection(
            broker.url, _id("quick"), will=Will(will_topic, b"gone", retain=False),
            driver=driver,
        ).connect()  # fmt: skip
        for i in range(n):
            conn.publish(f"{topics.root}/m/{r}", b"%d" % i, qos=1)
        if driver is not None:  # write them, and let the PUBACKs come back unread
            driver.run_once(0.0)
            time.sleep(0.05)  # not a wait for an event: time for acknowledgements to queue
        conn.close()
        if driver is not None:
            driver.close()
    assert cap.wait(lambda: len(cap.on(f"{topics.root}/m/#")) >= rounds * n, timeout=10)
    assert len(cap.on(f"{topics.root}/m/#")) == rounds * n
    assert cap.on(will_topic) == []
