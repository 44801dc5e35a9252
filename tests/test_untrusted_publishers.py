"""What a publisher allowed on the broker can send that is well formed but must not be
obeyed: readings on another edge's partition, schemas by the thousand, stale or
premature control commands."""

from __future__ import annotations

import json

import pytest

from streampipe import codec
from streampipe.readings import Batch, Reading
from streampipe.stage import EdgeStage
from streampipe.topics import partition_of


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
