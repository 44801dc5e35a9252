"""``/healthz`` beside ``/metrics``: 200 while the stage runs connected, 503 otherwise."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from streampipe.broker import PrivateMosquitto
from streampipe.edge import EdgeConfig, EdgeService


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


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
            assert body == {"status": "ok", "connected": True, "running": True}
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
