"""The edge's HTTP endpoint: ``/metrics`` for Prometheus and ``/healthz`` for orchestrators.

``/healthz`` answers ``200`` with ``{"status": "ok", ...}`` while the stage is running and
connected to its broker, and ``503`` with ``"status": "unavailable"`` otherwise, so a
container health check or a load balancer sees a stage that lost its broker. Any other
path but ``/`` is ``404``. Serving runs on daemon threads and never touches the stage:
``health`` must be cheap and thread-safe.

>>> from prometheus_client import CollectorRegistry
>>> server = MetricsServer("127.0.0.1", 0, CollectorRegistry(), lambda: Health(True, True))
>>> import json, urllib.request
>>> with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz") as r:
...     r.status, json.loads(r.read())["status"]
(200, 'ok')
>>> server.close()
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

__all__ = ["Health", "MetricsServer"]


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


class MetricsServer:
    """Serves ``registry`` on ``/metrics`` and ``health()`` on ``/healthz``; ``port=0`` picks
    a free port (see :attr:`port`). Started on construction; :meth:`close` stops it."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Callable[[], Health],
    ) -> None:
        handler = type(
            "StageHandler", (_Handler,), {"registry": registry, "health": staticmethod(health)}
        )
        server_class = type("StageServer", (_Server,), {"address_family": _family(host, port)})
        self._server = server_class((host, port), handler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # EdgeService calls shutdown(), as on the server prometheus_client used to return.
    shutdown = close


def _family(host: str, port: int) -> socket.AddressFamily:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]
