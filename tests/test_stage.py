"""EdgeStage without a broker: bytes in, messages out."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from river import linear_model, preprocessing

from streampipe import codec
from streampipe.learn.spec import ModelSpec
from streampipe.metrics import StageCollector
from streampipe.readings import Batch, Reading
from streampipe.stage import EdgeStage
from streampipe.state import CheckpointStore


@pytest.fixture
def stage() -> EdgeStage:
    return EdgeStage("edge-1", clock=lambda: 1000.0)


def frame(readings: list[Reading]) -> bytes:
    return codec.encode(Batch.from_readings(readings))


def readings(device: str, n: int, start: int = 0, epoch: int = 0) -> list[Reading]:
    return [
        Reading(
            device, s, float(s), {"a": float(s % 7), "b": float(s % 3)}, 2.0 * (s % 7) + 1.0, epoch
        )
        for s in range(start, start + n)
    ]


def bodies(out, kind: str) -> list[dict]:
    return [json.loads(m.payload) for m in out if f"/{kind}/" in m.topic]


def test_predictions_equal_river_predict_then_learn(stage):
    data = readings("d1", 50)
    out = stage.handle(stage.topics.readings("d1"), frame(data[:20]))
    out += stage.handle(stage.topics.readings("d1"), frame(data[20:]))
    got = [p for b in bodies(out, "predictions") for p in b["predictions"]]
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    for r, p in zip(data, got, strict=True):
        assert p["seq"] == r.seq and p["y_true"] == r.y
        assert p["y_pred"] == model.predict_one(r.x)
        model.learn_one(r.x, r.y)


def test_each_device_has_its_own_model(stage):
    stage.handle(stage.topics.readings("d1"), frame(readings("d1", 30)))
    out = stage.handle(stage.topics.readings("d2"), frame(readings("d2", 1)))
    (body,) = bodies(out, "predictions")
    assert body["device"] == "d2" and body["predictions"][0]["y_pred"] == 0.0
    assert stage.stats.devices == 2


def test_redelivered_batch_is_not_learned_twice(stage):
    data = frame(readings("d1", 10))
    first = stage.handle(stage.topics.readings("d1"), data)
    state_after_first = stage.learner.devices["d1"].model.predict_one({"a": 1.0, "b": 1.0})
    again = stage.handle(stage.topics.readings("d1"), data)
    assert bodies(again, "predictions") == []
    (dead,) = bodies(again, "deadletter")
    assert dead["reason"] == "duplicate" and dead["rejected_readings"] == 10
    assert stage.learner.devices["d1"].model.predict_one({"a": 1.0, "b": 1.0}) == state_after_first
    assert len(bodies(first, "predictions")[0]["predictions"]) == 10
    assert stage.stats.rejected == {"duplicate": 10}


def test_new_epoch_is_accepted_older_epoch_is_stale(stage):
    topic = stage.topics.readings("d1")
    stage.handle(topic, frame(readings("d1", 5, epoch=1)))
    rebooted = stage.handle(topic, frame(readings("d1", 3, epoch=2)))
    assert [p["seq"] for p in bodies(rebooted, "predictions")[0]["predictions"]] == [0, 1, 2]
    stale = stage.handle(topic, frame(readings("d1", 3, start=10, epoch=1)))
    assert bodies(stale, "deadletter")[0]["reason"] == "stale_epoch"


def test_gap_is_counted(stage):
    topic = stage.topics.readings("d1")
    stage.handle(topic, frame(readings("d1", 5)))
    stage.handle(topic, frame(readings("d1", 5, start=12)))
    assert stage.stats.gaps == 7


def test_a_device_first_seen_mid_stream_starts_its_watermark_without_a_gap(stage):
    """An edge that joins a running fleet (or lost its checkpoint) never saw the readings
    sent before it existed: they were not lost, so they are no gap. Gaps after that are."""
    topic = stage.topics.readings("d1")
    out = stage.handle(topic, frame(readings("d1", 4, start=1196, epoch=3)))
    (body,) = bodies(out, "predictions")
    assert [p["seq"] for p in body["predictions"]] == [1196, 1197, 1198, 1199]
    assert stage.stats.gaps == 0 and stage.stats.joined_midstream == 1
    stage.handle(topic, frame(readings("d1", 2, start=1205, epoch=3)))  # 1200-1204 missing
    assert stage.stats.gaps == 5
    stage.handle(topic, frame(readings("d1", 2, start=0, epoch=4)))  # a reboot: from seq 0
    assert stage.stats.gaps == 5
    stage.handle(topic, frame(readings("d1", 2, start=3, epoch=5)))  # a reboot, 0-2 missing
    assert stage.stats.gaps == 8
    stage.handle(stage.topics.readings("d2"), frame(readings("d2", 2)))  # seen from its start
    assert stage.stats.joined_midstream == 1 and stage.stats.rejected == {}
    registry = CollectorRegistry()
    registry.register(StageCollector(stage.stats))
    assert registry.get_sample_value("streampipe_devices_joined_midstream_total") == 1.0
    assert registry.get_sample_value("streampipe_sequence_gaps_total") == 8.0
    assert json.loads(stage.metrics_message().payload)["devices_joined_midstream"] == 1


def test_a_device_whose_first_readings_are_all_refused_has_no_watermark_yet(stage):
    topic = stage.topics.readings("d1")
    bad = [Reading("d1", s, float(s), {"a": 1e308}, 1.0) for s in range(500, 503)]
    stage.handle(topic, frame(bad))
    stage.handle(topic, frame(readings("d1", 2, start=510)))
    assert stage.stats.gaps == 0 and stage.stats.joined_midstream == 1


def test_a_device_restored_from_a_checkpoint_still_counts_the_readings_it_missed(stage):
    stage.handle(stage.topics.readings("d1"), frame(readings("d1", 5)))
    restarted = EdgeStage("edge-1", clock=lambda: 1000.0)
    restarted.restore(*stage.snapshot()[:2])
    restarted.handle(restarted.topics.readings("d1"), frame(readings("d1", 5, start=100)))
    assert restarted.stats.gaps == 95 and restarted.stats.joined_midstream == 0


def test_bad_reading_in_batch_spares_its_neighbours_and_model_stays_finite(stage):
    data = readings("d1", 6)
    data[1] = Reading("d1", 1, 1.0, {"a": 1e308, "b": 1.0}, 3.0)
    data[2] = Reading("d1", 2, 2.0, {"a": 1.0, "b": 1.0}, math.nan)
    data[3] = Reading("d1", 3, 3.0, {"a": math.inf, "b": 1.0}, 3.0)
    out = stage.handle(stage.topics.readings("d1"), frame(data))
    preds = bodies(out, "predictions")[0]["predictions"]
    assert [p["seq"] for p in preds] == [0, 3, 4, 5]
    assert all(math.isfinite(p["y_pred"]) for p in preds)
    (dead,) = bodies(out, "deadletter")
    assert {(r["seq"], r["reason"]) for r in dead["readings"]} == {
        (1, "value_out_of_range"),
        (2, "non_finite_target"),
    }
    assert stage.stats.cleaned == 1


def test_device_must_match_topic(stage):
    out = stage.handle(stage.topics.readings("other"), frame(readings("d1", 2)))
    assert bodies(out, "deadletter")[0]["reason"] == "device_mismatch"
    assert bodies(out, "predictions") == []


def test_metrics_message_carries_the_same_numbers(stage):
    stage.handle(stage.topics.readings("d1"), frame(readings("d1", 40)))
    stage.handle(stage.topics.readings("d1"), b"\x00garbage")
    m = json.loads(stage.metrics_message().payload)
    assert (m["readings"], m["predictions"], m["messages"]) == (40, 40, 2)
    assert m["rejected"] == 1 and sum(m["rejected_by_reason"].values()) == 1
    assert m["metrics"]["count"] == 40
    assert m["metrics"] == stage.learner.metrics.as_dict()


def test_classifier_spec_publishes_classes():
    stage = EdgeStage("c", ModelSpec.parse("linear_model.LogisticRegression"))
    data = [Reading("d", i, float(i), {"a": float(i % 2)}, float(i % 2)) for i in range(20)]
    out = stage.handle(stage.topics.readings("d"), frame(data))
    preds = bodies(out, "predictions")[0]["predictions"]
    assert len(preds) == 20
    # LogisticRegression is binary: 0/1 targets become River's bools, both ways.
    assert {type(p["y_pred"]) for p in preds} == {type(p["y_true"]) for p in preds} == {bool}
    assert all(0.5 <= p["proba"] <= 1 for p in preds)


def test_minibatch_mode_predicts_each_batch_then_learns_it_with_rivers_many_api():
    pd = pytest.importorskip("pandas")
    stage = EdgeStage("edge-1", mode="minibatch")
    data = readings("d1", 30)
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    expected = []
    for part in (data[:10], data[10:], data[5:15]):  # the last batch is all duplicates
        out = stage.handle(stage.topics.readings("d1"), frame(part))
        got = [p["y_pred"] for b in bodies(out, "predictions") for p in b["predictions"]]
        new = [r for r in part if r.seq >= len(expected)]
        if new:
            X = pd.DataFrame([r.x for r in new])
            expected += model.predict_many(X).tolist()
            model.learn_many(X, pd.Series([r.y for r in new]))
        assert got == expected[len(expected) - len(new) :]
    assert stage.stats.predictions == 30 and stage.stats.rejected == {"duplicate": 10}


def test_minibatch_mode_learns_only_the_readings_that_carry_a_target():
    """Readings without a target are predicted with their batch, then left out of
    learn_many; a batch without any target is predicted and learns nothing."""
    pd = pytest.importorskip("pandas")
    stage = EdgeStage("edge-1", mode="minibatch")
    data = [
        Reading(r.device, r.seq, r.ts, r.x, None if r.seq % 3 == 1 or r.seq >= 20 else r.y)
        for r in readings("d1", 30)
    ]
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    for part in (data[:10], data[10:20], data[20:]):
        out = stage.handle(stage.topics.readings("d1"), frame(part))
        got = [p["y_pred"] for b in bodies(out, "predictions") for p in b["predictions"]]
        X = pd.DataFrame([r.x for r in part])
        assert got == model.predict_many(X).tolist()
        known = [r.y is not None for r in part]
        if any(known):
            model.learn_many(X[known], pd.Series([r.y for r in part], dtype=float)[known])
    assert [p["y_true"] for p in bodies(out, "predictions")[0]["predictions"]] == [None] * 10
    assert stage.stats.predictions == 30


def test_minibatch_mode_learns_a_batch_with_missing_values_reading_by_reading():
    pytest.importorskip("pandas")
    stage = EdgeStage("edge-1", mode="minibatch")
    data = readings("d1", 4)
    data[2] = Reading("d1", 2, 2.0, {"a": 1.0}, 3.0)  # "b" missing
    out = stage.handle(stage.topics.readings("d1"), frame(data))
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    expected = []
    for r in data:
        expected.append(model.predict_one(r.x))
        model.learn_one(r.x, r.y)
    assert [p["y_pred"] for p in bodies(out, "predictions")[0]["predictions"]] == expected


def test_minibatch_mode_refuses_a_model_that_cannot_learn_in_batches():
    with pytest.raises(ValueError, match="cannot learn in mini-batches"):
        EdgeStage("edge-1", ModelSpec.parse("tree.HoeffdingTreeRegressor"), mode="minibatch")


BAD_NAMES = [("a", "a"), ("", "b")]


def bad_names_frame(names: tuple[str, ...], start: int, by_id: bool = False) -> bytes:
    n = 5
    batch = Batch("d1", 0, np.arange(start, start + n), np.arange(n, dtype=float), names,
                  np.ones((n, len(names))), target=np.ones(n))  # fmt: skip
    return codec.encode(batch, schema_id=by_id)


@pytest.mark.parametrize("mode", ["exact", "minibatch"])
@pytest.mark.parametrize("names", BAD_NAMES)
def test_a_frame_with_repeated_or_empty_field_names_never_reaches_a_model(mode, names):
    pytest.importorskip("pandas")
    stage = EdgeStage("edge-1", mode=mode)
    topic = stage.topics.readings("d1")
    stage.handle(topic, frame(readings("d1", 3)))
    model = pickle.dumps(stage.learner.devices["d1"].model)
    out = stage.handle(topic, bad_names_frame(names, start=3))
    assert [b["reason"] for b in bodies(out, "deadletter")] == ["bad_field_names"]
    assert bodies(out, "predictions") == []
    assert pickle.dumps(stage.learner.devices["d1"].model) == model
    assert stage.learner.devices["d1"].seq == 2
    assert stage.stats.rejected == {"bad_field_names": 1}


@pytest.mark.parametrize("names", BAD_NAMES)
def test_a_schema_with_repeated_or_empty_field_names_is_refused_as_it_arrives(names):
    stage = EdgeStage("edge-1", clock=lambda: 1000.0)
    sid, schema = codec.schema_frame(Batch("d1", 0, np.arange(1), np.zeros(1), names,
                                           np.ones((1, len(names)))))  # fmt: skip
    out, done = stage.handle_message(stage.topics.schemas(sid), schema, "schema")
    assert [b["reason"] for b in bodies(out, "deadletter")] == ["bad_field_names"]
    assert done == ["schema"] and sid not in stage.schemas
    # A frame naming it waits, as for any schema the stage does not know.
    held = stage.handle_message(stage.topics.readings("d1"), bad_names_frame(names, 0, True), 1)
    assert held == ([], [])
    assert "d1" not in stage.learner.devices


def test_a_frame_that_arrives_before_its_schema_waits_for_it():
    now = [100.0]
    stage = EdgeStage("edge-1", clock=lambda: now[0])
    batch = Batch.from_readings(readings("d1", 3))
    sid, schema = codec.schema_frame(batch)
    frame = codec.encode(batch, schema_id=True)
    out, done = stage.handle_message(stage.topics.readings("d1"), frame, "frame")
    assert (out, done) == ([], [])  # held: no dead letter, not done (not acknowledged)
    out, done = stage.handle_message(stage.topics.schemas(sid), schema, "schema")
    assert done == ["schema", "frame"]
    assert [p["seq"] for p in bodies(out, "predictions")[0]["predictions"]] == [0, 1, 2]


def test_latency_runs_from_receipt_and_age_from_the_reading_timestamp():
    """A frame received at 4.5 s (handled at 5 s) waits for its schema until 8 s: its
    three readings took 3.5 s at the edge, whatever their timestamps (0-2 s, on a wall
    clock at 1,000 s) say."""
    latencies, ages = [], []
    now = [5.0]
    stage = EdgeStage(
        "edge-1",
        clock=lambda: 1000.0,
        timer=lambda: now[0],
        on_latency=lambda seconds, n: latencies.append((seconds, n)),
        on_age=lambda a: ages.append(a.tolist()),
    )
    batch = Batch.from_readings(readings("d1", 3))
    sid, schema = codec.schema_frame(batch)
    topic = stage.topics.readings("d1")
    stage.handle_message(topic, codec.encode(batch, schema_id=True), "frame", received=4.5)
    now[0] = 8.0
    stage.handle_message(stage.topics.schemas(sid), schema, "schema")
    stage.handle_message(topic, frame(readings("d1", 2, start=3)), "next")  # received now
    assert latencies == [(3.5, 3), (0.0, 2)]
    assert ages == [[1000.0, 999.0, 998.0], [997.0, 996.0]]


def test_a_frame_whose_schema_never_comes_is_dead_lettered_after_a_while():
    now = [100.0]
    stage = EdgeStage("edge-1", clock=lambda: now[0])
    frame = codec.encode(Batch.from_readings(readings("d1", 3)), schema_id=True)
    stage.handle_message(stage.topics.readings("d1"), frame, "frame")
    assert stage.expire_held(10.0) == ([], [])
    now[0] += 10.0
    out, done = stage.expire_held(10.0)
    assert done == ["frame"] and bodies(out, "deadletter")[0]["reason"] == "unknown_schema"
    assert stage.stats.rejected == {"unknown_schema": 1}


def only_a(device: str, n: int, start: int = 0) -> list[Reading]:
    """Readings of another schema than :func:`readings` makes: feature ``a`` only."""
    return [Reading(device, s, float(s), {"a": float(s % 7)}, 2.0) for s in range(start, start + n)]


def seqs_of(out) -> list[int]:
    return [p["seq"] for b in bodies(out, "predictions") for p in b["predictions"]]


def test_a_devices_frames_wait_behind_its_frame_that_waits_for_a_schema():
    """Whatever their schema, a device's later frames are learned after the one that
    waits: learned first, they would move its watermark past it (making it duplicates)."""
    stage = EdgeStage("edge-1", clock=lambda: 100.0)
    topic = stage.topics.readings("d1")
    ab = Batch.from_readings(readings("d1", 3))
    sid_ab, schema_ab = codec.schema_frame(ab)
    sid_a, schema_a = codec.schema_frame(Batch.from_readings(only_a("d1", 1)))
    stage.handle_message(stage.topics.schemas(sid_a), schema_a, "schema a")
    assert stage.handle_message(topic, codec.encode(ab, schema_id=True), "f1") == ([], [])
    assert stage.handle_message(topic, frame(readings("d1", 3, start=3)), "f2") == ([], [])
    by_a = codec.encode(Batch.from_readings(only_a("d1", 3, start=6)), schema_id=True)
    assert stage.handle_message(topic, by_a, "f3") == ([], [])  # its schema is known
    by_ab = codec.encode(Batch.from_readings(readings("d1", 2, start=9)), schema_id=True)
    assert stage.handle_message(topic, by_ab, "f4") == ([], [])
    out, done = stage.handle_message(stage.topics.readings("d2"), frame(readings("d2", 2)), "d2")
    assert done == ["d2"] and seqs_of(out) == [0, 1]  # other devices do not wait
    out, done = stage.handle_message(stage.topics.schemas(sid_ab), schema_ab, "schema ab")
    assert done == ["schema ab", "f1", "f2", "f3", "f4"]
    assert seqs_of(out) == list(range(11))
    assert bodies(out, "deadletter") == [] and stage.stats.rejected == {}
    assert stage.stats.gaps == 0 and stage.stats.messages == 5


def test_frames_behind_one_whose_schema_never_comes_are_learned_in_order_once_it_expires():
    now = [100.0]
    stage = EdgeStage("edge-1", clock=lambda: now[0])
    topic = stage.topics.readings("d1")
    ab = Batch.from_readings(readings("d1", 3))
    sid_ab, schema_ab = codec.schema_frame(ab)
    by_a = codec.encode(Batch.from_readings(only_a("d1", 3, start=6)), schema_id=True)
    for t, payload, token in [
        (100.0, codec.encode(ab, schema_id=True), "f1"),  # its schema comes at 105
        (101.0, frame(readings("d1", 3, start=3)), "f2"),
        (102.0, by_a, "f3"),  # its schema never comes
        (103.0, frame(readings("d1", 2, start=9)), "f4"),
    ]:
        now[0] = t
        assert stage.handle_message(topic, payload, token) == ([], [])
    now[0] = 105.0
    out, done = stage.handle_message(stage.topics.schemas(sid_ab), schema_ab, "schema")
    assert done == ["schema", "f1", "f2"] and seqs_of(out) == list(range(6))
    now[0] = 111.9
    assert stage.expire_held(10.0) == ([], [])
    now[0] = 112.0
    out, done = stage.expire_held(10.0)
    assert done == ["f3", "f4"] and seqs_of(out) == [9, 10]
    assert [b["reason"] for b in bodies(out, "deadletter")] == ["unknown_schema"]
    assert stage.stats.rejected == {"unknown_schema": 1}  # no duplicate


def test_the_first_frame_that_expires_releases_the_frames_behind_it():
    now = [100.0]
    stage = EdgeStage("edge-1", clock=lambda: now[0])
    topic = stage.topics.readings("d1")
    by_id = codec.encode(Batch.from_readings(readings("d1", 3)), schema_id=True)
    assert stage.handle_message(topic, by_id, "f1") == ([], [])
    now[0] = 105.0
    assert stage.handle_message(topic, frame(readings("d1", 3, start=3)), "f2") == ([], [])
    now[0] = 110.0
    out, done = stage.expire_held(10.0)
    assert done == ["f1", "f2"] and seqs_of(out) == [3, 4, 5]
    assert [b["reason"] for b in bodies(out, "deadletter")] == ["unknown_schema"]
    assert stage.handle(topic, frame(readings("d1", 1, start=6))) != []  # nothing waits now


def test_a_frame_that_cannot_wait_behind_its_devices_held_one_is_dead_lettered():
    stage = EdgeStage("edge-1", clock=lambda: 100.0, max_held=2)
    topic = stage.topics.readings("d1")
    by_id = codec.encode(Batch.from_readings(readings("d1", 3)), schema_id=True)
    assert stage.handle_message(topic, by_id, "f1") == ([], [])
    assert stage.handle_message(topic, frame(readings("d1", 3, start=3)), "f2") == ([], [])
    out, done = stage.handle_message(topic, frame(readings("d1", 3, start=6)), "f3")
    assert done == ["f3"] and seqs_of(out) == []  # learned now, it would pass f1 and f2
    assert [b["reason"] for b in bodies(out, "deadletter")] == ["unknown_schema"]
    out, done = stage.handle_message(stage.topics.readings("d2"), frame(readings("d2", 1)), "d2")
    assert done == ["d2"] and seqs_of(out) == [0]


def test_a_restarted_stage_knows_the_schemas_it_had_seen(tmp_path):
    """Frames queued for a stopped edge reach it before the retained schemas do."""
    stage = EdgeStage("edge-1", clock=lambda: 100.0)
    topic = stage.topics.readings("d1")
    store = CheckpointStore(tmp_path, "edge-1")
    for data in [readings("d1", 3), only_a("d1", 2, start=3)]:
        batch = Batch.from_readings(data)
        sid, schema = codec.schema_frame(batch)
        stage.handle_message(stage.topics.schemas(sid), schema, "schema")
        stage.handle(topic, codec.encode(batch, schema_id=True))
        meta, changed, full = stage.snapshot()
        assert [k for k in changed if k.startswith("schema/")] == [f"schema/{sid}"]  # new only
        store.save(meta, changed, full=full)
    stage.handle_message(stage.topics.schemas(sid), schema, "schema")  # retained, again
    assert not [k for k in stage.snapshot()[1] if k.startswith("schema/")]
    restarted = EdgeStage("edge-1", clock=lambda: 100.0)
    restarted.restore(*store.load())
    store.close()
    assert set(restarted.learner.devices) == {"d1"}
    for data, token in [(readings("d1", 2, start=5), "f1"), (only_a("d1", 2, start=7), "f2")]:
        batch = Batch.from_readings(data)
        out, done = restarted.handle_message(topic, codec.encode(batch, schema_id=True), token)
        assert done == [token] and seqs_of(out) == [r.seq for r in data]
    assert restarted.stats.rejected == {} and restarted.stats.gaps == 0


def test_a_checkpoint_written_whole_after_a_promotion_keeps_the_schemas():
    stage = EdgeStage("edge-1", challenger=ModelSpec.parse("linear_model.LinearRegression"))
    batch = Batch.from_readings(readings("d1", 3))
    sid, schema = codec.schema_frame(batch)
    stage.handle_message(stage.topics.schemas(sid), schema, "schema")
    stage.handle(stage.topics.readings("d1"), codec.encode(batch, schema_id=True))
    stage.snapshot()
    stage.promote("command")
    _, changed, full = stage.snapshot()
    assert full and set(changed) == {"d1", f"schema/{sid}"}  # the rows not given are deleted


def test_a_message_the_broker_delivers_again_is_skipped_not_refused():
    """After a reconnect the broker resends what was processed but not yet acknowledged
    (MQTT DUP): its readings were learned, which is expected, not a sender's fault."""
    stage = EdgeStage("edge-1")
    topic, payload = stage.topics.readings("d1"), frame(readings("d1", 5))
    stage.handle_message(topic, payload, "first")
    out, done = stage.handle_message(topic, payload, "again", redelivered=True)
    assert (out, done) == ([], ["again"])
    assert stage.stats.redelivered == 5 and stage.stats.rejected == {}
    out, _ = stage.handle_message(topic, payload, "a sender's repeat")  # no DUP: refused
    assert bodies(out, "deadletter")[0]["reason"] == "duplicate"
    assert stage.stats.rejected == {"duplicate": 5} and stage.stats.redelivered == 5
