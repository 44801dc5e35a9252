"""Anomaly detectors: River's scores over MQTT, their ROC AUC, and anomaly events."""

from __future__ import annotations

import json
import random

import pytest
from replaying import replay_through_edge, write_csv
from river import anomaly, metrics, preprocessing
from river.datasets import synth

from streampipe import codec
from streampipe.learn.spec import ModelSpec
from streampipe.readings import Batch, Reading
from streampipe.stage import EdgeStage

HST = "preprocessing.MinMaxScaler | anomaly.HalfSpaceTrees(seed=42)"


def labelled(n: int = 2000, seed: int = 3) -> list[tuple[dict, bool]]:
    """River's Friedman features with 3 % anomalies injected: three features far out of
    their usual [0, 1]; the label says which readings they are."""
    rng = random.Random(seed)
    rows = []
    for x, _ in synth.Friedman(seed=seed).take(n):
        x = {f"x{k}": v for k, v in x.items()}
        label = rng.random() < 0.03
        if label:
            for k in rng.sample(sorted(x), 3):
                x[k] = rng.uniform(1.5, 3.0)
        rows.append((x, label))
    return rows


def river_offline(model, rows):
    """River's order for anomaly detectors: score, then learn (without the label)."""
    scores = []
    for x, _ in rows:
        scores.append(model.score_one(x))
        model.learn_one(x)
    return scores


def rocauc(labels, scores) -> float:
    m = metrics.ROCAUC()
    for y, s in zip(labels, scores):
        m.update(y, s)
    return m.get()


def test_scores_over_mqtt_give_river_offline_rocauc_and_events(broker, topics, capture, tmp_path):
    rows = labelled()
    write_csv(tmp_path / "labelled.csv", rows, target="anomaly")
    offline = river_offline(preprocessing.MinMaxScaler() | anomaly.HalfSpaceTrees(seed=42), rows)
    labels = [y for _, y in rows]
    expected_auc = rocauc(labels, offline)
    got = replay_through_edge(
        broker,
        topics,
        capture,
        tmp_path / "labelled.csv",
        device="plant",
        stage_id="anomalies",
        target="anomaly",
        edge_args=("--model", HST, "--anomaly-threshold", "0.9"),
    )
    published = [got.predictions[seq]["y_pred"] for seq in range(len(rows))]
    assert published == offline  # River's scores, bit for bit
    assert [got.predictions[seq]["y_true"] for seq in range(len(rows))] == labels
    assert rocauc(labels, published) == expected_auc > 0.8
    assert got.metrics["metrics"]["progressive"] == {"rocauc": expected_auc}
    flagged = [seq for seq, s in enumerate(offline) if s >= 0.9]
    assert flagged, "the threshold flags some readings"
    assert [e["seq"] for e in got.events] == flagged
    first = got.events[0]
    assert first["kind"] == "anomaly" and first["device"] == "plant"
    assert first["score"] == offline[first["seq"]] and first["threshold"] == 0.9
    assert first["ts"] == got.predictions[first["seq"]]["ts"]
    assert got.metrics["anomalies"] == len(flagged)


def test_a_quantile_filter_decides_which_readings_are_anomalies():
    spec = (
        "preprocessing.MinMaxScaler | anomaly.QuantileFilter(anomaly.HalfSpaceTrees(seed=42), "
        "q=0.97)"
    )
    rows = labelled(800)
    stage = EdgeStage("a", ModelSpec.parse(spec))
    readings = [Reading("d", i, float(i), x, float(y)) for i, (x, y) in enumerate(rows)]
    out = []
    for i in range(0, len(readings), 40):
        frame = codec.encode(Batch.from_readings(readings[i : i + 40]))
        out += stage.handle(stage.topics.readings("d"), frame)
    model = ModelSpec.parse(spec).build()
    verdicts = []
    for seq, (x, _) in enumerate(rows):
        score = model.score_one(x)
        threshold = model["QuantileFilter"].quantile.get()
        if model["QuantileFilter"].classify(score):
            verdicts.append((seq, score, threshold))
        model.learn_one(x)
    events = [json.loads(m.payload) for m in out if m.topic == stage.topics.events("a")]
    assert [(e["seq"], e["score"], e["threshold"]) for e in events] == verdicts
    assert len(verdicts) > 10


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        (HST, {"drift": "adwin"}, "anomaly detectors have none"),
        (HST, {"challenger": ModelSpec.parse(HST)}, "judged by its errors"),
        ("linear_model.LinearRegression", {"anomaly_threshold": 0.9}, "anomaly detectors"),
        (
            "anomaly.ThresholdFilter(anomaly.HalfSpaceTrees(), threshold=0.8)",
            {"anomaly_threshold": 0.9},
            "sets its own threshold",
        ),
        ("anomaly.GaussianScorer", {}, "supervised anomaly detector"),
    ],
)
def test_settings_that_cannot_work_are_refused_at_start(spec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        EdgeStage("a", ModelSpec.parse(spec), **kwargs)


def test_an_anomaly_label_is_not_learned():
    """The same readings with and without labels are all learned, into the same model."""
    rows = labelled(300)
    scores = []
    for with_labels in (True, False):
        stage = EdgeStage("a", ModelSpec.parse(HST))
        readings = [
            Reading("d", i, float(i), x, float(y) if with_labels else None)
            for i, (x, y) in enumerate(rows)
        ]
        stage.handle(stage.topics.readings("d"), codec.encode(Batch.from_readings(readings)))
        assert stage.learner.devices["d"].learned == len(rows)
        scores.append(stage.learner.devices["d"].model.score_one(rows[0][0]))
    assert scores[0] == scores[1]
