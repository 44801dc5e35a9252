"""The edge side of fleet learning, against a real Mosquitto: updates out (parameters,
never readings), the signed fleet model in, new devices starting from it exactly as
River would from that model, refusals as for deployed models, checkpoints, start-up
errors."""

from __future__ import annotations

import contextlib
import math
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from faults import friedman_rows, running
from replaying import predict_then_learn
from river import linear_model, preprocessing

from streampipe.cli import main
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.fleet.edge import FleetMember, own_scaler
from streampipe.fleet.params import extract, merge_scalers
from streampipe.fleet.update import CONTENT_TYPE, canonical_spec, decode_update
from streampipe.learn import DEFAULT_MODEL_SPEC
from streampipe.models.artifact import make_artifact
from streampipe.models.keys import SigningKey, init_keys, load_signing_key
from streampipe.publish import ReadingPublisher
from streampipe.readings import Reading
from streampipe.stage import EdgeStage
from streampipe.topics import Topics
from streampipe.transport import Connection

NAME = "power"
SPEC = canonical_spec(DEFAULT_MODEL_SPEC)


@pytest.fixture
def keys(tmp_path: Path):
    return init_keys(tmp_path / "keys")


@contextlib.contextmanager
def fleet_edge(broker, topics: Topics, keys, **kwargs: Any) -> Iterator[EdgeService]:
    config = EdgeConfig(
        broker.url,
        kwargs.pop("stage_id", "edge"),
        topic_root=topics.root,
        model_name=NAME,
        deploy_key=str(keys.public),
        fleet=NAME,
        metrics_interval=60,
        **kwargs,
    )
    service = EdgeService(config).start()
    with running(service):
        yield service


def publish_rows(broker, topics: Topics, device: str, rows, start: int = 0, ts0: float = 1e9):
    conn = Connection(broker.url, f"pub-{topics.root}-{device}").connect()
    try:
        pub = ReadingPublisher(conn, topics, batch_size=25)
        for i, (x, y) in enumerate(rows):
            pub.add(Reading(device, start + i, ts0 + 0.125 * (start + i), x, y, 1))
        assert pub.wait_acked(30)
    finally:
        conn.close()


def send_retained(broker, topic: str, payload: bytes) -> None:
    with Connection(broker.url, "fleet-model-publisher").connect() as conn:
        info = conn.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(10)
        assert info.is_published()


def predictions(cap, topics: Topics, device: str) -> list[dict]:
    return [p | {"fleet_version": b.get("fleet_version")}
            for b in cap.json(topics.predictions(device)) for p in b["predictions"]]  # fmt: skip


def fleet_model(seed: int = 99, n: int = 400):
    """A model of the fleet's spec that learned elsewhere (as an aggregate would have)."""
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    for x, y in friedman_rows(n, seed):
        model.learn_one(x, y)
    return model


def fleet_artifact(model, key, version: int = 3) -> bytes:
    return make_artifact(
        pickle.dumps(model), name=NAME, version=version, kind="regressor", key=key, spec=SPEC
    )


def numbers(obj: Any) -> list[float]:
    """Every number anywhere in a decoded msgpack value, keys included."""
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in numbers(k) + numbers(v)]
    if isinstance(obj, list):
        return [n for v in obj for n in numbers(v)]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [float(obj)]
    return []


def keys_of(obj: Any) -> set[str]:
    if isinstance(obj, dict):
        return {str(k) for k in obj} | {k for v in obj.values() for k in keys_of(v)}
    return set()


