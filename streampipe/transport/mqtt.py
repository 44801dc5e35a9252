"""One MQTT v5 connection, and (with the modules beside it) the only code that speaks paho.

The client is paho's, with its per-packet hot spots made cheap
(:mod:`streampipe.transport.fastpaho`). paho's return codes become typed exceptions
here; the rest of streampipe sees :class:`Connection` and :class:`MQTTError`.
Subscriptions are remembered and renewed in ``on_connect``, so a reconnect never leaves
a stage deaf. Sockets get ``TCP_NODELAY``: paho does not set it, and small MQTT packets
otherwise wait ~40 ms for Nagle's algorithm. A connection runs paho's network thread,
or, made with ``driver=``, is driven with others from the caller's thread
(:mod:`streampipe.transport.driven`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from streampipe.transport.driven import Driver
from streampipe.transport.fastpaho import Client, frozen_properties
from streampipe.transport.tls import TLSFiles
from streampipe.transport.url import BrokerURL

__all__ = ["ConnectError", "Connection", "MQTTError", "Message", "Will"]

log = logging.getLogger(__name__)

Message = paho.MQTTMessage


class MQTTError(Exception):
    """An MQTT operation failed; ``str()`` says which and why."""


class ConnectError(MQTTError):
    """The broker could not be reached, or refused the connection."""


@dataclass(frozen=True, slots=True)
class Will:
    """The message the broker publishes for us if we vanish without a clean disconnect."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def _check(rc: MQTTErrorCode | int, what: str) -> None:
    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
        raise MQTTError(f"{what} failed: {paho.error_string(rc)}")


def _address(url: BrokerURL) -> str:
    return f"[{url.host}]:{url.port}" if ":" in url.host else f"{url.host}:{url.port}"


def _sent_no_tls(exc: ssl.SSLError) -> bool:
    """Whether a handshake failed because the server sent no TLS at all: it closed the
    connection, or answered in something else (a plain MQTT listener does either). A TLS
    server that refuses us says why in an alert instead."""
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return True
    return (exc.reason or "").upper() in {
        "WRONG_VERSION_NUMBER",
        "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG",
        "UNEXPECTED_EOF_WHILE_READING",
    }


def _nodelay(client: paho.Client, userdata: Any, sock: Any) -> None:
    # A unix or websocket transport has no such option: nothing to do there.
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


#: Longest a closing socket waits for the broker to close its side (seconds).
CLOSE_LINGER = 1.0


def _close_gently(client: paho.Client, userdata: Any, sock: Any) -> None:
    """Just before paho closes a socket: stop sending, and read what the broker still
    sends until it closes its side too.

    A TCP socket closed with unread bytes in it (the acknowledgements of the last frames
    sent, say) is reset rather than closed, and the broker then drops what it had not yet
    read from us: seen, the last frames before a DISCONNECT, and the DISCONNECT itself
    (so the will was published). After a DISCONNECT the broker closes at once; a socket
    that is already dead fails the first call, and that is the end of it.
    """
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + CLOSE_LINGER
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                break


@functools.lru_cache(maxsize=64)
def _publish_properties(content_type: str) -> Properties:
    """PUBLISH properties carrying a content type, built and packed once per type:
    building a ``Properties`` costs ~25 µs and packing it ~15 µs."""
    return frozen_properties(content_type)


#: MQTT v5 DISCONNECT reason code "Session taken over".
SESSION_TAKEN_OVER = 0x8E
#: Seconds between reconnect attempts: the first, and the most (doubling in between);
#: paho's loop keeps them on a threaded connection, :meth:`Connection._retry_later` on a
#: driven one.
RETRY_FIRST, RETRY_MOST = 1.0, 30.0


def _queued(client: paho.Client, userdata: Any, sock: Any) -> None:
    """Registered for writes on a driven connection: paho then only queues what is
    published, and the driver writes it (with whatever else was queued meanwhile)."""


