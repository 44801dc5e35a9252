"""FastClient decodes, acknowledges and sends exactly what paho's own Client does.

Both clients get the same bytes from a scripted socket (cut into arbitrary TCP
segments) and must hand the same messages to ``on_message``, the same PUBACKs to
``on_publish`` and the same bytes to the socket. The last test sends and receives
through a real Mosquitto from several threads at once.
"""

from __future__ import annotations

import struct
import threading
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from streampipe.broker import PrivateMosquitto
from streampipe.transport import Connection
from streampipe.transport.fastpaho import Client, FastClient, frozen_properties

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLASSES = (paho.Client, FastClient)


class Wire:
    """A non-blocking socket that replays ``data`` in segments and records what is sent."""

    def __init__(self, data: bytes = b"", cuts: list[int] = (), send_limit: int | None = None):
        self.data, self.pos = data, 0
        self.cuts = sorted(set(cuts))
        self.sent = bytearray()
        self.send_limit = send_limit
        self.sends = 0

    def recv(self, n: int) -> bytes:
        if self.pos >= len(self.data):
            raise BlockingIOError
        end = min(len(self.data), self.pos + n)
        end = min([c for c in self.cuts if c > self.pos] + [end])
        out, self.pos = self.data[self.pos : end], end
        return out

    def send(self, b: bytes) -> int:
        k = len(b) if self.send_limit is None else min(len(b), self.send_limit)
        self.sends += 1
        self.sent += bytes(b[:k])
        return k

    def close(self) -> None:
        pass

    def fileno(self) -> int:
        return -1


def connected(cls: type[paho.Client], wire: Wire, manual_ack: bool = False) -> paho.Client:
    c = cls(
        CallbackAPIVersion.VERSION2,
        client_id="t",
        protocol=MQTTProtocolVersion.MQTTv5,
        manual_ack=manual_ack,
    )
    c.max_inflight_messages_set(1000)
    c._sock = wire
    c._state = paho._ConnectionState.MQTT_CS_CONNECTED
    return c


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def publish_packet(topic: bytes, qos: int, retain: bool, dup: bool, mid: int, props: bytes,
                   payload: bytes) -> bytes:  # fmt: skip
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", mid)
    body += varint(len(props)) + props + payload
    return bytes([0x30 | dup << 3 | qos << 1 | retain]) + varint(len(body)) + body


property_sets = st.lists(
    st.one_of(
        st.text(max_size=40).map(lambda s: b"\x03" + utf8(s)),  # content type
        st.integers(0, 2**32 - 1).map(lambda v: b"\x02" + struct.pack("!I", v)),  # expiry
        st.tuples(st.text(max_size=8), st.text(max_size=8)).map(
            lambda kv: b"\x26" + utf8(kv[0]) + utf8(kv[1])  # user property
        ),
        st.sampled_from([b"\x01\x00", b"\x01\x01"]),  # payload format indicator
    ),
    max_size=3,
).map(b"".join)

topics = st.one_of(
    st.text(min_size=1, max_size=30).map(str.encode),
    st.just(b"bad/\xff\xfe"),  # invalid UTF-8: paho still delivers it
)

publishes = st.builds(
    publish_packet,
    topics,
    st.integers(0, 1),
    st.booleans(),
    st.booleans(),
    st.integers(1, 65535),
    property_sets,
    st.one_of(st.binary(max_size=60), st.binary(min_size=200, max_size=400)),
)


def receive(cls: type[paho.Client], data: bytes, cuts: list[int]) -> tuple[Any, ...]:
    wire = Wire(data, cuts)
    c = connected(cls, wire)
    got: list[Any] = []

    def on_message(_c: Any, _u: Any, m: paho.MQTTMessage) -> None:
        got.append((m._topic, m.payload, type(m.payload), m.qos, m.retain, m.dup, m.mid,
                    str(m.properties)))  # fmt: skip

    c.on_message = on_message
    rc = MQTTErrorCode.MQTT_ERR_SUCCESS
    for _ in range(len(data) + 5):  # plain paho reads one packet per call
        if wire.pos >= len(data) or rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            break
        rc = c.loop_read()  # a property given twice is a protocol error, in both
    return got, bytes(wire.sent), rc


