"""The aggregator service through a real Mosquitto: hand-made updates in, a signed,
retained fleet model out (issue 21)."""

from __future__ import annotations

import math
import threading
import time

import orjson
import pytest
from prometheus_client import CollectorRegistry
from test_fleet import FEDERABLE, learned, stream

from streampipe.fleet.aggregator import Aggregator
from streampipe.fleet.params import apply, extract
from streampipe.fleet.service import AggregatorConfig, FleetAggregator
from streampipe.fleet.update import CONTENT_TYPE, canonical_spec, encode_update
from streampipe.learn.spec import ModelSpec
from streampipe.models.artifact import CONTENT_TYPE as MODEL_CONTENT_TYPE
from streampipe.models.artifact import verify
from streampipe.models.keys import init_keys, load_signing_key, load_verify_key
from streampipe.transport import Connection

SPEC = canonical_spec("preprocessing.StandardScaler | linear_model.LinearRegression")


@pytest.fixture
def keys(tmp_path):
    pair = init_keys(tmp_path / "keys")
    return load_signing_key(pair.private), load_verify_key(pair.public)


@pytest.fixture
def publisher(broker):
    conn = Connection(broker.url, "fleet-test-edges").connect()
    yield conn
    conn.close()


def send(conn, topics, stage, model, *, seq=1, base=0, readings=1000, fleet="power", **kw):
    payload = encode_update(
        fleet=fleet,
        stage=stage,
        spec=SPEC,
        seq=seq,
        base=base,
        readings=readings,
        devices=1,
        params=extract(model),
        **kw,
    )
    topic = topics.fleet_updates("power", stage)
    conn.publish(topic, payload, qos=1, retain=True, content_type=CONTENT_TYPE).wait_for_publish(5)