def test_an_edge_publishes_updates_of_parameters_only_within_the_interval(
    broker, topics, capture, keys
):
    rows = friedman_rows(60, seed=5)
    cap = capture([topics.fleet_updates(NAME), topics.predictions()])
    with fleet_edge(broker, topics, keys, fleet_interval=1.0) as edge:
        publish_rows(broker, topics, "d1", rows[:30])
        publish_rows(broker, topics, "d2", rows[30:])
        assert cap.wait(lambda: len(predictions(cap, topics, "+")) == 60)
        learned = time.monotonic()

        def latest():
            got = cap.on(topics.fleet_updates(NAME, "edge"))
            return (
                decode_update(got[-1].payload, fleet=NAME, spec=SPEC, stage="edge") if got else None
            )

        assert cap.wait(lambda: (u := latest()) is not None and u.readings == 60, timeout=10)
        assert time.monotonic() - learned <= 1.0 + 1.5
        update = latest()
        msg = cap.on(topics.fleet_updates(NAME, "edge"))[-1]
        assert msg.qos == 1 and msg.properties.ContentType == CONTENT_TYPE
        assert (update.devices, update.base, update.spec) == (2, 0, SPEC)
        # The two devices' models, merged: the scaler exactly, by counts.
        models = [edge.stage.learner.devices[d].model for d in ("d1", "d2")]
        assert update.params["scaler"] == merge_scalers([extract(m)["scaler"] for m in models])
        # Parameters and counts only: no reading's features, target, ts or seq.
        raw = msgpack.unpackb(msg.payload, raw=False)
        assert set(raw) == {"v", "fleet", "stage", "spec", "seq", "base", "readings",
                            "devices", "params", "ts"}  # fmt: skip
        assert keys_of(raw["params"]) <= {
            "scaler", "counts", "means", "vars", "weights", "intercept", "optimizer",
            "n_iterations", "state", *rows[0][0],
        }  # fmt: skip
        sent = set(numbers(raw))
        for i, (x, y) in enumerate(rows):
            assert not sent & {*x.values(), y, 1e9 + 0.125 * i}, f"reading {i} in an update"
        first_seq = update.seq
        # Learning more makes another update, with a higher seq; nothing new, none.
        publish_rows(broker, topics, "d1", friedman_rows(10, seed=6), start=30)
        assert cap.wait(lambda: latest().readings == 70, timeout=10)
        assert latest().seq > first_seq
        count = len(cap.on(topics.fleet_updates(NAME)))
        assert not cap.wait(lambda: len(cap.on(topics.fleet_updates(NAME))) > count, timeout=2.5)
        assert edge.registry.get_sample_value("streampipe_fleet_updates_sent_total") == count
        # Retained: an aggregator that starts later gets the latest update at once.
        late = capture([topics.fleet_updates(NAME)])
        assert late.wait(lambda: len(late.on(topics.fleet_updates(NAME))) == 1)
        kept = late.on(topics.fleet_updates(NAME))[0]
        assert kept.retain and kept.payload == cap.on(topics.fleet_updates(NAME))[-1].payload


