"""What a publisher allowed on the broker can send that is well formed but must not be
obeyed: readings on another edge's partition, schemas by the thousand, stale or
premature control commands."""

from __future__ import annotations

import json
import threading
import time

import pytest

from streampipe import codec
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.learn.challenger import PromotionRule
from streampipe.learn.spec import ModelSpec
from streampipe.readings import Batch, Reading
from streampipe.stage import EdgeStage
from streampipe.state import CheckpointStore
from streampipe.topics import partition_of
from streampipe.transport import Connection


def frame(device: str, n: int = 3, start: int = 0) -> bytes:
    data = [Reading(device, s, float(s), {"a": float(s)}, 2.0 * s) for s in range(start, start + n)]
    return codec.encode(Batch.from_readings(data))


def bodies(out, kind: str) -> list[dict]:
    return [json.loads(m.payload) for m in out if f"/{kind}/" in m.topic]


@pytest.fixture
def stage() -> EdgeStage:
    return EdgeStage("edge-1", clock=lambda: 1000.0)


# -- readings on a partition that is not the device's -------------------------------


def test_a_device_on_another_partition_is_dead_lettered_not_learned(stage):
    """boiler-1 is on p39; published on p05 too, an edge owning p05 would learn it
    beside the one owning p39, and the two would serve different predictions."""
    assert partition_of("boiler-1") == 39
    wrong = f"{stage.topics.root}/readings/p05/boiler-1"
    out, done = stage.handle_message(wrong, frame("boiler-1"), "t")
    assert done == ["t"] and bodies(out, "predictions") == []
    (dead,) = bodies(out, "deadletter")
    assert dead["reason"] == "wrong_partition" and "p39" in dead["detail"]
    assert "boiler-1" not in stage.learner.devices
    assert stage.stats.rejected == {"wrong_partition": 1} and stage.stats.messages == 1
    out = stage.handle(stage.topics.readings("boiler-1"), frame("boiler-1"))
    assert [p["seq"] for b in bodies(out, "predictions") for p in b["predictions"]] == [0, 1, 2]
    for level in ("p39x", "p039", "39"):  # only the exact level the device id hashes to
        (dead,) = stage.handle(f"{stage.topics.root}/readings/{level}/boiler-1", frame("boiler-1"))
        assert json.loads(dead.payload)["reason"] in ("wrong_partition", "wrong_topic")
    assert stage.stats.readings == 3 and stage.learner.devices["boiler-1"].seq == 2


# -- control commands -----------------------------------------------------------------

MEAN = "dummy.StatisticRegressor(stats.Mean())"
PROMOTE = b'{"promote": "challenger"}'


def challenged(readings: int, after: int | None = None) -> EdgeStage:
    """A stage whose challenger has scored ``readings`` readings."""
    rule = None if after is None else PromotionRule(better_by=99, after=after)
    stage = EdgeStage("edge-1", challenger=ModelSpec.parse(MEAN), promote=rule)
    for start in range(0, readings, 50):
        stage.handle(stage.topics.readings("d"), frame("d", min(50, readings - start), start))
    return stage


def test_a_retained_command_is_not_obeyed():
    """The broker sends a retained command on every subscription: obeyed, it would
    promote again after every restart."""
    stage = challenged(1000)
    control = stage.topics.control("edge-1")
    out, done = stage.handle_message(control, PROMOTE, "t", retained=True)
    assert done == ["t"] and [b["reason"] for b in bodies(out, "deadletter")] == [
        "retained_command"
    ]
    assert stage.stats.model_version == 1 and stage.challenger is not None
    assert stage.handle_message(control, b"", "t", retained=True) == ([], ["t"])  # cleared
    (event,) = bodies(stage.handle(control, PROMOTE), "events")  # sent live: obeyed
    assert (event["reason"], event["readings"], event["forced"]) == ("command", 1000, False)
    assert stage.stats.model_version == 2


