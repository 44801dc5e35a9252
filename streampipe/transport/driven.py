"""Several MQTT connections driven from one thread: no network threads, no hand-offs.

A :class:`~streampipe.transport.Connection` made with ``driver=`` has no network thread
of its own. Its packets are read and written, its keepalive kept and its reconnects
made only inside :meth:`Driver.run_once`, on the thread that calls it, through paho's
public external-loop API (``socket``, ``loop_read``, ``loop_write``, ``loop_misc``,
``want_write``, ``reconnect``). Its callbacks (``on_message``, ``on_publish``…) run
there too.

Why: with paho's threaded loop a message crosses threads twice on its way through a
gateway (network thread → worker → the other connection's network thread), and each
crossing is a wake-up and a turn at the GIL, which at a few thousand messages a second
cost more than the mapping and encoding themselves. Driven, a message is read, handled
and its result written by one thread; the packets queued meanwhile go out in one
``send`` each (``publish`` only queues: the driver registers for writes, so paho does
not write on the caller's stack).

Rules: one thread drives at a time (every call to a driven connection, ``publish`` and
``ack`` included, is made on it); waits on a driven connection (``connect``,
``subscribe``, ``close``, :meth:`Connection.wait_published`) drive every connection of
its driver meanwhile, so callbacks may run inside them: they should only record what
they got. :meth:`Driver.wake` is the one call any thread (or a signal handler) may make.

Example:
    >>> driver = Driver()
    >>> driver.run_until(lambda: True, timeout=1.0)  # nothing to wait for
    True
    >>> driver.run_once(0.0)  # no connections: returns at once
    >>> driver.close()
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streampipe.transport.mqtt import Connection

__all__ = ["Driver"]

#: Longest a single ``select`` blocks, so keepalives and reconnects are never late.
MAX_BLOCK = 1.0


class Driver:
    """Runs the network I/O of its connections on whichever thread calls it."""

    def __init__(self) -> None:
        self._connections: list[Connection] = []
        #: Seconds spent waiting in ``select`` so far: the rest of the driving thread's
        #: time was work (its owner's included).
        self.waited = 0.0
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def add(self, conn: Connection) -> None:
        self._connections.append(conn)

    def wake(self) -> None:
        """Make a blocked :meth:`run_once` return now (any thread, or a signal handler)."""
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._wake_w.send(b"\0")

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    def run_once(self, timeout: float) -> None:
        """Write what is queued, wait up to ``timeout`` seconds for any connection's
        socket to have something (or :meth:`wake`), read it all, run the callbacks,
        write what they queued, keep the keepalives, and reconnect what is due."""
        now = time.monotonic()
        timeout = min(max(0.0, timeout), MAX_BLOCK)
        rlist: list[object] = [self._wake_r]
        wlist: list[object] = []
        driven = []
        for conn in self._connections:
            client = conn._client
            if client.socket() is None:
                retry = conn._retry_at
                if retry is None:
                    continue  # closed, or never connected: nothing to drive
                if now >= retry:
                    conn._reconnect()
                if client.socket() is None:
                    timeout = min(timeout, max(0.0, (conn._retry_at or now) - now))
                    continue
            if client.want_write():
                client.loop_write()  # most writes complete at once
            sock = client.socket()
            if sock is None:  # closed by what was written (a DISCONNECT) or failed
                timeout = 0.0  # a waiter may be done: let it look
                continue
            if client.want_write():
                wlist.append(sock)
            if getattr(sock, "pending", None) and sock.pending():  # TLS bytes already read
                timeout = 0.0
            rlist.append(sock)
            driven.append((conn, sock))
        start = time.monotonic()
        try:
            readable = select.select(rlist, wlist, [], timeout)[0]
        except (OSError, ValueError):  # a socket closed under us: the next round sees it
            return
        finally:
            self.waited += time.monotonic() - start
        if self._wake_r in readable:
            with contextlib.suppress(OSError):
                self._wake_r.recv(4096)
        for conn, sock in driven:
            client = conn._client
            if sock in readable or (getattr(sock, "pending", None) and sock.pending()):
                client.loop_read()
            if client.socket() is sock and client.want_write():
                client.loop_write()
            if client.socket() is sock:
                client.loop_misc()

    def run_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Drive until ``done()`` is true (then True) or ``timeout`` seconds passed."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.run_once(left)
        return True