class Running:
    """A FleetAggregator run in a thread, stopped at the end of the test."""

    def __init__(self, broker, topics, config):
        self.registry = CollectorRegistry()
        self.service = FleetAggregator(broker.url, topics, config, registry=self.registry)
        self.stop = threading.Event()
        self.service.start()
        self.start_version = self.service.version
        self.thread = threading.Thread(target=self.service.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def value(self, name, **labels):
        return self.registry.get_sample_value(name, labels)

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.service.close()


@pytest.fixture
def running(broker, topics):
    made = []

    def start(config):
        r = Running(broker, topics, config)
        made.append(r)
        return r

    yield start
    for r in made:
        r.close()


def eventually(condition, timeout=10.0):
    """Poll ``condition`` (one that no message signals, a metric say) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def models(cap, topics):
    return [m for m in cap.on(topics.fleet_model("power")) if m.payload]


def test_the_fleet_model_is_published_signed_retained_and_predicts_as_combined(
    broker, topics, capture, keys, publisher, running, tmp_path
):
    key, public = keys
    honest = [learned(FEDERABLE["scaled-linear"], 1000, seed=s) for s in range(3)]
    send(publisher, topics, "edge-0", honest[0])  # retained before the aggregator starts
    config = AggregatorConfig("power", key, min_interval=0.2, state_dir=tmp_path / "state")
    r = running(config)
    cap = capture([topics.fleet_model("power"), topics.deadletter("+")])
    start = time.monotonic()
    assert cap.wait(lambda: len(models(cap, topics)) >= 1, 10)
    send(publisher, topics, "edge-1", honest[1])
    send(publisher, topics, "edge-2", honest[2])
    assert models(cap, topics)[-1].properties.ContentType == MODEL_CONTENT_TYPE
    expected = Aggregator(SPEC)
    for i, m in enumerate(honest):
        assert expected.add(FleetUpdate(f"edge-{i}", m)) is None

    def newest_is_complete():
        art = verify(models(cap, topics)[-1].payload, public)
        return extract(art.load())["scaler"]["counts"]["x1"] == 3000

    assert cap.wait(newest_is_complete, 10), "the fleet model never combined all three"
    elapsed = time.monotonic() - start
    assert elapsed < 5
    arts = [verify(m.payload, public) for m in models(cap, topics)]
    versions = [a.header.version for a in arts]
    assert versions == sorted(set(versions)) and versions[0] == 1
    newest = arts[-1]
    assert newest.header.name == "power" and newest.header.spec == SPEC
    assert newest.header.kind == "regressor"
    fleet = newest.load()
    want = ModelSpec.parse(SPEC).build()
    combined = expected.combine(version_now=newest.header.version - 1)
    apply(want, combined)
    for x, _ in stream(100, seed=7):
        assert fleet.predict_one(x) == want.predict_one(x)
    assert extract(fleet) == combined

    # retained: a late subscriber gets the newest at once
    late = capture([topics.fleet_model("power")])
    assert late.wait(lambda: len(late.messages) == 1, 5)
    assert verify(late.messages[0].payload, public).header.version == versions[-1]

    # metrics
    assert r.value("streampipe_fleet_updates_received_total") == 3
    assert r.value("streampipe_fleet_model_version") == versions[-1]
    assert r.value("streampipe_fleet_contributing_edges") == 3
    assert r.value("streampipe_fleet_models_published_total") == len(versions)
    assert not cap.on(topics.deadletter("+"))


class FleetUpdate:
    """An Update as the test's edges send it, for the expected combination."""

    def __new__(cls, stage, model, *, seq=1, base=0, readings=1000):
        from streampipe.fleet.update import Update

        return Update("power", stage, SPEC, seq, base, readings, 1, extract(model), 0.0)


def test_bad_updates_are_refused_counted_and_dead_lettered(
    broker, topics, capture, keys, publisher, running
):
    key, public = keys
    r = running(AggregatorConfig("power", key, spec=SPEC, min_interval=0.1))
    cap = capture([topics.fleet_model("power"), topics.deadletter("+")])
    good = learned(FEDERABLE["scaled-linear"], 500)
    send(publisher, topics, "edge-0", good)
    bad_topic = topics.fleet_updates("power", "edge-9")
    publisher.publish(bad_topic, b"\xc1 not msgpack", qos=1).wait_for_publish(5)
    other = learned(FEDERABLE["linear"], 100)
    wrong = encode_update(
        fleet="power", stage="edge-8", spec=canonical_spec("linear_model.LinearRegression"),
        seq=1, base=0, readings=1, devices=1, params=extract(other),
    )  # fmt: skip
    publisher.publish(topics.fleet_updates("power", "edge-8"), wrong, qos=1).wait_for_publish(5)
    stolen = encode_update(
        fleet="power", stage="edge-0", spec=SPEC, seq=5, base=0, readings=1, devices=1,
        params=extract(good),
    )  # fmt: skip
    publisher.publish(topics.fleet_updates("power", "edge-7"), stolen, qos=1).wait_for_publish(5)
    send(publisher, topics, "edge-0", good)  # the same seq again: applied once
    dead = topics.deadletter("aggregate-power")
    assert cap.wait(lambda: len(cap.on(dead)) == 3, 10)
    reasons = sorted(orjson.loads(m.payload)["reason"] for m in cap.on(dead))
    assert reasons == ["malformed", "wrong_spec", "wrong_stage"]
    assert eventually(lambda: r.value("streampipe_fleet_updates_refused_total", reason="duplicate"))
    for reason in ("malformed", "wrong_spec", "wrong_stage"):
        assert r.value("streampipe_fleet_updates_refused_total", reason=reason) == 1
    assert cap.wait(lambda: models(cap, topics), 5)
    time.sleep(0.5)
    arts = [verify(m.payload, public) for m in models(cap, topics)]
    assert [a.header.version for a in arts] == [1]  # the duplicate changed nothing
    assert r.value("streampipe_fleet_contributing_edges") == 1
    assert math.isfinite(arts[0].load().predict_one({"x1": 1.0, "x2": 2.0, "x3": 0.5}))


def versions(cap, topics, public):
    return [verify(m.payload, public).header.version for m in models(cap, topics)]


def test_versions_go_on_from_the_retained_model_and_the_ledger(
    broker, topics, capture, keys, publisher, running, tmp_path
):
    key, public = keys
    cap = capture([topics.fleet_model("power")])
    seen = lambda: versions(cap, topics, public)  # noqa: E731
    config = AggregatorConfig("power", key, min_interval=0.0, state_dir=tmp_path / "state")
    first = running(config)
    send(publisher, topics, "edge-0", learned(FEDERABLE["scaled-linear"], 100, seed=1))
    assert cap.wait(lambda: seen() == [1], 10)
    send(publisher, topics, "edge-0", learned(FEDERABLE["scaled-linear"], 200, seed=1), seq=2)
    assert cap.wait(lambda: seen() == [1, 2], 10)
    first.close()
    # a restart with the same state dir numbers on, even with the retained model cleared;
    # it republishes from the updates retained
    publisher.publish(topics.fleet_model("power"), b"", qos=1, retain=True).wait_for_publish(5)
    again = running(config)
    assert again.start_version == 2
    assert cap.wait(lambda: seen() == [1, 2, 3], 10)
    send(publisher, topics, "edge-1", learned(FEDERABLE["scaled-linear"], 100, seed=2))
    assert cap.wait(lambda: seen() == [1, 2, 3, 4], 10)
    again.close()
    # without a state dir: from the retained one
    third = running(AggregatorConfig("power", key, min_interval=0.3))
    assert third.start_version == 4
    assert cap.wait(lambda: seen() == [1, 2, 3, 4, 5], 10), seen()