@pytest.mark.parametrize("after", [None, 200])
def test_a_challenger_that_has_scored_too_few_readings_is_promoted_only_by_force(after):
    """--promote-after (1,000 unless a rule says otherwise) readings first."""
    needed = after or 1000
    stage = challenged(needed - 1, after=after)
    control = stage.topics.control("edge-1")
    (dead,) = bodies(stage.handle(control, PROMOTE), "deadletter")
    assert dead["reason"] == "premature_promotion"
    assert f"scored {needed - 1} readings, fewer than {needed}" in dead["detail"]
    assert stage.stats.model_version == 1 and stage.stats.rejected == {"premature_promotion": 1}
    for bad in (b'{"promote": "challenger", "force": "yes"}', b'{"force": true}', b"[1]"):
        (dead,) = bodies(stage.handle(control, bad), "deadletter")
        assert dead["reason"] == "bad_command"
    assert stage.stats.model_version == 1
    forced = b'{"promote": "challenger", "force": true}'
    (event,) = bodies(stage.handle(control, forced), "events")
    assert (event["readings"], event["forced"]) == (needed - 1, True)
    assert stage.stats.model_version == 2 and stage.challenger is None


def test_a_retained_promotion_does_not_promote_a_starting_edge(broker, topics, capture):
    """Retained before the edge starts (or left from an earlier run): the edge gets it
    with the retain flag as it subscribes, and refuses it."""
    cap = capture([topics.events(), topics.deadletter()])
    conn = Connection(broker.url, "retainer").connect()
    control = topics.control("cc")
    config = EdgeConfig(
        broker.url, "cc", topic_root=topics.root, challenger=MEAN, metrics_port=None
    )
    service = thread = None
    try:
        conn.publish(control, PROMOTE, qos=1, retain=True).wait_for_publish(10)
        service = EdgeService(config).start()
        thread = threading.Thread(target=service.run, daemon=True)
        thread.start()
        assert cap.wait(lambda: cap.on(topics.deadletter("cc")), timeout=15)
    finally:
        conn.publish(control, b"", qos=1, retain=True).wait_for_publish(10)
        conn.close()
        if service is not None:
            service.stop()
            thread.join(30)
    (dead,) = cap.json(topics.deadletter("cc"))
    assert dead["reason"] == "retained_command"
    assert cap.on(topics.events("cc")) == [] and service.stats.model_version == 1


# -- schemas by the thousand ------------------------------------------------------------


def junk(n: int, tag: str = "junk") -> list[tuple[str, bytes]]:
    """Valid schemas no frame will ever name: what a sensor may publish, retained."""
    return [
        codec.schema_frame(Batch.from_readings([Reading("x", 0, 0.0, {f"{tag}{i}": 1.0})]))
        for i in range(n)
    ]


def small(device: str, feature: str, seq: int) -> tuple[str, bytes, bytes]:
    """A one-reading frame that names its fields by schema id, and that schema."""
    batch = Batch.from_readings([Reading(device, seq, float(seq), {feature: 1.0}, 2.0)])
    sid, schema = codec.schema_frame(batch)
    return sid, schema, codec.encode(batch, schema_id=True)


def publish_schemas(stage: EdgeStage, schemas) -> list:
    out = []
    for sid, schema in schemas:
        out += stage.handle_message(stage.topics.schemas(sid), schema, sid, retained=True)[0]
    return out


def test_thousands_of_junk_schemas_do_not_keep_a_new_schema_out(stage):
    """4,096 retained schemas used to fill the registry for good: every new schema was
    too_many_schemas, in every stage started later. Now junk pushes out junk."""
    sid, schema, used_frame = small("d1", "temp", 0)
    publish_schemas(stage, [(sid, schema)])
    assert bodies(stage.handle(stage.topics.readings("d1"), used_frame), "predictions")
    flood = junk(stage.schemas.max_schemas + 10)
    assert bodies(publish_schemas(stage, flood), "deadletter") == []
    assert len(stage.schemas) == stage.schemas.max_schemas
    new_sid, new_schema, new_frame = small("d2", "rh", 0)
    assert bodies(publish_schemas(stage, [(new_sid, new_schema)]), "deadletter") == []
    out, done = stage.handle_message(stage.topics.readings("d2"), new_frame, "f")
    assert done == ["f"] and bodies(out, "predictions"), "the new schema is known"
    _, _, later = small("d1", "temp", 1)  # a schema frames named before the flood stays
    assert bodies(stage.handle(stage.topics.readings("d1"), later), "predictions")
    assert stage.stats.rejected == {} and stage.schemas.evicted == 12
    assert stage.stats.limits_used()["schemas"] == (4096, 4096)


