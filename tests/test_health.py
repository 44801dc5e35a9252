"""``/healthz`` beside ``/metrics``: 200 while the stage runs connected, 503 otherwise."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from streampipe.broker import PrivateMosquitto
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.transport import Connection


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get_once_served(port: int, timeout: float = 5.0) -> int:
    """/healthz's status once a connection slot is free: a slot is given back as its
    handler's thread ends, just after the connection is closed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return get(port, "/healthz")[0]
        except ConnectionError:
            assert time.monotonic() < deadline, "no connection slot came free"
            time.sleep(0.05)  # polling until a bounded deadline


def wait_status(port: int, code: int, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, body = get(port, "/healthz")
        if status == code or time.monotonic() > deadline:
            assert status == code, body
            return json.loads(body)
        time.sleep(0.1)  # polling an HTTP endpoint until a bounded deadline


def test_healthz_follows_the_broker_connection(tmp_path):
    with PrivateMosquitto(workdir=tmp_path) as broker:
        service = EdgeService(EdgeConfig(broker.url, "health", metrics_port=0)).start()
        thread = threading.Thread(target=service.run, daemon=True)
        thread.start()
        try:
            port = service.metrics_port
            assert port
            body = wait_status(port, 200)
            assert body == {
                "status": "ok", "connected": True, "running": True, "progressing": True
            }  # fmt: skip
            status, metrics = get(port, "/metrics")
            names = {f.name for f in text_string_to_metric_families(metrics.decode())}
            assert status == 200 and "streampipe_readings_received" in names
            assert get(port, "/nope")[0] == 404

            broker.stop()
            assert wait_status(port, 503)["connected"] is False
            broker.start()
            assert wait_status(port, 200)["connected"] is True
        finally:
            service.stop()
            thread.join(30)
    assert not thread.is_alive()


def test_healthz_says_unavailable_while_the_worker_is_stuck(tmp_path):
    """A worker that finishes nothing while messages wait is stuck, not behind: 503
    until it moves again."""
    with PrivateMosquitto(workdir=tmp_path) as broker:
        config = EdgeConfig(broker.url, "stuck", metrics_port=0, stall_after=0.5)
        service = EdgeService(config).start()
        entered, release = threading.Event(), threading.Event()
        handle = service.stage.handle_message

        def stuck(topic, payload, token, **kwargs):
            entered.set()
            release.wait(30)
            return handle(topic, payload, token, **kwargs)

        service.stage.handle_message = stuck
        thread = threading.Thread(target=service.run, daemon=True)
        thread.start()
        try:
            port = service.metrics_port
            wait_status(port, 200)
            with Connection(broker.url, "stuck-sender").connect() as sender:
                for _ in range(2):  # one to be stuck on, one left waiting behind it
                    sender.publish(service.topics.readings("d1"), b"x", qos=1).wait_for_publish(5)
            assert entered.wait(10)
            body = wait_status(port, 503)
            assert body["progressing"] is False and body["connected"] is True
            release.set()
            assert wait_status(port, 200)["progressing"] is True
        finally:
            release.set()
            service.stop()
            thread.join(30)
    assert not thread.is_alive()


def test_slow_clients_hold_at_most_the_connection_cap_and_only_for_the_timeout():
    """Issue 18 §9: half-sent requests (slowloris) must not take every file descriptor
    the edge has: the server serves MAX_CONNECTIONS at once, closes any further one at
    once, and closes the held ones after REQUEST_TIMEOUT; then /healthz answers again."""
    import selectors
    import socket

    from prometheus_client import CollectorRegistry

    from streampipe.http import MAX_CONNECTIONS, REQUEST_TIMEOUT, Health, MetricsServer

    registry = CollectorRegistry()
    server = MetricsServer("127.0.0.1", 0, registry, lambda: Health(True, True))
    clients: list[socket.socket] = []
    selector = selectors.DefaultSelector()
    start = time.monotonic()  # before the first connection, so before any timer starts
    try:
        for _ in range(MAX_CONNECTIONS + 60):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and no more
            s.setblocking(False)
            selector.register(s, selectors.EVENT_READ)
            clients.append(s)

        def closed_within(seconds: float, count: int) -> int:
            """Wait until ``count`` clients saw the server close; how many did."""
            deadline = time.monotonic() + seconds
            while selector.get_map() and len(clients) - len(selector.get_map()) < count:
                for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                    try:
                        if key.fileobj.recv(4096):  # type: ignore[union-attr]
                            continue
                    except (ConnectionResetError, BlockingIOError):
                        pass
                    selector.unregister(key.fileobj)
                if time.monotonic() >= deadline:
                    break
            return len(clients) - len(selector.get_map())

        # Beyond the cap, connections are closed at once, well before the timeout.
        assert closed_within(REQUEST_TIMEOUT / 2, 60) == 60
        assert time.monotonic() - start < REQUEST_TIMEOUT
        refused = registry.get_sample_value(
            "streampipe_http_connections_refused_total", {"reason": "too_many_connections"}
        )
        assert refused == 60
        # The ones served wait at most the timeout for the rest of their request.
        assert closed_within(REQUEST_TIMEOUT + 5, len(clients)) == len(clients)
        assert time.monotonic() - start >= REQUEST_TIMEOUT
        assert get_once_served(server.port) == 200
    finally:
        for s in clients:
            s.close()
        selector.close()
        server.close()


def test_the_http_bounds_are_the_edge_flags(tmp_path):
    """--metrics-max-connections and --metrics-timeout reach the edge's HTTP server."""
    import socket

    from streampipe.cli import build_parser

    args = build_parser().parse_args(
        ["edge", "--stage-id", "s", "--metrics-max-connections", "1", "--metrics-timeout", "0.5"]
    )
    assert (args.metrics_max_connections, args.metrics_timeout) == (1, 0.5)
    with PrivateMosquitto(workdir=tmp_path) as broker:
        config = EdgeConfig(
            broker.url, "bounds", metrics_port=0, metrics_max_connections=1, metrics_timeout=0.5
        )
        service = EdgeService(config).start()
        try:
            held = socket.create_connection(("127.0.0.1", service.metrics_port), timeout=5)
            held.sendall(b"GET /healthz HTTP/1.1\r\n")  # half a request
            with socket.create_connection(("127.0.0.1", service.metrics_port), timeout=5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
                with contextlib.suppress(ConnectionResetError):
                    assert s.recv(100) == b""  # the one slot is taken: closed unserved
            start = time.monotonic()
            with contextlib.suppress(ConnectionResetError):
                assert held.recv(100) == b""  # closed once its 0.5 s are up
            assert time.monotonic() - start < 3
            held.close()
            assert get_once_served(service.metrics_port) == 200
        finally:
            service.stop()
            service.run()
