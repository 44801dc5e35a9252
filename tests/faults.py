"""Fault injection for tests: a TCP proxy the test can cut, and Friedman data on disk.

Traffic stays on loopback: the proxy listens on 127.0.0.1 and forwards to a broker
on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from replaying import predict_then_learn, write_csv
from river import datasets


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target port; :meth:`cut` drops every connection
    and refuses new ones until :meth:`restore`."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.accepted = 0
        self.accepted_event = threading.Condition()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            with self.accepted_event:
                self.accepted += 1
                self.accepted_event.notify_all()
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every connection now, and refuse new ones."""
        self._open.clear()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self._open.set()

    def wait_accepted(self, count: int, timeout: float) -> bool:
        with self.accepted_event:
            return self.accepted_event.wait_for(lambda: self.accepted >= count, timeout)

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()


def friedman_rows(n: int, seed: int = 7) -> list[tuple[dict[str, float], float]]:
    """``n`` seeded Friedman readings, as the edge reads them back from a CSV file."""
    return [
        ({f"x{k}": float(v) for k, v in x.items()}, float(y))
        for x, y in datasets.synth.Friedman(seed=seed).take(n)
    ]


def friedman_csv(path: Path, n: int, seed: int = 7) -> list[float]:
    """Write ``n`` Friedman readings to ``path``; return River's offline predictions
    (``StandardScaler | LinearRegression``, predict then learn) for them, by seq."""
    rows = friedman_rows(n, seed)
    write_csv(path, rows)  # repr()s: what the edge reads back is bit-identical
    return predict_then_learn(rows)


def run_in_thread(service: Any) -> tuple[threading.Thread, list[BaseException]]:
    """``service.run()`` on a started daemon thread, and the list that gets what it
    raised, if anything, for the test to assert on."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            service.run()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, failure


@contextmanager
def running(service: Any) -> Iterator[Any]:
    """A started ``service`` (an edge, a gateway) running on a thread; stopped, and
    checked to have stopped without raising, on exit."""
    thread, failure = run_in_thread(service)
    try:
        yield service
    finally:
        service.stop()
        thread.join(30)
    assert not thread.is_alive(), "the service did not stop within 30 s"
    assert not failure, f"the service raised {failure[0]!r}"


@contextmanager
def started(service: Any) -> Iterator[Any]:
    """:func:`running`, of ``service`` started first (connected and subscribed)."""
    with running(service.start()):
        yield service


def quiet_edge(broker: Any, topics: Any, stage_id: str) -> Any:
    """An edge under ``topics``' root, without a metrics port, publishing no metrics
    while a test runs."""
    from streampipe.edge import EdgeConfig, EdgeService

    return EdgeService(
        EdgeConfig(
            broker.url, stage_id, topic_root=topics.root, metrics_port=None,
            metrics_interval=3600,
        )
    )  # fmt: skip


def predictions_by_device(cap: Any, topics: Any) -> dict[str, list[tuple[int, Any]]]:
    """Every prediction the edge published, ``(seq, y_pred)`` by device, in order."""
    out: dict[str, list[tuple[int, Any]]] = {}
    for body in cap.json(topics.predictions()):
        out.setdefault(body["device"], []).extend(
            (p["seq"], p["y_pred"]) for p in body["predictions"]
        )
    return out


def predicted(cap: Any, topics: Any, devices: Any = None) -> int:
    """How many predictions the edge published, for ``devices`` (default: every one)."""
    got = predictions_by_device(cap, topics)
    return sum(len(v) for d, v in got.items() if devices is None or d in devices)
