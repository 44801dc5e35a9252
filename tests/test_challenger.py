"""Champion and challenger: both evaluated, one served, promotion by rule or command."""

from __future__ import annotations

import json
import threading

import pytest
from faults import friedman_rows
from prometheus_client import CollectorRegistry
from replaying import predict_then_learn
from river import dummy, linear_model, metrics, preprocessing, stats

from streampipe import codec
from streampipe.cli import main
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.learn.challenger import PromotionRule
from streampipe.learn.spec import ModelSpec
from streampipe.metrics import StageCollector
from streampipe.readings import Batch, Reading
from streampipe.stage import EdgeStage
from streampipe.state import CheckpointStore
from streampipe.transport import Connection

MEAN = "dummy.StatisticRegressor(stats.Mean())"
LINEAR = "preprocessing.StandardScaler | linear_model.LinearRegression"


def frames(data, size: int = 50, start: int = 0) -> list[bytes]:
    readings = [Reading("d", start + i, 1000.0 + i, x, y) for i, (x, y) in enumerate(data)]
    return [
        codec.encode(Batch.from_readings(readings[i : i + size]))
        for i in range(0, len(readings), size)
    ]


def run(stage: EdgeStage, data, size: int = 50) -> list:
    out = []
    for f in frames(data, size):
        out += stage.handle(stage.topics.readings("d"), f)
    return out


def of(stage: EdgeStage, out, kind: str) -> list[dict]:
    return [json.loads(m.payload) for m in out if f"/{kind}/" in m.topic]


def linear():
    return preprocessing.StandardScaler() | linear_model.LinearRegression()


def test_the_challenger_is_evaluated_but_only_the_champion_is_served():
    data = friedman_rows(600, seed=42)
    stage = EdgeStage("cc", ModelSpec.parse(LINEAR), challenger=ModelSpec.parse(MEAN))
    out = run(stage, data)
    served = [p["y_pred"] for b in of(stage, out, "predictions") for p in b["predictions"]]
    assert served == predict_then_learn(data, linear())
    assert {b["model"] for b in of(stage, out, "predictions")} == {
        "StandardScaler|LinearRegression"
    }
    mae = metrics.MAE()
    for (_, y), p in zip(data, predict_then_learn(data, dummy.StatisticRegressor(stats.Mean()))):
        mae.update(y, p)
    message = json.loads(stage.metrics_message().payload)
    assert message["challenger"]["model"] == "StatisticRegressor"
    assert abs(message["challenger"]["metrics"]["progressive"]["mae"] - mae.get()) < 1e-9
    registry = CollectorRegistry()
    registry.register(StageCollector(stage.stats))
    value = registry.get_sample_value(
        "streampipe_model_mae", {"model": "StatisticRegressor", "window": "progressive"}
    )
    assert value == message["challenger"]["metrics"]["progressive"]["mae"]
    assert registry.get_sample_value(
        "streampipe_model_info", {"model": "StandardScaler|LinearRegression", "version": "1"}
    )
    assert of(stage, out, "events") == [], "no rule, no promotion"


def test_a_challenger_better_by_the_rule_is_promoted_for_every_device():
    data = friedman_rows(1000, seed=42)
    rule = PromotionRule(better_by=20, after=200)
    stage = EdgeStage("cc", ModelSpec.parse(MEAN), challenger=ModelSpec.parse(LINEAR), promote=rule)
    out = run(stage, data)
    # The rule, applied offline after each batch of 50: the linear model must first
    # learn enough to beat the mean by 20 % over the last 200 readings.
    mean = predict_then_learn(data, dummy.StatisticRegressor(stats.Mean()))
    lin = predict_then_learn(data, linear())
    err = [(abs(y - a), abs(y - b)) for (_, y), a, b in zip(data, mean, lin)]
    when = next(
        end
        for end in range(200, 1001, 50)
        if sum(b for _, b in err[end - 200 : end]) < 0.8 * sum(a for a, _ in err[end - 200 : end])
    )
    assert when > 200, "the learning curve delays the promotion"
    (event,) = of(stage, out, "events")
    assert event["kind"] == "promotion" and event["reason"] == "rule"
    assert event["from"] == {"model": "StatisticRegressor", "version": 1}
    assert event["to"] == {"model": "StandardScaler|LinearRegression", "version": 2}
    assert event["readings"] == 200 and event["error"] == "mae"
    champion = sum(a for a, _ in err[when - 200 : when]) / 200
    assert event["champion_error"] == pytest.approx(champion, rel=1e-12)
    assert event["challenger_error"] < 0.8 * event["champion_error"]
    bodies = of(stage, out, "predictions")
    batches = when // 50
    assert [b["version"] for b in bodies] == [1] * batches + [2] * (20 - batches)
    assert {b["model"] for b in bodies[batches:]} == {"StandardScaler|LinearRegression"}
    # The new champion has learned every reading since the start: River's own predictions.
    assert [p["y_pred"] for b in bodies[batches:] for p in b["predictions"]] == lin[when:]
    registry = CollectorRegistry()
    registry.register(StageCollector(stage.stats))
    info = {"model": "StandardScaler|LinearRegression", "version": "2"}
    assert registry.get_sample_value("streampipe_model_info", info) == 1
    assert registry.get_sample_value("streampipe_promotions_total") == 1
    assert "challenger" not in json.loads(stage.metrics_message().payload)