@FAST
@given(st.lists(publishes, min_size=1, max_size=12), st.lists(st.integers(1, 6000), max_size=8))
def test_received_publishes_and_their_acks_are_the_same(packets: list[bytes], cuts: list[int]):
    data = b"".join(packets)
    plain, fast = (receive(cls, data, cuts) for cls in CLASSES)
    if plain[2] == MQTTErrorCode.MQTT_ERR_SUCCESS:
        assert len(plain[0]) == len(packets)
    assert fast == plain


@pytest.mark.parametrize(
    "packet",
    [
        bytes([0x32, 4, 0, 9, ord("a"), ord("b")]),  # topic length beyond the packet
        bytes([0x32, 5, 0, 1, ord("a"), 0, 1]),  # QoS 1, no property length
        bytes([0x30, 4, 0, 1, ord("a"), 9]),  # property length beyond the packet
        bytes([0x30, 6, 0, 1, ord("a"), 2, 0x63, 0]),  # unknown property id
        bytes([0x40, 1, 0]),  # PUBACK too short
        bytes([0x40, 3, 0, 1, 0x05]),  # PUBACK with an undefined reason code
        bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),  # a remaining length of 5 bytes
    ],
)
def test_malformed_packets_are_protocol_errors_in_both(packet: bytes) -> None:
    rcs = []
    for cls in CLASSES:
        c = connected(cls, Wire(packet))
        c.on_message = lambda *_: pytest.fail("a malformed packet reached on_message")
        rcs.append(c._packet_read())
    assert rcs[0] == rcs[1] == MQTTErrorCode.MQTT_ERR_PROTOCOL


class ClosedWire(Wire):
    """The broker closed the connection (``recv`` gives b""), or the socket failed."""

    def __init__(self, error: OSError | None = None) -> None:
        super().__init__()
        self.error = error

    def recv(self, n: int) -> bytes:
        if self.error is not None:
            raise self.error
        return b""


@pytest.mark.parametrize("error", [None, ConnectionResetError(104, "reset"), TimeoutError()])
def test_a_closed_or_failed_socket_is_a_lost_connection_in_both(error: OSError | None) -> None:
    rcs = [connected(cls, ClosedWire(error))._packet_read() for cls in CLASSES]
    assert rcs[0] == rcs[1] == MQTTErrorCode.MQTT_ERR_CONN_LOST


PUBACKS = [
    lambda mid: bytes([0x40, 2]) + struct.pack("!H", mid),  # success, as Mosquitto sends it
    lambda mid: bytes([0x40, 3]) + struct.pack("!H", mid) + b"\x10",  # no subscribers
    lambda mid: bytes([0x40, 4]) + struct.pack("!H", mid) + b"\x00\x00",
    lambda mid: (
        bytes([0x40, 4 + 3 + 5])
        + struct.pack("!H", mid)
        + b"\x97"
        + varint(8)
        + b"\x1f"
        + utf8("quota")
    ),
]


@FAST
@given(st.lists(st.sampled_from(range(len(PUBACKS))), min_size=1, max_size=20))
def test_pubacks_reach_on_publish_the_same(kinds: list[int]) -> None:
    results = []
    for cls in CLASSES:
        wire = Wire()
        c = connected(cls, wire)
        acked: list[Any] = []
        c.on_publish = lambda _c, _u, mid, rc, props, acked=acked: acked.append(
            (mid, rc.value, str(props))
        )
        props = frozen_properties("application/json") if cls is FastClient else None
        infos = [c.publish(f"t/{i}", b"x", qos=1, properties=props) for i in range(len(kinds))]
        wire.data = b"".join(PUBACKS[k](info.mid) for k, info in zip(kinds, infos))
        for _ in range(len(kinds) + 5):
            if wire.pos >= len(wire.data):
                break
            c.loop_read()
        assert all(info.is_published() for info in infos)
        assert not c._out_messages and c._inflight_messages == 0
        results.append(acked)
    assert results[0] == results[1]
    assert [mid for mid, *_ in results[1]] == list(range(1, len(kinds) + 1))


