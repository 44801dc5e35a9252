"""Per-sender bounds (issue 18: items 1, 3 and 4): one device exceeding one costs only
that device, with a dead letter and a counter; bytes in, messages out, no broker."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from streampipe import codec
from streampipe.learn.learner import DeviceState
from streampipe.learn.spec import ModelSpec
from streampipe.metrics import ReadingAgeHistogram, StageCollector
from streampipe.readings import Batch, Reading
from streampipe.stage import MAX_HELD_PER_DEVICE, EdgeStage

NOW = 1_800_000_000.0  # the edge's clock, seconds
BOOT = int(NOW * 1000) - 60_000  # a boot epoch as streampipe sensors make it (ms)


def frame(readings: list[Reading], by_id: bool = False) -> bytes:
    return codec.encode(Batch.from_readings(readings), schema_id=by_id)


def readings(device: str, n: int, start: int = 0, epoch: int = BOOT, **kw) -> list[Reading]:
    ts = kw.get("ts", NOW - 1.0)
    return [
        Reading(device, s, ts, {"a": float(s % 7)}, 2.0 * (s % 7), epoch)
        for s in range(start, start + n)
    ]


def bodies(out, kind: str) -> list[dict]:
    return [json.loads(m.payload) for m in out if f"/{kind}/" in m.topic]


def reasons(out) -> list[str]:
    return [b["reason"] for b in bodies(out, "deadletter")]


def seqs_of(out) -> list[int]:
    return [p["seq"] for b in bodies(out, "predictions") for p in b["predictions"]]


def make_stage(**kw) -> EdgeStage:
    return EdgeStage("edge-1", clock=lambda: NOW, **kw)


# -- 1. frames naming an unknown schema -----------------------------------------------


def test_one_device_naming_an_unknown_schema_holds_only_its_share_of_the_window():
    stage = make_stage(max_held=500)
    flood = stage.topics.readings("flood")
    done_at_once = []
    for i in range(100):
        out, done = stage.handle_message(flood, frame(readings("flood", 1, i), True), i)
        done_at_once += done
    held = 100 - len(done_at_once)
    assert held == MAX_HELD_PER_DEVICE  # the rest dead-lettered at once, acknowledged
    assert stage.stats.rejected == {"unknown_schema": 100 - MAX_HELD_PER_DEVICE}
    # Another device still has room to wait for its schema, and is learned meanwhile.
    other = stage.topics.readings("d2")
    assert stage.handle_message(other, frame(readings("d2", 1), True), "d2-held") == ([], [])
    out, done = stage.handle_message(stage.topics.readings("d3"), frame(readings("d3", 2)), "d3")
    assert done == ["d3"] and seqs_of(out) == [0, 1]


def test_held_frames_are_bounded_in_bytes_per_device():
    stage = make_stage()
    topic = stage.topics.readings("big")
    assert stage.handle_message(topic, frame(readings("big", 1), True), "first") == ([], [])
    rng = np.random.default_rng(0)
    names = tuple(f"f{i}" for i in range(40))
    sizes, refused = [], []
    for k in range(5):  # ~320 KB each, behind the one that waits
        n = 1000
        batch = Batch("big", BOOT, np.arange(1 + k * n, 1 + (k + 1) * n), np.full(n, NOW),
                      names, rng.standard_normal((n, len(names))), target=np.zeros(n))  # fmt: skip
        payload = codec.encode(batch)
        sizes.append(len(payload))
        _, done = stage.handle_message(topic, payload, k)
        refused += done
    assert sum(sizes[:3]) < 1 << 20 < sum(sizes[:4])
    assert refused == [3, 4] and stage.stats.rejected == {"unknown_schema": 2}


def test_held_frames_are_bounded_in_bytes_in_all():
    one = len(frame(readings("d0", 1), True))
    stage = make_stage(max_held_bytes=3 * one)
    for d in ("d0", "d1", "d2"):
        assert stage.handle_message(stage.topics.readings(d), frame(readings(d, 1), True), d) == (
            [],
            [],
        )
    out, done = stage.handle_message(
        stage.topics.readings("d3"), frame(readings("d3", 1), True), "d3"
    )
    assert done == ["d3"] and reasons(out) == ["unknown_schema"]
    assert "bytes" in bodies(out, "deadletter")[0]["detail"]


# -- 3. per-device state ----------------------------------------------------------------


def wide(device: str, seq: int, names: list[str]) -> bytes:
    return frame([Reading(device, seq, NOW, dict.fromkeys(names, 1.0), 1.0, BOOT)])


def test_new_feature_names_beyond_the_limit_are_refused_and_keep_the_checkpoint_small():
    stage = make_stage()
    topic = stage.topics.readings("wide")
    outs = []
    for i in range(20):  # 20 frames of 1,000 new names: 20,000 names without a bound
        outs += stage.handle(topic, wide("wide", i, [f"n{i}_{j}" for j in range(1000)]))
    assert seqs_of(outs) == [0]  # the first 1,000 names fit in 1,024
    assert stage.stats.rejected == {"too_many_features": 19}
    assert len(stage.learner.devices["wide"].features) == 1000
    # Known names are still learned; another device is not concerned.
    assert seqs_of(stage.handle(topic, wide("wide", 50, ["n0_1", "n0_2"]))) == [50]
    assert seqs_of(stage.handle(stage.topics.readings("d2"), frame(readings("d2", 1)))) == [0]
    # Each checkpoint of a device pickles its whole model: the limit is what bounds it.
    assert len(pickle.dumps(stage.learner.devices["wide"])) < 200_000


def test_new_devices_beyond_the_limit_are_refused_known_ones_go_on():
    stage = make_stage(max_devices=3)
    for d in ("d1", "d2", "d3"):
        assert seqs_of(stage.handle(stage.topics.readings(d), frame(readings(d, 2)))) == [0, 1]
    out = stage.handle(stage.topics.readings("d4"), frame(readings("d4", 2)))
    assert reasons(out) == ["too_many_devices"] and seqs_of(out) == []
    assert "d4" not in stage.learner.devices
    assert seqs_of(stage.handle(stage.topics.readings("d1"), frame(readings("d1", 1, 2)))) == [2]


def test_how_close_each_limit_is_is_exported():
    stage = make_stage(max_devices=4)
    registry = CollectorRegistry()
    registry.register(StageCollector(stage.stats))
    stage.handle(stage.topics.readings("d1"), wide("d1", 0, ["a", "b", "c"]))
    stage.handle_message(stage.topics.readings("d2"), frame(readings("d2", 1), True), "held")

    def get(name: str, limit: str) -> float | None:
        return registry.get_sample_value(f"streampipe_{name}", {"limit": limit})

    assert (get("limit_used", "devices"), get("limit", "devices")) == (1.0, 4.0)
    assert get("limit_used", "features_per_device") == 3.0
    assert get("limit", "features_per_device") == 1024.0
    assert get("limit_used", "held_frames") == 1.0
    assert get("limit_used", "held_frames_per_device") == 1.0
    assert get("limit_used", "held_bytes") > 0


# -- 4. watermark poisoning --------------------------------------------------------


def test_an_epoch_far_in_the_future_is_refused_and_a_reboot_still_works():
    stage = make_stage()
    topic = stage.topics.readings("d1")
    assert seqs_of(stage.handle(topic, frame(readings("d1", 3)))) == [0, 1, 2]
    out = stage.handle(topic, frame(readings("d1", 1, 3, epoch=2**64 - 1)))
    assert reasons(out) == ["future_epoch"] and seqs_of(out) == []
    rebooted = stage.handle(topic, frame(readings("d1", 2, epoch=BOOT + 30_000)))
    assert seqs_of(rebooted) == [0, 1]
    assert stage.stats.rejected == {"future_epoch": 1}


def test_a_seq_far_ahead_is_refused_unless_the_device_follows_on_from_it():
    stage = make_stage()
    topic = stage.topics.readings("d1")
    stage.handle(topic, frame(readings("d1", 5)))
    out = stage.handle(topic, frame(readings("d1", 1, 2**63 - 1)))
    assert reasons(out) == ["seq_jump"]
    assert seqs_of(stage.handle(topic, frame(readings("d1", 3, 5)))) == [5, 6, 7]
    assert stage.stats.gaps == 0 and stage.stats.rejected == {"seq_jump": 1}
    # A real jump (the device lost a few million readings) is taken at its next batch.
    assert reasons(stage.handle(topic, frame(readings("d1", 1, 5_000_000)))) == ["seq_jump"]
    assert seqs_of(stage.handle(topic, frame(readings("d1", 2, 5_000_002)))) == [
        5_000_002,
        5_000_003,
    ]
    assert stage.stats.gaps == 1  # 5,000,001; the jump itself is no gap
    registry = CollectorRegistry()
    registry.register(StageCollector(stage.stats))
    assert registry.get_sample_value("streampipe_sequence_gaps_total") == 1.0


def test_a_timestamp_far_in_the_future_is_refused_and_ages_stay_finite():
    age = ReadingAgeHistogram()
    stage = make_stage(on_age=age.observe_many)
    topic = stage.topics.readings("d1")
    out = stage.handle(topic, frame(readings("d1", 3, ts=1.7e308)))
    assert reasons(out) == ["future_timestamp"] and seqs_of(out) == []
    stage.handle(topic, frame(readings("d1", 3, ts=NOW - 0.5)))
    registry = CollectorRegistry()
    registry.register(age)
    total = registry.get_sample_value("streampipe_reading_age_seconds_sum")
    assert math.isfinite(total) and total == 1.5
    assert stage.stats.rejected == {"future_timestamp": 3}


def test_a_challenger_is_held_to_the_same_bounds():
    stage = make_stage(challenger=ModelSpec.parse("linear_model.LinearRegression"))
    topic = stage.topics.readings("wide")
    for i in range(3):
        stage.handle(topic, wide("wide", i, [f"n{i}_{j}" for j in range(600)]))
    stage.handle(topic, frame(readings("wide", 1, 2**40)))
    champion, challenger = stage.learner.devices["wide"], stage.challenger.devices["wide"]
    assert (champion.seq, challenger.seq) == (0, 0)
    assert champion.features == challenger.features and len(champion.features) == 600
    assert stage.stats.rejected == {"too_many_features": 2, "seq_jump": 1}


def test_device_states_checkpointed_before_the_bounds_restore():
    st = DeviceState(model=None, epoch=3, seq=9)
    old = {name: getattr(st, name) for name in ("model", "epoch", "seq", "learned", "version")}
    restored = DeviceState.__new__(DeviceState)
    restored.__setstate__((None, old))
    assert (restored.seq, restored.features, restored.jumped_to) == (9, set(), None)
    st.features.add("a")
    assert pickle.loads(pickle.dumps(st)).features == {"a"}


def test_the_bounds_are_edge_flags_that_reach_the_stage(monkeypatch):
    from streampipe import edge
    from streampipe.cli import build_parser

    flags = ["--max-devices", "7", "--max-features", "9", "--max-seq-jump", "11"]
    args = build_parser().parse_args(["edge", "--stage-id", "s", *flags, "--max-clock-ahead", "60"])
    made: list[edge.EdgeService] = []

    class Stop(Exception):
        pass

    def start(self: edge.EdgeService) -> edge.EdgeService:
        made.append(self)
        raise Stop  # built with the flags; no broker needed

    monkeypatch.setattr(edge.EdgeService, "start", start)
    with pytest.raises(Stop):
        args.run(args)
    stage = made[0].stage
    limits = stage.stats.limits_used()
    assert (limits["devices"][1], limits["features_per_device"][1]) == (7, 9)
    assert (stage.learner.max_seq_jump, stage.max_clock_ahead) == (11, 60.0)
    defaults = build_parser().parse_args(["edge", "--stage-id", "s"])
    assert (defaults.max_devices, defaults.max_clock_ahead) == (10_000, 3600.0)