def test_a_challenger_not_better_by_the_rule_stays_a_challenger():
    # Over the first 500 readings the linear model's learning curve is included, and it
    # still beats the mean: so does every later window.
    rule = PromotionRule(better_by=0, after=500)
    stage = EdgeStage("cc", ModelSpec.parse(LINEAR), challenger=ModelSpec.parse(MEAN), promote=rule)
    out = run(stage, friedman_rows(1000, seed=42))
    assert of(stage, out, "events") == []
    assert stage.stats.model_version == 1 and stage.challenger is not None
    champion, challenger = stage.duel.errors()
    assert challenger > champion


def test_checkpoints_carry_the_challenger_and_a_promotion(tmp_path):
    data = friedman_rows(400, seed=42)

    def new_stage() -> EdgeStage:
        return EdgeStage("cc", ModelSpec.parse(LINEAR), challenger=ModelSpec.parse(MEAN))

    store = CheckpointStore(tmp_path, "cc")
    first = new_stage()
    run(first, data[:200])
    meta, changed, full = first.snapshot()
    store.save(meta, changed, full=full)
    second = new_stage()
    second.restore(*store.load())
    assert second.challenger.metrics.as_dict() == first.challenger.metrics.as_dict()
    assert second.challenger.devices["d"].seq == 199
    promotion = second.promote("command")
    assert json.loads(promotion.payload)["reason"] == "command"
    meta, changed, full = second.snapshot()
    assert full, "after a promotion the checkpoint is written whole"
    store.save(meta, changed, full=full)
    third = new_stage()  # started with the same flags as before the promotion
    third.restore(*store.load())
    assert (third.stats.model_name, third.stats.model_version) == ("StatisticRegressor", 2)
    assert third.challenger is None and third.learner.spec.text == MEAN
    x = data[0][0]
    assert third.learner.devices["d"].model.predict_one(x) == (
        second.learner.devices["d"].model.predict_one(x)
    )


def test_streampipe_promote_promotes_over_mqtt(broker, topics, capture):
    cap = capture([topics.events(), topics.predictions(), topics.deadletter()])
    config = EdgeConfig(
        broker.url, "cc", topic_root=topics.root, model=LINEAR, challenger=MEAN, metrics_port=None
    )
    service = EdgeService(config).start()
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    conn = Connection(broker.url, "cc-pub").connect()
    data = friedman_rows(200, seed=42)

    def versions() -> list[int]:
        return [b["version"] for b in cap.json(topics.predictions())]

    def promote() -> int:  # after 100 readings, fewer than --promote-after: forced
        url = f"mqtt://127.0.0.1:{broker.port}"
        args = ["--stage-id", "cc", "--topic-root", topics.root, "--force"]
        return main(["promote", "--broker", url, *args])

    try:
        for f in frames(data[:100]):
            conn.publish(topics.readings("d"), f).wait_for_publish(10)
        assert cap.wait(lambda: len(versions()) == 2)
        assert promote() == 0
        assert cap.wait(lambda: cap.on(topics.events("cc")))
        for f in frames(data[100:], start=100):
            conn.publish(topics.readings("d"), f).wait_for_publish(10)
        assert cap.wait(lambda: len(versions()) == 4)
        assert promote() == 0  # nothing left to promote: a dead letter says so
        assert cap.wait(lambda: cap.on(topics.deadletter("cc")))
    finally:
        conn.close()
        service.stop()
        thread.join(30)
    (event,) = cap.json(topics.events("cc"))
    assert (event["kind"], event["reason"], event["forced"]) == ("promotion", "command", True)
    assert event["to"] == {"model": "StatisticRegressor", "version": 2}
    assert versions() == [1, 1, 2, 2]
    (dead,) = cap.json(topics.deadletter("cc"))
    assert dead["reason"] == "bad_command" and dead["detail"] == "no challenger to promote"
