"""paho-mqtt's client with its per-packet hot spots made cheap.

paho-mqtt is pure Python, and at a few thousand messages a second most of its cost is
not the network but building objects it throws away. Measured with
``benchmarks/mqtt_cost.py`` and a profiler, per MQTT v5 message:

- every PUBLISH received builds a :class:`~paho.mqtt.properties.Properties` object
  from scratch (its ``__init__`` and ``clear`` alone are ~60 µs), even when the
  properties are the same bytes as the last thousand messages' (a content type);
- every PUBACK received builds a ``ReasonCode`` and an empty ``Properties``;
- every PUBLISH received gets an ``MQTTMessageInfo`` (a ``Condition`` and an
  ``RLock``), which only a message being sent uses;
- every PUBLISH sent packs the same ``Properties`` again (~15 µs);
- after every PUBACK paho walks every in-flight message looking for queued ones:
  for nothing when none is queued, and over the whole window when one is (so a
  publisher that fell behind its window falls further behind);
- the network thread reads each packet with three ``recv`` calls (and the
  remaining length byte by byte) and goes back to ``select`` after one packet, and
  writes each packet with a ``send`` of its own.

:class:`FastClient` overrides exactly those paths and nothing else: decoding is
cached by the raw property bytes, a burst is read with one ``recv`` and each
whole packet in it is taken in one step and handled before ``select`` is called
again, and the packets queued by the time the network thread writes go in one
``send``. What the callbacks see is what paho gives them (``tests/test_fastpaho.py``
feeds both the same packets and compares), except that equal received properties
are one shared object (treat them as read-only, as streampipe does), and a received
message's ``info`` is one shared, already published placeholder.

**Only the thread doing the client's network work runs these overrides** (paho's own
network thread, or the one thread of a :class:`~streampipe.transport.driven.Driver`,
which calls paho's public ``loop_read``/``loop_write``), and under the locks paho
itself takes there (``_out_message_mutex`` around the in-flight window). Publishing
and acknowledging go through paho's public, thread-safe ``publish`` and ``ack``
unchanged. An earlier version let a publishing thread write to the socket itself
and batch its packets; it iterated paho's outgoing deque while the network thread
appended to it, and crashed under load (``deque mutated during iteration``). Safe by
construction beats ~40 µs a message (``benchmarks/mqtt_cost.py``); a driver gets
both, having one thread only.

The overridden methods are paho's private ones, so :data:`Client` is
:class:`FastClient` only on the paho versions it was tested with, and plain
``paho.Client`` otherwise (correct, only slower).

Example:
    >>> from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
    >>> c = Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    >>> isinstance(c, paho.Client)
    True
    >>> frozen_properties("application/json").pack()
    b'\\x13\\x03\\x00\\x10application/json'
"""

from __future__ import annotations

import ssl
import struct
from itertools import islice
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt import __version__ as PAHO_VERSION
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket, MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["Client", "FastClient", "frozen_properties"]

#: paho versions whose private methods FastClient was checked against.
TESTED_PAHO = ("2.2.",)

_V5 = MQTTProtocolVersion.MQTTv5
_SUCCESS = MQTTErrorCode.MQTT_ERR_SUCCESS
_AGAIN = MQTTErrorCode.MQTT_ERR_AGAIN
_QUEUED = paho.mqtt_ms_queued
_RECV_SIZE = 65536
#: Packets handled per read before the network thread looks at its other work.
_READ_BURST = 1000
#: Bytes of queued packets joined into one send at most.
_WRITE_SIZE = 65536
#: Distinct property byte strings remembered; message expiry intervals, which the
#: broker counts down, can make many, so the cache is simply emptied when full.
_CACHE_MAX = 256

#: What every received message's ``info`` is. paho's ``MQTTMessage()`` makes each one
#: an ``MQTTMessageInfo``, with a ``Condition`` and an ``RLock`` (~20 µs, a seventh of
#: what a gateway spends on a message) that only a message being *published* uses.
_RECEIVED = paho.MQTTMessageInfo(0)
_RECEIVED.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
_RECEIVED._published = True
_new_message = object.__new__
_INVALID = paho.mqtt_ms_invalid

_properties_cache: dict[tuple[int, bytes], Properties] = {}
_reasons_cache: dict[tuple[int, int], ReasonCode] = {}


def _decoded_properties(packet_type: int, raw: bytes) -> Properties:
    """The properties ``raw`` encodes (length prefix included), decoded once per value."""
    key = (packet_type, raw)
    props = _properties_cache.get(key)
    if props is None:
        props = Properties(packet_type)
        props.unpack(raw)
        if len(_properties_cache) >= _CACHE_MAX:
            _properties_cache.clear()
        _properties_cache[key] = props
    return props


