"""Classifiers: the predicted class and its probability, River's own, and their metrics."""

from __future__ import annotations

import json
import logging
import re

import pytest
from prometheus_client import CollectorRegistry
from replaying import replay_through_edge, write_csv
from river import datasets, linear_model, metrics, preprocessing, tree

from streampipe import codec
from streampipe.learn import DEFAULT_MODEL_SPEC
from streampipe.learn.spec import ModelSpec
from streampipe.metrics import StageCollector
from streampipe.readings import Batch, Reading
from streampipe.stage import EdgeStage

LOGISTIC = "preprocessing.StandardScaler | linear_model.LogisticRegression"


def river_offline(rows):
    """River's predict-then-learn, with the class and probability River's predict_one picks."""
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    out = []
    for x, y in rows:
        proba = model.predict_proba_one(x)
        y_pred = model.predict_one(x)
        out.append((y_pred, proba[y_pred], proba.get(True, 0.0)))
        model.learn_one(x, y)
    return out


def river_scores(rows, offline):
    ms = {"accuracy": metrics.Accuracy(), "f1": metrics.F1(), "rocauc": metrics.ROCAUC()}
    for (_, y), (y_pred, _, p_true) in zip(rows, offline):
        ms["accuracy"].update(y, y_pred)
        ms["f1"].update(y, y_pred)
        ms["rocauc"].update(y, p_true)
    return {k: m.get() for k, m in ms.items()}


def frames(device, rows, size):
    readings = [Reading(device, i, float(i), x, float(y)) for i, (x, y) in enumerate(rows)]
    return [
        codec.encode(Batch.from_readings(readings[i : i + size]))
        for i in range(0, len(readings), size)
    ]


def bodies(out, kind):
    return [json.loads(m.payload) for m in out if f"/{kind}/" in m.topic]


def test_phishing_predictions_over_mqtt_equal_river_offline(broker, topics, capture, tmp_path):
    rows = list(datasets.Phishing())
    write_csv(tmp_path / "phishing.csv", rows, target="is_phishing")
    offline = river_offline(rows)
    got = replay_through_edge(
        broker,
        topics,
        capture,
        tmp_path / "phishing.csv",
        device="phishing",
        stage_id="clf",
        target="is_phishing",
        edge_args=("--model", LOGISTIC, "--metrics-interval", "0.5"),
    )
    assert {b["model"] for b in got.bodies} == {"StandardScaler|LogisticRegression"}
    for seq, ((_, y), (y_pred, proba, _)) in enumerate(zip(rows, offline)):
        p = got.predictions[seq]
        # The class is River's (a bool, not 1.0), its probability bit for bit.
        assert (p["y_pred"], p["proba"], p["y_true"]) == (y_pred, proba, y), f"seq {seq}"
    expected = river_scores(rows, offline)
    final = got.metrics["metrics"]
    assert final["count"] == len(rows)
    assert final["progressive"] == expected
    assert 0.85 < final["progressive"]["accuracy"] < 1, "a real classifier, not a constant"


def test_scores_and_prometheus_carry_accuracy_f1_and_rocauc():
    rows = list(datasets.Phishing())[:600]
    stage = EdgeStage("c", ModelSpec.parse(LOGISTIC), window=100)
    for f in frames("d", rows, 50):
        stage.handle(stage.topics.readings("d"), f)
    offline = river_offline(rows)
    expected = river_scores(rows, offline)
    rolling = river_scores(rows[-100:], offline[-100:])
    message = json.loads(stage.metrics_message().payload)["metrics"]
    assert message["progressive"] == expected  # counted as River counts: exactly
    assert message["rolling"] == rolling
    registry = CollectorRegistry()
    registry.register(StageCollector(stage.stats))
    for name, value in expected.items():
        labels = {"model": "StandardScaler|LogisticRegression", "window": "progressive"}
        assert registry.get_sample_value(f"streampipe_model_{name}", labels) == value


def test_targets_that_are_not_labels_are_refused_and_never_learned(caplog):
    caplog.set_level(logging.INFO, logger="streampipe.stage")
    stage = EdgeStage("c", ModelSpec.parse("linear_model.LogisticRegression"))
    data = [Reading("d", i, float(i), {"a": float(i)}, y) for i, y in enumerate([1.0, 2.0, 0.5])]
    out = stage.handle(stage.topics.readings("d"), codec.encode(Batch.from_readings(data)))
    # Some good labels among bad ones: bad data, not the wrong kind of model.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    (pred,) = bodies(out, "predictions")
    assert [p["seq"] for p in pred["predictions"]] == [0]
    (dead,) = bodies(out, "deadletter")
    assert [(r["seq"], r["reason"]) for r in dead["readings"]] == [
        (1, "invalid_label"),
        (2, "invalid_label"),
    ]
    assert stage.learner.devices["d"].learned == 1


