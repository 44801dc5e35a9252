"""Drift detection on each device's errors: an abrupt change is seen soon, a steady
stream never."""

from __future__ import annotations

import json
import threading

import pytest
from prometheus_client import CollectorRegistry
from river import linear_model, preprocessing
from river.datasets import synth

from streampipe import codec
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.learn.spec import ModelSpec
from streampipe.metrics import StageCollector
from streampipe.readings import Batch, Reading
from streampipe.stage import EdgeStage
from streampipe.transport import Connection

N = 3000
CHANGE = 1500  # where the stream's concept changes (within a 10-reading sigmoid)
#: Readings after the change within which the detector must have fired.
BOUND = 150
LOGISTIC = "preprocessing.StandardScaler | linear_model.LogisticRegression"


def regression(seed: int, change: bool) -> list[tuple[dict, float]]:
    """Friedman's function, abruptly replaced by River's Planes2D, or Friedman throughout."""
    stream = synth.Friedman(seed=seed)
    if change:
        after = synth.Planes2D(seed=seed)
        stream = synth.ConceptDriftStream(stream, after, position=CHANGE, width=10, seed=seed)
    return [({f"x{k}": v for k, v in x.items()}, y) for x, y in stream.take(N)]


def classification(seed: int, change: bool) -> list[tuple[dict, float]]:
    """River's Sine concept 0, abruptly replaced by concept 1 (labels reversed), or not."""
    stream = synth.Sine(classification_function=0, seed=seed)
    if change:
        after = synth.Sine(classification_function=1, seed=seed)
        stream = synth.ConceptDriftStream(stream, after, position=CHANGE, width=10, seed=seed)
    return [({f"x{k}": v for k, v in x.items()}, float(y)) for x, y in stream.take(N)]


def readings(rows, device="d") -> list[Reading]:
    return [Reading(device, i, 1000.0 + i, x, y) for i, (x, y) in enumerate(rows)]


def feed(stage: EdgeStage, rows, size: int = 50) -> list:
    data = readings(rows)
    out = []
    for i in range(0, len(data), size):
        frame = codec.encode(Batch.from_readings(data[i : i + size]))
        out += stage.handle(stage.topics.readings("d"), frame)
    return out


def events(stage: EdgeStage, out) -> list[dict]:
    return [json.loads(m.payload) for m in out if m.topic == stage.topics.events(stage.stage_id)]


CASES = [
    ("adwin", None, regression),
    ("adwin", LOGISTIC, classification),
    ("page-hinkley", LOGISTIC, classification),
]


@pytest.mark.parametrize(("detector", "spec", "stream"), CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_abrupt_change_is_detected_within_a_bound_and_a_steady_stream_never(
    detector, spec, stream, seed
):
    def run(change: bool) -> list[dict]:
        stage = EdgeStage("e", ModelSpec.parse(spec) if spec else None, drift=detector)
        return events(stage, feed(stage, stream(seed, change)))

    assert run(change=False) == [], "a drift on a stream that never changed"
    found = run(change=True)
    assert found, "the change went unnoticed"
    assert all(e["kind"] == "drift" and e["detector"] == detector for e in found)
    first = found[0]
    assert CHANGE - 10 <= first["seq"] <= CHANGE + BOUND
    assert first["error_after"] > first["error_before"]
    assert first["ts"] == 1000.0 + first["seq"]  # the reading that made it fire
    assert (first["device"], first["role"], first["action"]) == ("d", "champion", "alert")
    assert first["error"] == ("0/1" if spec else "absolute")


def test_drifts_are_counted_by_model_in_prometheus_and_the_metrics_message():
    stage = EdgeStage("e", drift="adwin")
    found = events(stage, feed(stage, regression(0, change=True)))
    registry = CollectorRegistry()
    registry.register(StageCollector(stage.stats))
    model = {"model": "StandardScaler|LinearRegression"}
    assert registry.get_sample_value("streampipe_drifts_total", model) == len(found) >= 1
    message = json.loads(stage.metrics_message().payload)
    assert message["drifts"] == len(found)


def test_on_drift_reset_replaces_the_device_model_by_a_fresh_one():
    rows = regression(0, change=True)
    stage = EdgeStage("e", drift="adwin", on_drift="reset")
    out = feed(stage, rows, size=50)
    found = events(stage, out)
    assert found and all(e["action"] == "reset" for e in found)
    # The reset happens once the batch that revealed the drift is predicted: from the
    # next batch on, a model that never saw the readings before it predicts.
    after = (found[-1]["seq"] // 50 + 1) * 50
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    got = {
        p["seq"]: p["y_pred"]
        for m in out
        if "/predictions/" in m.topic
        for p in json.loads(m.payload)["predictions"]
    }
    for seq, (x, y) in enumerate(rows[after:], start=after):
        assert got[seq] == model.predict_one(x), f"seq {seq}"
        model.learn_one(x, y)
    assert got[after] == 0.0  # a fresh linear model's first prediction


def test_a_drift_event_reaches_mqtt(broker, topics, capture):
    cap = capture([topics.events(), topics.predictions()])

    def predicted() -> int:
        return sum(len(b["predictions"]) for b in cap.json(topics.predictions()))

    service = EdgeService(
        EdgeConfig(broker.url, "drifty", topic_root=topics.root, drift="adwin", metrics_port=None)
    ).start()
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    conn = Connection(broker.url, "drift-pub").connect()
    try:
        data = readings(regression(1, change=True))
        for i in range(0, len(data), 100):
            frame = codec.encode(Batch.from_readings(data[i : i + 100]))
            conn.publish(topics.readings("d"), frame).wait_for_publish(10)
        assert cap.wait(lambda: predicted() == N)
    finally:
        conn.close()
        service.stop()
        thread.join(30)
    (event,) = cap.json(topics.events("drifty"))
    assert event["kind"] == "drift" and event["stage"] == "drifty"
    assert CHANGE - 10 <= event["seq"] <= CHANGE + BOUND
