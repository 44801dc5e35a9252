"""A lean load generator: Zigbee2MQTT-like JSON messages, QoS 1, over a bare MQTT v5
socket, so that the senders leave the cores to what is measured.

    python benchmarks/rawsender.py PORT BASE INDEX DEVICES RATE SECONDS START_AT

Publishes ``RATE`` messages a second (``0``: as fast as the broker acknowledges) for
``SECONDS`` from Unix time ``START_AT``, from ``DEVICES`` simulated plugs
(``BASE/s<INDEX>-<n>``), over one connection, as one Zigbee2MQTT bridge does for all
its devices. Each payload begins ``{"sent":<Unix time>,``. Prints the messages sent
and acknowledged.

paho-mqtt, which the project uses, costs ~100 µs a message on the development
machines: two senders at 8,000 messages a second took more than a core, and the
broker and the gateway had what was left (``docs/performance.md``). Here a message is
a few µs: its packet is built by concatenation and the messages due are written with
one ``send`` a millisecond. The broker checks every packet (a malformed one closes the
connection, and the sender then fails), and the window of unacknowledged messages is
kept within the Receive Maximum the broker announces.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time

from streampipe.sources.formats import Zigbee2MQTT
from streampipe.sources.simulate import SensorFleet

WINDOW = 1000  # unacknowledged messages at most, if the broker allows as many


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect(port: int, client_id: str) -> tuple[socket.socket, int]:
    """A connected socket and the broker's Receive Maximum."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x05\x02" + struct.pack("!H", 60) + b"\x00"
    body += struct.pack("!H", len(cid)) + cid
    sock.sendall(b"\x10" + varint(len(body)) + body)
    head = sock.recv(2)
    if len(head) < 2 or head[0] != 0x20:
        raise RuntimeError(f"no CONNACK: {head!r}")
    length, shift, rest = head[1] & 0x7F, 7, head[1]
    while rest & 0x80:
        rest = sock.recv(1)[0]
        length |= (rest & 0x7F) << shift
        shift += 7
    packet = b""
    while len(packet) < length:
        packet += sock.recv(length - len(packet))
    if packet[1] != 0:
        raise RuntimeError(f"connection refused, reason {packet[1]:#x}")
    receive_maximum = 65535
    pos, end = 2, length
    size, shift = 0, 0
    while True:  # the properties' length
        byte = packet[pos]
        pos += 1
        size |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    end = pos + size
    while pos < end:  # find Receive Maximum (0x21); skip what else the broker says
        pid = packet[pos]
        pos += 1
        if pid == 0x21:
            receive_maximum = struct.unpack_from("!H", packet, pos)[0]
            pos += 2
        elif pid in (0x24, 0x25, 0x28, 0x29, 0x2A):  # one byte
            pos += 1
        elif pid == 0x22 or pid == 0x13:  # two bytes
            pos += 2
        elif pid in (0x11, 0x27):  # four bytes
            pos += 4
        elif pid in (0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F):  # a string or binary
            pos += 2 + struct.unpack_from("!H", packet, pos)[0]
        elif pid == 0x26:  # a string pair
            pos += 2 + struct.unpack_from("!H", packet, pos)[0]
            pos += 2 + struct.unpack_from("!H", packet, pos)[0]
        else:
            raise RuntimeError(f"unknown CONNACK property {pid:#x}")
    return sock, receive_maximum


class Acks(threading.Thread):
    """Counts the broker's PUBACKs."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.count = 0
        self.failed: str | None = None

    def run(self) -> None:
        buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            pos = 0
            while len(buf) - pos >= 2:
                kind, length = buf[pos], buf[pos + 1]
                if length & 0x80:  # PUBACKs are short; anything long is a surprise
                    self.failed = f"unexpected packet {kind:#x}"
                    return
                if len(buf) - pos < 2 + length:
                    break
                if kind == 0x40:
                    if length > 2 and buf[pos + 4] >= 0x80:
                        self.failed = f"publish refused, reason {buf[pos + 4]:#x}"
                    self.count += 1
                elif kind == 0xE0:
                    self.failed = "the broker disconnected"
                    return
                pos += 2 + length
            buf = buf[pos:]


def arguments() -> tuple[int, str, int, int, float, float, float]:
    """PORT BASE INDEX DEVICES RATE SECONDS START_AT, as ``benchmarks/ingest.py`` gives
    them to a sender (this one, or ``benchmarks/pahosender.py``)."""
    port, base, index, devices, rate, seconds, start_at = sys.argv[1:8]
    return int(port), base, int(index), int(devices), float(rate), float(seconds), float(start_at)


def payloads(base: str, index: int, devices: int) -> list[tuple[str, bytes]]:
    """Sender ``index``'s messages (topic, payload without its opening ``{``), made
    before the clock starts: ``{"sent":<time>,`` is put in front when one is sent."""
    fleet = SensorFleet(devices, seed=index, prefix=f"s{index}", faults=False)
    enc = Zigbee2MQTT(base_topic=base)
    made = [enc.encode(fleet.read(i % devices, 1.7e9 + i))[0] for i in range(devices * 20)]
    return [(m.topic, m.payload[1:]) for m in made]


def main() -> None:
    port, base, index, devices, rate, seconds, start_at = arguments()
    made = [
        (struct.pack("!H", len(topic.encode())) + topic.encode(), rest)
        for topic, rest in payloads(base, index, devices)
    ]
    sock, receive_maximum = connect(port, f"bench-sender-{index}-{time.time_ns()}")
    window = min(WINDOW, receive_maximum)
    acks = Acks(sock)
    acks.start()
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.monotonic()
    n = 0
    while acks.failed is None:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        due = int((now - t0) * rate) if rate > 0 else n + window
        due = min(due, acks.count + window)
        if due > n:
            stamp = b'{"sent":%.6f,' % time.time()
            packets = []
            for i in range(n, due):
                topic, rest = made[i % len(made)]
                body = topic + struct.pack("!H", i % 65535 + 1) + b"\x00" + stamp + rest
                packets.append(b"\x32" + varint(len(body)) + body)
            sock.sendall(b"".join(packets))
            n = due
        time.sleep(0.001)
    deadline = time.monotonic() + 60
    while acks.count < n and acks.failed is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if acks.failed:
        print(acks.failed, file=sys.stderr)
    sock.sendall(b"\xe0\x00")  # DISCONNECT, normal
    sock.close()
    print(n, acks.count)


if __name__ == "__main__":
    main()