def test_a_new_device_starts_from_the_signed_fleet_model_exactly_and_others_keep_theirs(
    broker, topics, capture, keys, tmp_path
):
    key = load_signing_key(keys.private)
    model = fleet_model()
    old_rows, new_rows = friedman_rows(200, seed=1), friedman_rows(150, seed=2)
    cap = capture([topics.predictions(), topics.metrics(), topics.fleet_updates(NAME)])
    state = str(tmp_path / "state")
    with fleet_edge(broker, topics, keys, state_dir=state) as edge:
        publish_rows(broker, topics, "old", old_rows[:100])
        assert cap.wait(lambda: len(predictions(cap, topics, "old")) == 100)
        send_retained(broker, topics.fleet_model(NAME), fleet_artifact(model, key))
        assert cap.wait(
            lambda: any(m.get("fleet", {}).get("version") == 3 for m in cap.json(topics.metrics()))
        )
        publish_rows(broker, topics, "old", old_rows[100:], start=100)
        publish_rows(broker, topics, "new", new_rows[:100])
        assert cap.wait(lambda: len(predictions(cap, topics, "old")) == 200)
        assert cap.wait(lambda: len(predictions(cap, topics, "new")) == 100)
        got = edge.stage.learner.fleet
        assert got.version == 3
        fleet_mae = edge.registry.get_sample_value(
            "streampipe_model_mae", {"model": "fleet", "window": "progressive"}
        )
        assert edge.registry.get_sample_value("streampipe_fleet_model_version") == 3
        assert edge.registry.get_sample_value("streampipe_fleet_models_received_total") == 1
    # The fleet model the edge got, unpickled: River's predict-then-learn from it.
    new = predictions(cap, topics, "new")
    assert {p["fleet_version"] for p in new} == {3}
    assert [p["y_pred"] for p in new] == predict_then_learn(new_rows[:100], pickle.loads(got.model))
    # The existing device is untouched: River from scratch over all its readings.
    old = predictions(cap, topics, "old")
    assert {p["fleet_version"] for p in old} == {None}
    assert [p["y_pred"] for p in old] == predict_then_learn(old_rows)
    # The fleet model's own error on what it scored (the readings after it came).
    scored = old_rows[100:] + new_rows[:100]
    expected = sum(abs(y - model.predict_one(x)) for x, y in scored) / len(scored)
    assert fleet_mae == pytest.approx(expected, rel=1e-9)

    # Updates count what the devices learned themselves, not the fleet's readings.
    def last():
        return decode_update(cap.on(topics.fleet_updates(NAME))[-1].payload, fleet=NAME)

    assert cap.wait(lambda: last().readings == 300, timeout=10)
    last = last()
    assert (last.readings, last.devices, last.base) == (300, 2, 3)
    assert last.params["scaler"]["counts"] == dict.fromkeys(new_rows[0][0], 300)

    # Restarted from its checkpoint, with the retained fleet model gone: the fleet model
    # and each device's fleet version survive, and a device new since starts from it.
    send_retained(broker, topics.fleet_model(NAME), b"")
    cap.messages.clear()
    third = friedman_rows(50, seed=3)
    with fleet_edge(broker, topics, keys, state_dir=state) as edge:
        assert edge.fleet.version == 3
        assert edge.stage.learner.devices["new"].fleet_version == 3
        publish_rows(broker, topics, "new", new_rows[100:], start=100)
        publish_rows(broker, topics, "third", third)
        assert cap.wait(lambda: len(predictions(cap, topics, "new")) == 50)
        assert cap.wait(lambda: len(predictions(cap, topics, "third")) == 50)
    assert [p["y_pred"] for p in predictions(cap, topics, "new")] == predict_then_learn(
        new_rows, pickle.loads(got.model)
    )[100:]
    third_preds = predictions(cap, topics, "third")
    assert {p["fleet_version"] for p in third_preds} == {3}
    assert [p["y_pred"] for p in third_preds] == predict_then_learn(third, pickle.loads(got.model))


def test_an_unsigned_or_foreign_fleet_model_is_refused_and_changes_nothing(
    broker, topics, capture, keys
):
    model = pickle.dumps(fleet_model())
    attempts = {
        "unsigned": fleet_artifact(fleet_model(), load_signing_key(keys.private))[:-66],
        "wrong_key": make_artifact(
            model, name=NAME, version=3, kind="regressor", key=SigningKey.generate()
        ),
    }
    rows = friedman_rows(40, seed=4)
    cap = capture([topics.deadletter(), topics.predictions()])
    with fleet_edge(broker, topics, keys) as edge:
        for payload in attempts.values():
            send_retained(broker, topics.fleet_model(NAME), payload)
        assert cap.wait(lambda: len(cap.json(topics.deadletter())) == 2)
        letters = cap.json(topics.deadletter())
        assert [d["reason"] for d in letters] == list(attempts)
        assert all(d["topic"] == topics.fleet_model(NAME) for d in letters)
        publish_rows(broker, topics, "d1", rows)
        assert cap.wait(lambda: len(predictions(cap, topics, "d1")) == 40)
        sample = edge.registry.get_sample_value
        for reason in attempts:
            assert sample("streampipe_fleet_models_refused_total", {"reason": reason}) == 1
            assert sample("streampipe_rejected_total", {"reason": reason}) == 1
        assert edge.fleet.version == 0 and edge.stage.learner.fleet is None
        assert sample("streampipe_model_mae", {"model": "fleet", "window": "rolling"}) is None
    got = predictions(cap, topics, "d1")
    assert {p["fleet_version"] for p in got} == {None}
    assert [p["y_pred"] for p in got] == predict_then_learn(rows)


