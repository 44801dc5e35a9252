"""A real Prometheus, configured from brokers/, scrapes an edge stage that learns a replay.

The readings counter and the rolling MAE that Prometheus stores are the numbers the
stage publishes on ``ROOT/metrics/<stage_id>``: both are read once the stage is idle,
from a scrape and a metrics message made after it became idle.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from streampipe.broker import free_port
from streampipe.cli import main
from streampipe.edge import EdgeConfig, EdgeService

BROKERS = Path(__file__).resolve().parent.parent / "brokers"
PROMETHEUS = shutil.which("prometheus")

if PROMETHEUS is None and os.environ.get("CI"):
    raise RuntimeError("CI must run the Prometheus tests: scripts/install-deps.sh installs it")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="Prometheus is not installed (Debian: apt-get install prometheus; "
    "scripts/install-deps.sh does it, and CI runs it)",
)


def until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` (an HTTP query, a counter) until truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


class Prometheus:
    """``prometheus`` on a free loopback port with a config and data directory of its own."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.port = free_port()
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={path}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read()) if path.startswith("/api/") else r.status
        except (urllib.error.URLError, ConnectionError):
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited: {self.log.read_text()[-2000:]}")
            return None

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=promql)
        assert answer is None or answer["status"] == "success", answer
        return answer["data"]["result"] if answer else []

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def edge(broker, topics) -> Iterator[EdgeService]:
    service = EdgeService(
        EdgeConfig(
            broker.url, "prom-e2e", topic_root=topics.root, metrics_port=0, metrics_interval=0.3
        )
    ).start()
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    yield service
    service.stop()
    thread.join(30)


def shipped_config_for(target: str, stage: str) -> dict[str, Any]:
    """brokers/prometheus.yml with this test's edge as target and the shipped rules."""
    config = yaml.safe_load((BROKERS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="500ms", evaluation_interval="1s")
    config["rule_files"] = [str(BROKERS / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target], "labels": {"stage": stage}}]
    return config


def test_prometheus_scrapes_the_numbers_the_stage_publishes_on_mqtt(
    broker, topics, capture, edge, tmp_path
):
    rows = 400
    data = tmp_path / "plant.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["load", "temp", "power"])
        for i in range(rows):
            load, temp = (i % 17) / 17, 20 + 5 * math.sin(i / 11)
            w.writerow([load, temp, 100 * load + 2 * temp + math.cos(i)])
    cap = capture([topics.metrics(edge.config.stage_id)])
    prometheus = Prometheus(
        shipped_config_for(f"127.0.0.1:{edge.metrics_port}", "prom-e2e"), tmp_path
    )
    try:
        until(lambda: prometheus.get("/-/ready") == 200, 30, "Prometheus to be ready")
        assert (
            main(
                [
                    *("replay", str(data), "--target", "power", "--device-id", "plant-1"),
                    *("--broker", f"mqtt://127.0.0.1:{broker.port}", "--topic-root", topics.root),
                    *("--batch", "20"),
                ]
            )
            == 0
        )
        until(
            lambda: edge.stats.predictions == rows and edge.inbox.qsize() == 0,
            30,
            "the stage to predict every reading",
        )
        idle = time.time()

        def scraped_after_idle() -> list[dict[str, Any]]:
            got = prometheus.query('timestamp(streampipe_model_mae{window="rolling"})')
            return [s for s in got if float(s["value"][1]) > idle]

        until(scraped_after_idle, 30, "a scrape after the stage became idle")
        (readings,) = prometheus.query("streampipe_readings_received_total")
        (mae,) = prometheus.query('streampipe_model_mae{window="rolling"}')
        (up,) = prometheus.query('up{job="streampipe-edge"}')

        def published_after_idle() -> list[dict[str, Any]]:
            return [m for m in cap.json(topics.metrics()) if m["ts"] > idle]

        message = until(published_after_idle, 30, "a metrics message after idle")[-1]
        rules = prometheus.get("/api/v1/rules")["data"]["groups"]
    finally:
        prometheus.stop()

    assert up["value"][1] == "1" and up["metric"]["stage"] == "prom-e2e"
    assert float(readings["value"][1]) == rows == message["readings"]
    assert mae["metric"]["model"] == message["model"]
    assert message["metrics"]["rolling"]["mae"] > 0
    assert float(mae["value"][1]) == message["metrics"]["rolling"]["mae"]
    loaded = {rule["name"] for group in rules for rule in group["rules"]}
    shipped = yaml.safe_load((BROKERS / "alerts.yml").read_text())
    assert loaded == {r["alert"] for g in shipped["groups"] for r in g["rules"]}