@FAST
@given(
    st.integers(1, 4),
    st.lists(st.one_of(st.just(None), st.integers(0, 7)), min_size=1, max_size=60),
)
def test_a_full_in_flight_window_sends_the_queued_in_order_as_paho_does(
    window: int, ops: list[int | None]
) -> None:
    """Publishes beyond the in-flight window wait, and go out oldest first as PUBACKs
    (in any order) free room: FastClient's shortcut past the in-flight messages sends
    what paho's full walk sends, in the same order."""
    clients = []
    for cls in CLASSES:
        wire = Wire()
        c = connected(cls, wire)
        c._max_inflight_messages = window
        clients.append((c, wire))
    for i, op in enumerate(ops):
        if op is None:
            for c, _ in clients:
                c.publish(f"t/{i}", bytes([i]), qos=1)
            continue
        paho_client = clients[0][0]
        flying = [m.mid for m in paho_client._out_messages.values() if m.state == 2]
        if not flying:
            continue
        mid = flying[op % len(flying)]
        for c, wire in clients:
            wire.data += bytes([0x40, 2]) + struct.pack("!H", mid)
            c.loop_read()
    states = [
        (bytes(wire.sent), [(m.mid, m.state) for m in c._out_messages.values()],
         c._inflight_messages)
        for c, wire in clients
    ]  # fmt: skip
    assert states[0] == states[1]


def test_packets_cut_by_a_full_socket_are_sent_whole_and_in_order() -> None:
    sent = []
    for cls, limit in ((paho.Client, None), (FastClient, 7)):
        wire = Wire(send_limit=limit)
        c = connected(cls, wire, manual_ack=True)
        for i in range(50):
            c.publish(f"out/{i}", bytes(range(i)), qos=1)
            c.ack(i + 1, 1)
        for _ in range(10_000):
            if not c.want_write():
                break
            c.loop_write()
        assert not c.want_write()
        sent.append(bytes(wire.sent))
    assert sent[0] == sent[1]


@pytest.mark.parametrize("limit", [None, 7, 300])
def test_packets_queued_together_go_out_as_paho_sends_them(limit: int | None) -> None:
    """Packets queued while the network thread was busy (here: queued for an outside
    event loop, which writes later) are joined into one send: the bytes on the wire,
    and the QoS 0 on_publish calls, are paho's, whole or cut."""
    results = []
    for cls in (paho.Client, FastClient):
        wire = Wire(send_limit=limit)
        c = connected(cls, wire, manual_ack=True)
        published: list[int] = []
        c.on_publish = lambda _c, _u, mid, _rc, _p, got=published: got.append(mid)
        c.on_socket_register_write = lambda *_: None  # publish and ack only queue
        for i in range(60):
            c.publish(f"out/{i}", bytes(range(i)), qos=i % 3 and 1)
            c.ack(i + 1, 1)
        c.on_socket_register_write = None
        for _ in range(10_000):
            if not c.want_write():
                break
            c.loop_write()
        assert not c.want_write()
        results.append((bytes(wire.sent), published, wire.sends))
    (plain, plain_published, plain_sends), (fast, fast_published, fast_sends) = results
    assert fast == plain and fast_published == plain_published
    assert len(plain_published) == 20  # the QoS 0 ones, in the order paho reports them
    if limit is None:  # a send for each QoS 0 publish and each run between them
        assert plain_sends == 120 and fast_sends <= 2 * 20 + 1


def test_streampipe_uses_the_fast_client_on_the_tested_paho() -> None:
    assert Client is FastClient


def test_threads_publishing_while_receiving_lose_and_repeat_nothing(
    broker: PrivateMosquitto,
) -> None:
    """Worker threads publish while the network thread receives and acknowledges:
    every message arrives once, each thread's in its order."""
    threads, per_thread = 3, 400
    done = threading.Event()
    got: list[bytes] = []
    lock = threading.Lock()

    def on_message(msg: paho.MQTTMessage) -> None:
        with lock:
            got.append(msg.payload)
            if len(got) == threads * per_thread:
                done.set()

    with Connection(broker.url, "fast-threads", on_message=on_message).connect() as conn:
        conn.subscribe("fast/threads/#", qos=1)

        def work(k: int) -> None:
            for i in range(per_thread):
                conn.publish(f"fast/threads/{k}", f"{k}:{i}".encode(), qos=1)

        workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(30)
        assert done.wait(30), f"{len(got)} of {threads * per_thread} arrived"
    assert len(got) == len(set(got)) == threads * per_thread
    for k in range(threads):
        mine = [int(p.split(b":")[1]) for p in got if p.startswith(f"{k}:".encode())]
        assert mine == list(range(per_thread))
