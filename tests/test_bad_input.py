"""Bad input never stops an edge stage and never reaches a model — over a real broker."""

from __future__ import annotations

import math
import os
import threading

import msgpack
import pytest
from prometheus_client import CollectorRegistry

from streampipe import codec
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.readings import Batch, Reading
from streampipe.transport import Connection


@pytest.fixture
def edge(broker, topics):
    registry = CollectorRegistry()
    service = EdgeService(
        EdgeConfig(broker.url, "bad-input", topic_root=topics.root, metrics_interval=3600),
        registry=registry,
    ).start()
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    yield service
    service.stop()
    thread.join(30)
    assert not thread.is_alive()


def good(device: str, start: int, n: int = 5) -> bytes:
    return codec.encode(
        Batch.from_readings(
            [
                Reading(device, s, 1.0 + s, {"a": float(s), "b": 2.0}, 3.0 * s)
                for s in range(start, start + n)
            ]
        )
    )


BAD_PAYLOADS = {
    "random bytes": os.urandom(200),
    "empty": b"",
    "msgpack of the wrong shape": msgpack.packb({"device": "d", "x": [1, 2, 3]}),
    "msgpack list": msgpack.packb([1, 2, 3]),
}


def test_garbage_is_dead_lettered_and_the_stage_goes_on(broker, topics, capture, edge):
    cap = capture([topics.deadletter(), topics.predictions()])
    pub = Connection(broker.url, "bad-publisher").connect()
    try:
        valid = good("dev", 0)
        payloads = dict(BAD_PAYLOADS)
        payloads["truncated frame"] = valid[: len(valid) // 2]
        payloads.update(codec_bombs())
        for payload in payloads.values():
            pub.publish(topics.readings("dev"), payload, qos=1).wait_for_publish(10)
        bad_device = codec.encode(Batch.from_readings([Reading("a/b", 0, 1.0, {"a": 1.0}, 1.0)]))
        pub.publish(topics.readings("dev"), bad_device, qos=1).wait_for_publish(10)
        ctrl = codec.encode(Batch.from_readings([Reading("x\x01", 0, 1.0, {"a": 1.0}, 1.0)]))
        pub.publish(topics.readings("dev"), ctrl, qos=1).wait_for_publish(10)
        pub.publish(topics.readings("dev"), valid, qos=1).wait_for_publish(10)
        n_bad = len(payloads) + 2
        assert cap.wait(
            lambda: len(cap.on(topics.deadletter())) >= n_bad and cap.on(topics.predictions()),
            timeout=60,
        )
    finally:
        pub.close()
    dead = cap.json(topics.deadletter())
    assert len(dead) == n_bad
    for d in dead:
        assert d["reason"] and d["detail"] and d["topic"] == topics.readings("dev")
        assert len(d["payload_prefix"]) <= 344  # base64 of at most 256 bytes
    reasons = {d["reason"] for d in dead}
    assert "invalid_device" in reasons
    (preds,) = cap.json(topics.predictions())
    assert [p["seq"] for p in preds["predictions"]] == [0, 1, 2, 3, 4]
    assert sum(edge.stats.rejected.values()) == n_bad
    assert (
        edge.registry.get_sample_value("streampipe_rejected_total", {"reason": "invalid_device"})
        == 2
    )


def test_bad_values_never_reach_the_model(broker, topics, capture, edge):
    cap = capture([topics.predictions(), topics.deadletter()])
    pub = Connection(broker.url, "bad-values").connect()
    nasty = [math.nan, math.inf, -math.inf, 1e308, -1e308]
    data = []
    for s in range(60):
        v = nasty[s % len(nasty)] if s % 3 == 1 else float(s % 5)
        y = nasty[(s // 3) % len(nasty)] if s % 7 == 3 else 2.0 * (s % 5)
        data.append(Reading("dev", s, 100.0 + s, {"a": v, "b": 1.0}, y))
    try:
        for i in range(0, 60, 10):
            frame = codec.encode(Batch.from_readings(data[i : i + 10]))
            pub.publish(topics.readings("dev"), frame, qos=1).wait_for_publish(10)
        pub.publish(topics.readings("dev"), good("dev", 60), qos=1).wait_for_publish(10)
        assert cap.wait(
            lambda: any(
                p["seq"] == 64 for b in cap.json(topics.predictions()) for p in b["predictions"]
            ),
            timeout=60,
        )
    finally:
        pub.close()
    preds = [p for b in cap.json(topics.predictions()) for p in b["predictions"]]
    assert preds and all(math.isfinite(p["y_pred"]) for p in preds)
    assert all(p["y_true"] is None or math.isfinite(p["y_true"]) for p in preds)
    model = edge.stage.learner.devices["dev"].model
    assert math.isfinite(model.predict_one({"a": 1.0, "b": 1.0}))
    rejected = {
        (r["seq"], r["reason"]) for d in cap.json(topics.deadletter()) for r in d["readings"]
    }
    assert rejected and {reason for _, reason in rejected} <= {
        "value_out_of_range",
        "non_finite_target",
    }
    assert len(preds) + len(rejected) == 65, "every reading is predicted or rejected, none lost"


def codec_bombs() -> dict[str, bytes]:
    """Frames with a valid header whose payload claims or inflates to far too much."""
    from test_codec import _column, _header, _zstd_bomb, uvarint

    bomb = _zstd_bomb(512 << 20)
    assert len(bomb) < 20_000
    return {
        "16 KB frame inflating to 512 MiB": _header(1000, 0, flags=0x00) + _column(bomb),
        "header claiming 4 GiB": _header(1000, 0)
        + bytes((0x40, 8))
        + uvarint(0)
        + uvarint(4 << 30),
        "4 Gi readings": _header(1 << 32, 6),
    }
