"""Prediction latency is the edge's own time; how old the readings are is another metric.

Replaying history stamps readings with their own, old, timestamps: the latency
histogram must still show the seconds the edge took, and the age histogram the years.
"""

from __future__ import annotations

import csv
import threading
import time

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.utils import floatToGoString

from streampipe.cli import main
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.metrics import AGE_BUCKETS, LATENCY_BUCKETS

YEAR = 365 * 86400.0
LATENCY = "streampipe_prediction_latency_seconds"
AGE = "streampipe_reading_age_seconds"


@pytest.fixture
def edge(broker, topics):
    registry = CollectorRegistry()
    service = EdgeService(
        EdgeConfig(broker.url, "history", topic_root=topics.root), registry=registry
    ).start()
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    yield service
    service.stop()
    thread.join(30)
    assert not thread.is_alive()


def test_replayed_history_has_ages_of_years_and_latencies_of_seconds(
    broker, topics, capture, edge, tmp_path
):
    rows = 2000
    start = time.time() - 2 * YEAR  # one reading a second, two years ago
    data = tmp_path / "history.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["time", "load", "power"])
        for i in range(rows):
            w.writerow([start + i, i % 17, 3 * (i % 17) + 100])
    cap = capture([topics.predictions()])
    replay = [
        *("replay", str(data), "--time-column", "time", "--target", "power"),
        *("--device-id", "plant-1", "--batch", "20"),
        *("--broker", f"mqtt://127.0.0.1:{broker.port}", "--topic-root", topics.root),
    ]
    assert main(replay) == 0

    def predicted() -> int:
        return sum(len(b["predictions"]) for b in cap.json(topics.predictions()))

    # Observed before each prediction is published: all are in once all arrived.
    assert cap.wait(lambda: predicted() == rows, timeout=60), f"{predicted()} of {rows}"
    registry = edge.registry

    def histogram(name: str, bounds: tuple[float, ...]) -> tuple[dict[float, float], float]:
        buckets = {
            b: registry.get_sample_value(f"{name}_bucket", {"le": floatToGoString(b)})
            for b in bounds
        }
        buckets[float("inf")] = registry.get_sample_value(f"{name}_bucket", {"le": "+Inf"})
        assert registry.get_sample_value(f"{name}_count") == rows
        return buckets, registry.get_sample_value(f"{name}_sum") / rows

    latency, mean_latency = histogram(LATENCY, LATENCY_BUCKETS)
    assert latency[2.5] == rows, latency  # every reading within seconds, none at +Inf
    assert mean_latency < 1.0

    age, mean_age = histogram(AGE, AGE_BUCKETS)
    assert age[YEAR] == 0 and age[float("inf")] == rows, age  # older than a year, all
    assert 2 * YEAR - rows <= mean_age <= 2 * YEAR + 600  # ~2 years (and the test's time)