def test_the_checkpoint_keeps_the_schemas_frames_named_and_never_junk(tmp_path):
    stage = EdgeStage("edge-1", clock=lambda: 1000.0)
    stage.schemas = codec.SchemaRegistry(max_schemas=4)
    store = CheckpointStore(tmp_path, "edge-1")
    sid, schema, f0 = small("d1", "temp", 0)
    publish_schemas(stage, [(sid, schema), *junk(3)])
    stage.handle(stage.topics.readings("d1"), f0)
    meta, changed, full = stage.snapshot()
    assert [k for k in changed if k.startswith("schema/")] == [f"schema/{sid}"] and not full
    store.save(meta, changed, full=full)
    # A sensor names schemas in frames too: each pushes out the one named least recently,
    # and its row stays until there are as many such rows as the registry holds.
    fulls = []
    for i in range(7):
        s, sch, f = small("d2", f"x{i}", i)
        publish_schemas(stage, [(s, sch)])
        stage.handle(stage.topics.readings("d2"), f)
        meta, changed, full = stage.snapshot()
        store.save(meta, changed, full=full)
        fulls.append(full)
        if full:
            rows = {k for k in changed if k.startswith("schema/")}
            assert rows == {f"schema/{s}" for s in stage.schemas.used()}
    assert sid not in stage.schemas and fulls == [False] * 5 + [True, False]
    named = set(stage.schemas.used())
    assert len(named) == 3, "a quarter of the registry stays for schemas not named yet"
    restarted = EdgeStage("edge-1", clock=lambda: 1000.0)
    restarted.schemas = codec.SchemaRegistry(max_schemas=4)
    restarted.restore(*store.load())
    store.close()
    assert set(restarted.schemas.used()) == named
    publish_schemas(restarted, junk(10, "more"))  # the retained junk, sent again on start
    assert set(restarted.schemas.used()) == named, "frames had named the restored ones"
    _, _, f = small("d2", "x6", 7)
    assert bodies(restarted.handle(restarted.topics.readings("d2"), f), "predictions")


def test_a_stage_started_after_a_flood_of_retained_schemas_takes_a_new_one(broker, topics, capture):
    """The junk is retained: every stage started later gets all of it first."""
    cap = capture([topics.predictions(), topics.deadletter()])
    conn = Connection(broker.url, "flooder").connect()
    full = 4096  # what the registry holds, by default
    flood = junk(full + 4)
    sid, schema, reading = small("d1", "temp", 0)
    service = thread = None
    try:
        sent = [conn.publish(topics.schemas(i), s, qos=1, retain=True) for i, s in flood]
        sent[-1].wait_for_publish(10)
        config = EdgeConfig(broker.url, "sch", topic_root=topics.root, metrics_port=None)
        service = EdgeService(config).start()
        thread = threading.Thread(target=service.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 15  # the flood arrives: no message says so
        while len(service.stage.schemas) < full and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(service.stage.schemas) == full, service.stats.rejected
        conn.publish(topics.schemas(sid), schema, qos=1, retain=True).wait_for_publish(10)
        conn.publish(topics.readings("d1"), reading, qos=1).wait_for_publish(10)
        assert cap.wait(lambda: cap.on(topics.predictions()) or cap.on(topics.deadletter()), 15)
    finally:
        for junk_id, _ in flood:
            conn.publish(topics.schemas(junk_id), b"", qos=0, retain=True)
        conn.publish(topics.schemas(sid), b"", qos=1, retain=True).wait_for_publish(10)
        conn.close()
        if service is not None:
            service.stop()
            thread.join(30)
    assert cap.json(topics.deadletter()) == []
    (body,) = cap.json(topics.predictions())
    assert body["device"] == "d1" and len(body["predictions"]) == 1