def _reason(packet_type: int, code: int) -> ReasonCode:
    key = (packet_type, code)
    reason = _reasons_cache.get(key)
    if reason is None:
        reason = _reasons_cache[key] = ReasonCode(packet_type, identifier=code)
    return reason


def _joined(run: list[Any]) -> Any:
    """One queued packet of paho's that sends the packets of ``run``, in order."""
    if len(run) < 2:
        return run[0] if run else None
    joined = b"".join([p["packet"] for p in run])
    return {
        "command": run[0]["command"],
        "mid": run[0]["mid"],
        "qos": run[0]["qos"],
        "pos": 0,
        "to_process": len(joined),
        "packet": joined,
        "info": None,
    }


def _varint(buf: bytes | bytearray, pos: int) -> tuple[int, int]:
    """Decode an MQTT variable byte integer at ``pos``: (value, position after it)."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise MalformedPacket("variable byte integer longer than 4 bytes")


class _FrozenProperties(Properties):
    """PUBLISH properties packed once: paho packs them again for every message."""

    def pack(self) -> bytes:
        packed: bytes | None = self.__dict__.get("_packed")
        if packed is None:
            packed = super().pack()
            object.__setattr__(self, "_packed", packed)
        return packed


def frozen_properties(content_type: str) -> Properties:
    """PUBLISH properties carrying ``content_type``, packed once; never change them."""
    props = _FrozenProperties(PacketTypes.PUBLISH)
    props.ContentType = content_type
    return props


class FastClient(paho.Client):
    """``paho.Client`` with cached v5 decoding and batched socket work; see the module."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._rsock: object = None

    # -- reading: one recv per burst -------------------------------------------------

    def _sock_recv(self, bufsize: int) -> bytes:
        sock = self._sock
        if sock is not self._rsock:  # a new connection: nothing buffered is its
            self._rsock, self._rbuf, self._rpos = sock, b"", 0
        pos = self._rpos
        have = len(self._rbuf) - pos
        if have > 0:
            end = pos + min(bufsize, have)
            self._rpos = end
            return self._rbuf[pos:end]
        if sock is None:
            raise ConnectionError("self._sock is None")
        try:
            data = sock.recv(max(bufsize, _RECV_SIZE))
        except ssl.SSLWantReadError as err:
            raise BlockingIOError() from err
        except ssl.SSLWantWriteError as err:
            self._call_socket_register_write()
            raise BlockingIOError() from err
        if len(data) <= bufsize:
            return data
        self._rbuf, self._rpos = data, bufsize
        return data[:bufsize]

    def _packet_read(self) -> MQTTErrorCode:
        # A whole packet in our buffer is taken in one step; paho's own read takes
        # the command, each byte of the remaining length and the body with a call
        # each. A packet not (yet) all here is left to paho, which reads it from
        # the same buffer and then from the socket.
        if self._in_packet["command"] or self._sock is None:
            return super()._packet_read()
        if self._sock is not self._rsock or self._rpos >= len(self._rbuf):
            try:
                self._sock_recv(0)  # fills the buffer with what the socket has
            except BlockingIOError:
                return _AGAIN
            except TimeoutError as err:
                self._easy_log(paho.MQTT_LOG_ERR, "timeout on socket: %s", err)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            except OSError as err:
                self._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            if self._rpos >= len(self._rbuf):  # the broker closed the connection
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
        buf, start = self._rbuf, self._rpos
        try:
            length, pos = _varint(buf, start + 1)
        except (IndexError, MalformedPacket):  # cut short, or longer than MQTT allows
            return super()._packet_read()
        if pos + length > len(buf):
            return super()._packet_read()
        self._rpos = pos + length
        self._in_packet["command"] = buf[start]
        self._in_packet["packet"] = bytearray(memoryview(buf)[pos : pos + length])
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            self._easy_log(paho.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = {
            "command": 0,
            "have_remaining": 0,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": 0,
            "packet": bytearray(b""),
            "to_process": 0,
            "pos": 0,
        }
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()
        return rc

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        # Read until the socket would block, and never return with bytes left in our
        # buffer, where select() cannot see them.
        handled = 0
        while True:
            if self._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == _AGAIN:
                return _SUCCESS
            handled += 1
            if handled >= _READ_BURST and self._rpos >= len(self._rbuf):
                return _SUCCESS

    # -- writing: one send for the packets queued together --------------------------

    def _packet_write(self) -> MQTTErrorCode:
        # paho sends each queued packet with a send() of its own: a PUBACK for every
        # message acknowledged, a PUBLISH for every frame. Here each run of packets
        # queued meanwhile becomes one packet, which paho then sends (a partial send
        # included) as its own. Only packets that paho does nothing with once sent are
        # joined: not a QoS 0 PUBLISH (its on_publish) nor a DISCONNECT (closing the
        # socket), nor one partly sent. The head of paho's queue is taken only here,
        # on the network thread; other threads only append to its tail (deque
        # operations are atomic), so the packets taken are those queued before.
        out = self._out_packet
        if len(out) > 1:
            taken = [out.popleft() for _ in range(len(out))]
            rebuilt: list[Any] = []
            run: list[Any] = []
            size = 0
            for packet in taken:
                command = packet["command"] & 0xF0
                joinable = not (
                    packet["pos"]
                    or command == paho.DISCONNECT
                    or (command == paho.PUBLISH and packet["qos"] == 0)
                )
                if not joinable or size + packet["to_process"] > _WRITE_SIZE:
                    rebuilt.append(_joined(run))
                    run, size = [], 0
                    if not joinable:
                        rebuilt.append(packet)
                        continue
                run.append(packet)
                size += packet["to_process"]
            rebuilt.append(_joined(run))
            out.extendleft(p for p in reversed(rebuilt) if p is not None)
        return super()._packet_write()

    # -- decoding: cached by the raw bytes -------------------------------------------

    def _handle_publish(self) -> MQTTErrorCode:
        header = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        if self._protocol != _V5 or qos == 2:
            return super()._handle_publish()
        packet = self._in_packet["packet"]
        try:
            topic_len = (packet[0] << 8) | packet[1]
            pos = 2 + topic_len
            topic = bytes(packet[2:pos])
            mid = 0
            if qos:
                mid = (packet[pos] << 8) | packet[pos + 1]
                pos += 2
            props_len, props_pos = _varint(packet, pos)
            end = props_pos + props_len
            if end > len(packet) or len(topic) != topic_len:
                raise MalformedPacket("PUBLISH packet is shorter than its lengths")
            props = _decoded_properties(PacketTypes.PUBLISH, bytes(packet[pos:end]))
        except IndexError as exc:
            raise MalformedPacket("PUBLISH packet is truncated") from exc
        except (struct.error, KeyError, ValueError, MQTTException) as exc:
            raise MalformedPacket(str(exc)) from exc
        message = _new_message(paho.MQTTMessage)
        message.timestamp = paho.time_func()
        message.state = _INVALID
        message.mid = mid
        message._topic = topic
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.info = _RECEIVED
        message.properties = props
        message.payload = bytes(memoryview(packet)[end:])
        self._handle_on_message(message)
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return _SUCCESS

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        if self._protocol != _V5:
            return super()._handle_pubackcomp(cmd)
        packet_type = PacketTypes.PUBACK if cmd == "PUBACK" else PacketTypes.PUBCOMP
        packet = self._in_packet["packet"]
        size = len(packet)
        if size < 2:
            raise MalformedPacket("wrong size of packet")
        mid = (packet[0] << 8) | packet[1]
        try:
            reason = _reason(packet_type, packet[2] if size > 2 else 0)
            props = _decoded_properties(packet_type, bytes(packet[3:]) if size > 3 else b"\x00")
        except (IndexError, struct.error, KeyError, ValueError, MQTTException) as exc:
            raise MalformedPacket(str(exc)) from exc
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, reason, props)
        return _SUCCESS

    def _update_inflight(self) -> MQTTErrorCode:
        """Send queued messages while the in-flight window has room, oldest first.

        paho walks every message from the oldest, in flight ones included, after each
        PUBACK: once a publisher falls behind its window, each acknowledgement costs a
        walk over the whole window, so it falls further behind. Queued messages are
        always the newest (a message is queued only when the window is full, and the
        window is refilled from the queue, in order, in the same locked step that
        frees room), so the walk can start right after the in-flight ones. Whenever
        the messages there are not as that says, paho's own walk decides.
        """
        out = self._out_messages
        inflight, most = self._inflight_messages, self._max_inflight_messages
        if len(out) <= inflight or most == 0 or inflight >= most:
            return _SUCCESS  # nothing queued, or no window, or no room: paho does nothing
        if inflight and next(islice(out.values(), inflight - 1, None)).state == _QUEUED:
            return super()._update_inflight()
        for m in islice(out.values(), inflight, None):
            if self._inflight_messages >= most:
                break
            if m.qos != 1 or m.state != _QUEUED:
                return super()._update_inflight()
            self._inflight_messages += 1
            m.state = paho.mqtt_ms_wait_for_puback
            rc = self._send_publish(
                m.mid, m.topic.encode("utf-8"), m.payload, m.qos, m.retain, m.dup,
                properties=m.properties,
            )  # fmt: skip
            if rc != _SUCCESS:
                return rc
        return _SUCCESS


#: The client class streampipe uses.
Client: type[paho.Client] = FastClient if PAHO_VERSION.startswith(TESTED_PAHO) else paho.Client