def test_a_multiclass_model_learns_whole_numbers_as_int_labels_and_reports_macro_f1():
    rows = [({"a": float(i % 3), "b": float(i % 5)}, i % 3) for i in range(300)]
    stage = EdgeStage("m", ModelSpec.parse("tree.HoeffdingTreeClassifier(grace_period=20)"))
    out = []
    for f in frames("d", rows, 30):
        out += stage.handle(stage.topics.readings("d"), f)
    got = [p for b in bodies(out, "predictions") for p in b["predictions"]]
    model, macro = tree.HoeffdingTreeClassifier(grace_period=20), metrics.MacroF1()
    for (x, y), p in zip(rows, got, strict=True):
        proba = model.predict_proba_one(x)
        y_pred = model.predict_one(x)
        assert (p["y_pred"], p["proba"], p["y_true"]) == (y_pred, proba.get(y_pred), y)
        if y_pred is not None:
            macro.update(y, y_pred)
        model.learn_one(x, y)
    assert all(type(p["y_true"]) is int for p in got)
    m = stage.stats.snapshot()["metrics"]
    assert set(m["progressive"]) == {"accuracy", "macro_f1"}
    assert m["progressive"]["macro_f1"] == macro.get() > 0.8


def test_minibatch_mode_classifies_with_rivers_many_api():
    pd = pytest.importorskip("pandas")
    rows = list(datasets.Phishing())[:200]
    stage = EdgeStage("m", ModelSpec.parse(LOGISTIC), mode="minibatch")
    readings = [
        Reading("d", i, float(i), x, None if i % 7 == 0 else float(y))
        for i, (x, y) in enumerate(rows)
    ]
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    for i in range(0, len(readings), 50):
        part = readings[i : i + 50]
        out = stage.handle(stage.topics.readings("d"), codec.encode(Batch.from_readings(part)))
        got = [(p["y_pred"], p["proba"]) for p in bodies(out, "predictions")[0]["predictions"]]
        X = pd.DataFrame([r.x for r in part])
        P = model.predict_proba_many(X)
        assert got == list(zip(model.predict_many(X).tolist(), P.max(axis="columns").tolist()))
        known = [r.y is not None for r in part]
        labels = pd.Series([r.y == 1.0 for r in part], index=X.index)[known]
        model.learn_many(X[known], labels)


def test_a_classifier_given_a_numeric_target_says_so_once_and_reports_no_score(caplog):
    """The simulated fleet's power (watts) to a LogisticRegression: one warning naming
    the mistake, dead letters logged by summary, and no accuracy rather than 0.0."""
    caplog.set_level(logging.INFO, logger="streampipe.stage")
    now = [0.0]
    stage = EdgeStage(
        "c", ModelSpec.parse("linear_model.LogisticRegression()"), timer=lambda: now[0]
    )
    topic = stage.topics.readings("plant-1")
    for i in range(50):  # 50 messages in 20 s, 5 readings each
        now[0] = i * 0.4
        data = [Reading("plant-1", 5 * i + j, 1e9 + i, {"load": j}, 512.3 + j) for j in range(5)]
        out = stage.handle(topic, codec.encode(Batch.from_readings(data)))
        assert [d["rejected_readings"] for d in bodies(out, "deadletter")] == [5]
    stage.dead_letters.flush(force=True)  # what a stopping edge does
    assert stage.stats.rejected == {"invalid_label": 250} and stage.stats.predictions == 0

    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "LogisticRegression is a classifier" in warning and "like 512.3" in warning
    assert f'--model "{DEFAULT_MODEL_SPEC}"' in warning
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 3, lines  # the first dead letter, then at most one line per 10 s
    assert lines[0].startswith(f"dead letter from {topic}: invalid_label")
    summed = [re.search(r"refusing ([\d,]+) readings as invalid_label", line) for line in lines[1:]]
    assert sum(int(m[1]) for m in summed) == 245  # all but the first letter's 5
    assert "in the last 10 s" in lines[1]

    message = json.loads(stage.metrics_message().payload)["metrics"]
    assert message["count"] == 0
    assert (
        message["progressive"] == message["rolling"] == dict.fromkeys(["accuracy", "f1", "rocauc"])
    )
    registry = CollectorRegistry()
    registry.register(StageCollector(stage.stats))
    assert registry.get_sample_value("streampipe_model_scored") == 0.0
    for window in ("progressive", "rolling"):
        labels = {"model": "LogisticRegression", "window": window}
        assert registry.get_sample_value("streampipe_model_accuracy", labels) is None


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("tree.HoeffdingTreeClassifier()", "class labels (whole numbers); target values like 0.5"),
        ("anomaly.HalfSpaceTrees()", "anomaly detector, whose target is an evaluation label"),
    ],
)
def test_each_model_that_learns_labels_says_what_its_targets_must_be(caplog, spec, says):
    caplog.set_level(logging.WARNING, logger="streampipe.stage")
    stage = EdgeStage("c", ModelSpec.parse(spec))
    topic = stage.topics.readings("d")
    for i in range(3):
        data = [Reading("d", 2 * i + j, 1e9, {"a": 1.0}, 0.5 + j) for j in range(2)]
        stage.handle(topic, codec.encode(Batch.from_readings(data)))
    (warning,) = [r.getMessage() for r in caplog.records]
    assert says in warning
