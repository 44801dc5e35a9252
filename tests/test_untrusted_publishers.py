"""What a publisher allowed on the broker can send that is well formed but must not be
obeyed: readings on another edge's partition, schemas by the thousand, stale or
premature control commands."""

from __future__ import annotations

import json
import threading

import pytest

from streampipe import codec
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.learn.challenger import PromotionRule
from streampipe.learn.spec import ModelSpec
from streampipe.readings import Batch, Reading
from streampipe.stage import EdgeStage
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