class Connection:
    """An MQTT v5 client connection with remembered subscriptions.

    ``on_message`` runs on paho's network thread: it must only hand the message on
    (to a bounded queue), never do real work there. With ``manual_ack=True`` a QoS 1
    message is acknowledged only when :meth:`ack` is called, and ``receive_maximum``
    bounds how many unacknowledged messages the broker sends us at once. With a
    ``driver`` there is no network thread: the driver's thread does the network work,
    callbacks included (see :mod:`streampipe.transport.driven` for the rules).
    """

    def __init__(
        self,
        url: BrokerURL,
        client_id: str,
        *,
        clean_start: bool = True,
        session_expiry: int = 0,
        keepalive: int = 30,
        will: Will | None = None,
        receive_maximum: int | None = None,
        manual_ack: bool = False,
        max_inflight: int = 100,
        on_message: Callable[[Message], None] | None = None,
        driver: Driver | None = None,
    ) -> None:
        self.url = url
        self.client_id = client_id
        self._clean_start = clean_start
        self._session_expiry = session_expiry
        self._keepalive = keepalive
        self._receive_maximum = receive_maximum
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._disconnected = threading.Event()  # set by every on_disconnect
        self._first_connack = threading.Event()
        self._refused: str | None = None
        self._pending_subacks: dict[int, threading.Event] = {}
        self._suback_failures: dict[int, str] = {}
        self.session_present = False
        #: Connections made (reconnects included) and sessions found missing on reconnect.
        #: ``connects`` also numbers the connection a message came in on (:meth:`ack`,
        #: :meth:`resent`).
        self.connects = 0
        self._resumed: dict[int, bool] = {}  # connection number -> session present
        #: The broker's Receive Maximum (how many QoS 1 messages we may have in flight
        #: to it), from its CONNACK; 65,535 when it sets none.
        self.broker_receive_maximum = 65_535
        self.sessions_lost = 0
        #: QoS 1 messages the broker acknowledged with a failure reason (MQTT v5 PUBACK
        #: 0x80 and up: not authorized, quota exceeded, …), by reason; paho counts them
        #: as published, so without this a refused publish looked delivered.
        self.refused: Counter[str] = Counter()
        self._pending_topics: dict[int, str] = {}
        #: Set when another client took over our client id (MQTT v5 reason 0x8E).
        self.taken_over = threading.Event()
        self._driver = driver
        #: Driven only: when to try reconnecting (None: not to), and the next delay.
        self._retry_at: float | None = None
        self._retry_delay = RETRY_FIRST
        self._reconnects = False  # connected once, not closed since: reconnect if lost

        c = Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=manual_ack,
        )
        c.suppress_exceptions = True  # a failing user callback is logged, never kills the loop
        if url.username:
            c.username_pw_set(url.username, url.password)
        if url.tls:
            c.tls_set_context((url.tls_files or TLSFiles()).context())
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(min_delay=RETRY_FIRST, max_delay=RETRY_MOST)
        c.on_socket_open = _nodelay
        c.on_socket_close = _close_gently
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        if on_message is not None:
            c.on_message = lambda _c, _u, msg: on_message(msg)
        self._client = c
        if driver is not None:
            c.on_socket_register_write = _queued
            driver.add(self)

    # -- lifecycle -----------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> Connection:
        """Connect and wait for the broker's answer; raise :class:`ConnectError` if refused."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry
        if self._receive_maximum is not None:
            props.ReceiveMaximum = self._receive_maximum
        try:
            self._client.connect(
                self.url.host,
                self.url.port,
                keepalive=self._keepalive,
                clean_start=self._clean_start,
                properties=props,
            )
        except ssl.SSLCertVerificationError as exc:
            raise ConnectError(
                f"TLS: broker {self.url} is not trusted: {exc.verify_message}"
                " (check --ca-file and that the host name is in the broker's certificate)"
            ) from None
        except ssl.SSLError as exc:
            if _sent_no_tls(exc):
                raise ConnectError(self._no_tls(exc.reason or str(exc))) from None
            raise ConnectError(f"TLS handshake with broker {self.url} failed: {exc}") from None
        except (OSError, ValueError) as exc:
            if self.url.tls and isinstance(exc, (ConnectionResetError, BrokenPipeError)):
                # Connected, then cut off in the handshake: a plain listener does that.
                raise ConnectError(self._no_tls(exc.strerror or str(exc))) from None
            raise ConnectError(f"cannot reach broker {self.url}: {exc}") from None
        if self._driver is None:
            self._client.loop_start()
        if not self._wait(self._first_connack, timeout):
            self.close()
            raise ConnectError(f"broker {self.url} did not answer within {timeout:g} s")
        if self._refused is not None:
            self.close()
            raise ConnectError(f"broker {self.url} refused the connection: {self._refused}")
        if self.broker_receive_maximum >= self._client.max_inflight_messages:
            self._reconnects = True
            return self
        # The broker takes fewer QoS 1 messages in flight than our window: a broker may
        # refuse or drop the excess. paho sets its window only before it connects, so
        # connect again with the broker's (once, at start-up; a session carries over).
        self._disconnected.clear()
        self._client.disconnect()
        if self._driver is not None:
            self._wait(self._disconnected, timeout)
        self._client.loop_stop()
        self._connected.clear()
        self._first_connack.clear()
        self._client.max_inflight_messages_set(self.broker_receive_maximum)
        found = self.session_present
        self.connect(timeout)
        self.session_present = found  # whether the broker had kept a session for us
        return self

    def _no_tls(self, why: str) -> str:
        return (
            f"the broker at {_address(self.url)} did not answer TLS "
            f"({why.lower().replace('_', ' ')}): is it a plain MQTT port? use mqtt://"
        )

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the will is not published) and stop the network thread.

        Waits (up to ``timeout``) for the DISCONNECT to be written, and so for every
        packet queued before it: acknowledgements and publishes. Stopping paho's loop
        straight after ``disconnect()`` could end it with some still unsent (seen: the
        last acknowledgements, whose messages the broker then delivered again).
        """
        self._disconnected.clear()
        self._reconnects, self._retry_at = False, None
        try:
            rc = self._client.disconnect()
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._connected.is_set():
                self._wait(self._disconnected, timeout)
        finally:
            if self._driver is None:
                self._client.loop_stop()
            self._connected.clear()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._wait(self._connected, timeout)

    def wait_published(self, info: paho.MQTTMessageInfo, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the broker to acknowledge a message sent
        with :meth:`publish`. Disconnected, it waits for the connection to come back
        instead (paho sends the message again then) and says False."""
        if self._driver is not None:
            return self._driver.run_until(info.is_published, timeout)
        try:
            info.wait_for_publish(timeout)  # says nothing: paho returns None either way
            return info.is_published()
        except RuntimeError:  # disconnected: paho resends on reconnect
            self.wait_connected(timeout)
            return False

    def _wait(self, event: threading.Event, timeout: float) -> bool:
        """``event.wait(timeout)``; driven, the driver drives meanwhile."""
        if self._driver is None:
            return event.wait(timeout)
        return self._driver.run_until(event.is_set, timeout)

    def _reconnect(self) -> None:  # the driver's thread
        try:
            self._client.reconnect()
        except OSError as exc:  # unreachable: try again later (ssl.SSLError included)
            log.debug("reconnecting to %s failed: %s", self.url, exc)
            self._retry_later()

    def _retry_later(self) -> None:
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, RETRY_MOST)

    # -- messages ------------------------------------------------------------------

    def subscribe(self, topics: list[str] | str, qos: int = 1, timeout: float = 10.0) -> None:
        """Subscribe (and remember, to renew on every reconnect); wait for the SUBACK."""
        if isinstance(topics, str):
            topics = [topics]
        with self._lock:
            for t in topics:
                self._subscriptions[t] = qos
        if self.connected:
            self._send_subscribe([(t, qos) for t in topics], timeout)

    def unsubscribe(self, topics: list[str] | str) -> None:
        """Stop receiving from (and forget) these subscriptions."""
        if isinstance(topics, str):
            topics = [topics]
        with self._lock:
            for t in topics:
                self._subscriptions.pop(t, None)
        self._client.unsubscribe(topics)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        content_type: str | None = None,
        user_properties: Sequence[tuple[str, str]] = (),
    ) -> paho.MQTTMessageInfo:
        """Publish; ``user_properties`` are MQTT v5 user properties (name, value), in order."""
        props = None
        if user_properties:
            # Built for each message: the values differ from one to the next.
            props = Properties(PacketTypes.PUBLISH)
            if content_type is not None:
                props.ContentType = content_type
            props.UserProperty = list(user_properties)
        elif content_type is not None:
            props = _publish_properties(content_type)
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if qos:
            self._pending_topics[info.mid] = topic
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            if qos > 0:
                # Not connected right now: paho keeps a QoS 1 message and sends it once
                # reconnected, but its MessageInfo would go on raising on this rc even
                # after delivery (is_published, wait_for_publish). It is queued: say so.
                info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
            return info  # QoS 0 may be dropped: that is what it promises
        _check(info.rc, f"publish to {topic}")
        return info

    def ack(self, msg: Message, connection: int | None = None) -> None:
        """Acknowledge a message received with ``manual_ack=True``.

        ``connection`` is the value :attr:`connects` had when ``msg`` arrived (read it
        in ``on_message``, on the network thread that counts connections). A message
        from an earlier connection is not acknowledged: after a reconnect the broker
        resends it with the same packet id, and that copy is acknowledged when it is
        processed; or the broker kept no session, and there is nothing to acknowledge.
        """
        if msg.qos > 0 and (connection is None or connection == self.connects):
            self._client.ack(msg.mid, msg.qos)

    def resent(self, connection: int) -> bool:
        """Whether the broker resends what connection number ``connection`` left
        unacknowledged: the next connection resumed the session, and in MQTT v5 a
        resumed session gets every unacknowledged message again, with its packet id."""
        return connection < self.connects and self._resumed.get(connection + 1, False)

    # -- paho callbacks (network thread) --------------------------------------------

    def _send_subscribe(self, subs: list[tuple[str, int]], timeout: float | None) -> None:
        if not subs:
            return
        done = threading.Event()
        with self._lock:
            rc, mid = self._client.subscribe(subs)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise MQTTError(f"subscribe failed: {paho.error_string(rc)}")
            self._pending_subacks[mid] = done
        if timeout is None:
            return
        if not self._wait(done, timeout):
            raise MQTTError(f"broker did not acknowledge subscription within {timeout:g} s")
        failure = self._suback_failures.pop(mid, None)
        if failure:
            raise MQTTError(f"broker refused subscription: {failure}")

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            log.warning("broker %s refused connection: %s", self.url, reason)
            if not self._first_connack.is_set():
                # Do not keep retrying a refusal at start-up: connect() reports it.
                client.disconnect()
            self._first_connack.set()
            return
        self._refused = None
        self._retry_delay = RETRY_FIRST
        self.session_present = bool(flags.session_present)
        if properties is not None and hasattr(properties, "ReceiveMaximum"):
            self.broker_receive_maximum = int(properties.ReceiveMaximum)
        if self.connects and not self._clean_start and not self.session_present:
            self.sessions_lost += 1
            log.warning(
                "broker %s kept no session for %s: what was queued for it while it was "
                "away is lost (session expired, or the broker restarted without persistence)",
                self.url,
                self.client_id,
            )
        # Recorded before the count moves on, so whoever reads the new count finds it.
        self._resumed[self.connects + 1] = self.session_present
        self._resumed.pop(self.connects - 64, None)
        self.connects += 1
        with self._lock:
            subs = list(self._subscriptions.items())
        if subs:
            # Renewed here so a reconnect is never deaf; not awaited on the network thread.
            try:
                self._send_subscribe(subs, timeout=None)
            except MQTTError as exc:
                log.error("resubscribing failed: %s", exc)
        self._connected.set()
        self._first_connack.set()

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        self._disconnected.set()
        if not self._first_connack.is_set():
            # Closed before any CONNACK: at start-up that is a refusal, not a reason to retry.
            self._refused = f"it closed the connection before answering ({reason})"
            if self.url.tls:
                self._refused += (
                    "; a broker that requires client certificates does this when none or an "
                    "untrusted one is given (--cert-file, --key-file)"
                )
            else:  # a TLS listener drops an MQTT CONNECT sent in the clear
                self._refused += f"; is {_address(self.url)} a TLS port? use mqtts://"
            client.disconnect()
            self._first_connack.set()
            return
        if reason.value == SESSION_TAKEN_OVER:
            # Another process connected with our client id. Reconnecting would take the
            # session back and start a takeover loop between the two: stop instead.
            self.taken_over.set()
            log.error(
                "another client connected to %s with client id %s; this one stops",
                self.url,
                self.client_id,
            )
            client.disconnect()  # ends paho's loop without reconnecting
        elif reason.is_failure:
            log.warning("disconnected from %s: %s; reconnecting", self.url, reason)
        if self._driver is not None and self._reconnects and not self.taken_over.is_set():
            self._retry_later()

    def _on_publish(
        self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        topic = self._pending_topics.pop(mid, "?")
        if reason is not None and getattr(reason, "is_failure", False):
            name = str(reason)
            if not self.refused[name]:
                log.warning(
                    "the broker refused a message on %s: %s (reason %d); is this account "
                    "allowed to publish there?",
                    topic,
                    name,
                    reason.value,
                )
            self.refused[name] += 1

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        failures = [str(r) for r in reasons if r.is_failure]
        with self._lock:
            done = self._pending_subacks.pop(mid, None)
            if failures:
                self._suback_failures[mid] = ", ".join(failures)
        if done is not None:
            done.set()