def test_a_spec_that_cannot_be_federated_or_no_deploy_key_is_a_one_line_error(
    broker, keys, capsys, monkeypatch
):
    monkeypatch.delenv("STREAMPIPE_DEPLOY_KEY", raising=False)
    base = ["edge", "--broker", f"mqtt://127.0.0.1:{broker.port}", "--stage-id", "e1",
            "--metrics-port", "-1", "--fleet", NAME]  # fmt: skip
    assert (
        main([*base, "--deploy-key", str(keys.public), "--model", "tree.HoeffdingTreeRegressor"])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'HoeffdingTreeRegressor'" in err, err
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--deploy-key" in err, err


# -- without a broker ----------------------------------------------------------------


def learned_stage(rows) -> EdgeStage:
    from streampipe import codec
    from streampipe.readings import Batch

    stage = EdgeStage("edge-1")
    readings = [Reading("d1", i, 1.0 + i, x, y) for i, (x, y) in enumerate(rows)]
    stage.handle(stage.topics.readings("d1"), codec.encode(Batch.from_readings(readings)))
    return stage


def test_blend_mixes_the_fleet_model_into_existing_devices_keeping_their_scalers():
    key = SigningKey.generate()
    stage = learned_stage(friedman_rows(50, seed=8))
    member = FleetMember(stage, key.public, NAME, blend=0.25)
    own = extract(stage.learner.devices["d1"].model)
    fleet = fleet_model()
    assert member.handle(member.topic, fleet_artifact(fleet, key))[0].topic.endswith("edge-1")
    mixed = extract(stage.learner.devices["d1"].model)
    assert mixed["scaler"] == own["scaler"]
    f = extract(fleet)
    for name, w in mixed["weights"].items():
        assert w == pytest.approx(0.75 * own["weights"][name] + 0.25 * f["weights"][name])
    assert mixed["intercept"] == pytest.approx(0.75 * own["intercept"] + 0.25 * f["intercept"])


def test_an_older_or_colliding_fleet_version_is_refused_and_a_repeat_ignored():
    key = SigningKey.generate()
    stage = EdgeStage("edge-1")
    member = FleetMember(stage, key.public, NAME)
    art = fleet_artifact(fleet_model(), key, version=5)
    member.handle(member.topic, art)
    assert member.handle(member.topic, art) == []  # the same one again: nothing to do
    for version, reason in ((4, "downgrade"), (5, "version_collision")):
        out = member.handle(member.topic, fleet_artifact(fleet_model(seed=1), key, version))
        assert reason in out[0].payload.decode()
    other = make_artifact(
        pickle.dumps(fleet_model()), name="heat", version=9, kind="regressor", key=key
    )
    assert b"wrong_model_name" in member.handle(member.topic, other)[0].payload
    assert member.refused_by_reason() == {
        "downgrade": 1,
        "version_collision": 1,
        "wrong_model_name": 1,
    }
    assert stage.learner.fleet.version == 5


def test_own_scaler_takes_the_fleet_scaler_a_device_started_from_out_again():
    start = fleet_model()
    base = extract(start)["scaler"]
    rows = friedman_rows(30, seed=12)
    alone = preprocessing.StandardScaler()
    for x, y in rows:
        start.learn_one(x, y)
        alone.learn_one(x)
    back = own_scaler(extract(start)["scaler"], base)
    assert back["counts"] == dict(alone.counts)
    for f in alone.means:
        assert math.isclose(back["means"][f], alone.means[f], rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(back["vars"][f], alone.vars[f], rel_tol=1e-6, abs_tol=1e-9)
