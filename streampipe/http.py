"""The edge's HTTP endpoint: ``/metrics`` for Prometheus and ``/healthz`` for orchestrators.

``/healthz`` answers ``200`` with ``{"status": "ok", ...}`` while the stage is running and
connected to its broker, and ``503`` with ``"status": "unavailable"`` otherwise, so a
container health check or a load balancer sees a stage that lost its broker. Any other
path but ``/`` is ``404``. Serving runs on daemon threads and never touches the stage:
``health`` must be cheap and thread-safe.

The server shares the process's file descriptors with the MQTT connection, so it can
never take them all: it serves at most :data:`MAX_CONNECTIONS` connections at once and
closes any further one as soon as it is accepted, and a connection gets
:data:`REQUEST_TIMEOUT` seconds in all to send its request and be answered. Clients that
connect and send half a request (slowloris) thus hold at most that many descriptors, for
at most that long. Refused and timed-out connections are counted in
``streampipe_http_connections_refused_total{reason}``.

>>> from prometheus_client import CollectorRegistry
>>> server = MetricsServer("127.0.0.1", 0, CollectorRegistry(), lambda: Health(True, True))
>>> import json, urllib.request
>>> with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz") as r:
...     r.status, json.loads(r.read())["status"]
(200, 'ok')
>>> server.close()
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import MetricsHandler

__all__ = ["MAX_CONNECTIONS", "REQUEST_TIMEOUT", "Health", "ListenError", "MetricsServer"]

#: Connections served at once. Prometheus and a health check need one or two each; a
#: systemd service may open 1,024 descriptors, and the broker connection, the state
#: dir and the threads' own must always find one free.
MAX_CONNECTIONS = 16
#: Seconds a connection has for its whole request and answer; a scrape of a stage takes
#: milliseconds, Prometheus's default scrape timeout is 10 s.
REQUEST_TIMEOUT = 5.0


class ListenError(OSError):
    """The server cannot listen on ``host:port``; :attr:`in_use` if another process does.

    >>> import socket
    >>> with socket.create_server(("127.0.0.1", 0)) as taken:
    ...     port = taken.getsockname()[1]
    ...     try:
    ...         MetricsServer("127.0.0.1", port, CollectorRegistry(), lambda: Health(True, True))
    ...     except ListenError as exc:
    ...         exc.in_use
    True
    """

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.host, self.port = host, port
        self.in_use = cause.errno == errno.EADDRINUSE

    def __str__(self) -> str:
        return f"cannot listen on {self.host}:{self.port}: {self.strerror}"


@dataclass(frozen=True, slots=True)
class Health:
    """Whether a stage is connected to its broker, running, and making progress (not
    stuck with messages waiting)."""

    connected: bool
    running: bool
    progressing: bool = True

    @property
    def ok(self) -> bool:
        return self.connected and self.running and self.progressing

    def body(self) -> dict[str, Any]:
        return {"status": "ok" if self.ok else "unavailable", **asdict(self)}


class _Handler(MetricsHandler):
    health: Callable[[], Health]
    timeout = REQUEST_TIMEOUT  # on every read and write of the socket (socketserver)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/metrics", "/"):
            super().do_GET()
        elif path == "/healthz":
            health = type(self).health()
            self._reply(200 if health.ok else 503, json.dumps(health.body()).encode())
        else:
            self._reply(404, b'{"status": "not found"}')

    def _reply(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the listen backlog: accepted at once, then served or closed
    max_connections = MAX_CONNECTIONS
    request_timeout = REQUEST_TIMEOUT
    refused: Counter

    def server_activate(self) -> None:
        # Connections being served: taken in the accepting thread, given back by the
        # thread that served the connection.
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().server_activate()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Serve the connection only if a slot is free; the server closes it otherwise."""
        if self._slots.acquire(blocking=False):
            return True
        self.refused.labels("too_many_connections").inc()
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # However slowly the client sends or reads, the connection is shut down once its
        # time is up; the handler's reads and writes then fail and its thread ends.
        timer = threading.Timer(self.request_timeout, self._expire, (request,))
        timer.daemon = True
        timer.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            timer.cancel()
            self._slots.release()

    def _expire(self, request: socket.socket) -> None:
        self.refused.labels("timeout").inc()
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or went away: not worth a traceback on stderr."""


class MetricsServer:
    """Serves ``registry`` on ``/metrics`` and ``health()`` on ``/healthz``; ``port=0`` picks
    a free port (see :attr:`port`). Started on construction; :meth:`close` stops it.
    :class:`ListenError` if it cannot listen there.

    ``max_connections`` and ``timeout`` bound what clients can hold (see the module docs).
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Callable[[], Health],
        *,
        max_connections: int = MAX_CONNECTIONS,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        if max_connections < 1 or not timeout > 0:
            raise ValueError("max_connections must be at least 1 and timeout positive")
        refused = Counter(
            "http_connections_refused",
            "Connections to /metrics and /healthz closed unserved: too many at once, or "
            "not done in time",
            ["reason"],
            namespace="streampipe",
            registry=registry,
        )
        handler = type(
            "StageHandler",
            (_Handler,),
            {"registry": registry, "health": staticmethod(health), "timeout": timeout},
        )
        self._registry, self._refused = registry, refused
        try:
            server_class = type(
                "StageServer",
                (_Server,),
                {
                    "address_family": _family(host, port),
                    "max_connections": max_connections,
                    "request_timeout": timeout,
                    "refused": refused,
                },
            )
            self._server = server_class((host, port), handler)
        except OSError as exc:
            registry.unregister(refused)  # so that a stage may try again
            raise ListenError(host, port, exc) from None
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(KeyError):  # so that a stage may start again
            self._registry.unregister(self._refused)

    # EdgeService calls shutdown(), as on the server prometheus_client used to return.
    shutdown = close


def _family(host: str, port: int) -> socket.AddressFamily:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]
