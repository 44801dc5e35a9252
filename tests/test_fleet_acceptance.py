"""Fleet learning's acceptance checks (issue 21) over a real Mosquitto: cold start on
River's ChickWeights, the fleet model against central training, and asynchrony.

The first two run ``benchmarks/fleet.py``'s experiments (two edges and an aggregator);
the third drives the aggregator service with updates published as edges publish them.
"""

from __future__ import annotations

import math
import threading
import time
import uuid

import pytest
from prometheus_client import CollectorRegistry
from test_fleet import FEDERABLE, learned

from streampipe.fleet.params import extract
from streampipe.fleet.service import AggregatorConfig, FleetAggregator
from streampipe.fleet.update import (
    CONTENT_TYPE,
    Update,
    canonical_spec,
    decode_update,
    encode_update,
)
from streampipe.models.artifact import read_header, verify
from streampipe.models.keys import init_keys, load_signing_key, load_verify_key
from streampipe.transport import Connection

SPEC = canonical_spec("preprocessing.StandardScaler | linear_model.LinearRegression")


def _root(what: str) -> str:
    return f"test-fleet-acceptance-{what}-{uuid.uuid4().hex[:6]}"


# -- cold start on ChickWeights --------------------------------------------------------


@pytest.fixture(scope="module")
def chicks(broker, fleet_bench):
    """Fold 0: chicks 5, 10, …, 50 held out (two to four of each diet), all their readings
    scored; the other 40 chicks learn through two edges and the aggregator."""
    return fleet_bench.chick_weights(broker.url, fold=0, folds=5, root=_root("chicks"))


def test_held_out_chicks_starting_from_the_fleet_model_err_less(chicks):
    r = chicks
    print(f"ChickWeights fold 0: fleet {r.fleet_mae:.2f} g, scratch {r.scratch_mae:.2f} g")
    assert r.holdout_devices == 10 and r.holdout_readings + r.trained_readings == 578
    assert r.version > 0
    # Measured 0.19-0.28 of scratch over the five folds (0.68-0.72 when the edges
    # averaged their chicks' SGD models, which took ~12 steps each and no diet weight).
    assert r.fleet_mae <= 0.5 * r.scratch_mae


def test_the_edges_predict_as_rivers_predict_then_learn_from_the_fleet_model(chicks):
    assert chicks.fleet_mae == pytest.approx(chicks.replayed_mae, rel=1e-9)


# -- close to central training ---------------------------------------------------------


@pytest.fixture(scope="module")
def simulated(broker, fleet_bench):
    return fleet_bench.cold_start(
        broker.url, train_devices=16, holdout=8, readings=300, first=50, seed=0,
        root=_root("sim"), start=fleet_bench.FIXED_START,
    )  # fmt: skip


def test_the_fleet_model_is_close_to_central_training(simulated, chicks):
    # Each edge publishes the least-squares fit of all its readings (fleet.leastsq), not
    # its devices' averaged SGD models (9.4x central here, 1.3-1.5x on ChickWeights).
    # Measured 0.38-0.52x central on ChickWeights; on the simulated fleet 1.03-1.38x for
    # this seed over three runs (0.97-1.02x for seeds 1 and 2): see the next test.
    for r in (simulated, chicks):
        print(f"fleet {r.fleet_mae:.2f}, central {r.central_mae:.2f}, scratch {r.scratch_mae:.2f}")
        assert r.fleet_mae < r.scratch_mae
    assert chicks.fleet_mae <= 1.10 * chicks.central_mae
    assert simulated.fleet_mae <= 1.5 * simulated.central_mae


def test_the_fleet_model_is_within_10_percent_of_central_training(simulated):
    """Measured 1.00-1.04x central over four runs (seed 0), since the aggregator combines
    the edges' fits as models of the features in their own units: combined in each
    edge's scaled units it was 1.03-1.38x, as the mix of intercepts made at different
    means depended on timing."""
    assert simulated.fleet_mae <= 1.10 * simulated.central_mae


# -- asynchrony ------------------------------------------------------------------------


def _linear(params):
    """The linear part of parameters as one vector, in a fixed order."""
    return [params["weights"][k] for k in sorted(params["weights"])] + [params["intercept"]]


def test_a_stopped_edge_blocks_nothing_and_its_stale_return_counts_once_weighted_down(
    broker, topics, capture, tmp_path
):
    pair = init_keys(tmp_path / "keys")
    public = load_verify_key(pair.public)
    registry = CollectorRegistry()
    # rule "mean": with three edges "auto" is the trimmed mean, which keeps only the middle
    # value of each coordinate, and no weight could show there.
    config = AggregatorConfig("power", load_signing_key(pair.private), spec=SPEC, rule="mean",
                              min_interval=0.0)  # fmt: skip
    service = FleetAggregator(broker.url, topics, config, registry=registry).start()
    stop = threading.Event()
    worker = threading.Thread(target=service.run, args=(stop,), daemon=True)
    worker.start()
    cap = capture([topics.fleet_model("power")])
    edges = Connection(broker.url, f"fleet-acceptance-edges-{uuid.uuid4().hex[:6]}").connect()
    sent = 0

    def send(stage, model, *, seq, base, readings):
        nonlocal sent
        payload = encode_update(
            fleet="power", stage=stage, spec=SPEC, seq=seq, base=base, readings=readings,
            devices=1, params=extract(model),
        )  # fmt: skip
        edges.publish(
            topics.fleet_updates("power", stage), payload, qos=1, retain=True,
            content_type=CONTENT_TYPE,
        ).wait_for_publish(5)  # fmt: skip
        sent += 1
        return Update("power", stage, SPEC, seq, base, readings, 1, extract(model), 0.0)

    def published():
        return [m.payload for m in cap.on(topics.fleet_model("power")) if m.payload]

    def newest():
        got = published()
        return read_header(got[-1]).version if got else 0

    def reflecting(n):
        """Wait for a fleet model of n readings (its scaler's count); its version."""

        def done():
            got = published()
            return (
                bool(got) and extract(verify(got[-1], public).load())["scaler"]["counts"]["x1"] == n
            )

        assert cap.wait(done, 10), f"no fleet model of {n} readings"
        return newest()

    make = FEDERABLE["scaled-linear"]
    try:
        latest = {s: send(s, learned(make, 500, seed=i), seq=1, base=0, readings=500)
                  for i, s in enumerate(("edge-a", "edge-b"))}  # fmt: skip
        stale = learned(make, 500, seed=2, shift=5.0)  # edge-c's readings differ
        send("edge-c", stale, seq=1, base=0, readings=500)
        v1 = reflecting(1500)  # the last fleet model edge-c sees before it stops

        # edge-c stops; edge-a and edge-b go on learning, and the fleet with them
        t0 = time.monotonic()
        versions = [v1]
        for k in range(1, 5):
            n = 500 + 250 * k
            for i, s in enumerate(("edge-a", "edge-b")):
                model = learned(make, n, seed=10 * k + i)
                latest[s] = send(s, model, seq=k + 1, base=newest(), readings=n)
            versions.append(reflecting(2 * n + 500))  # edge-c's retained update still in
        assert versions == sorted(set(versions)) and len(versions) == 5, versions
        assert time.monotonic() - t0 < 10
        assert registry.get_sample_value("streampipe_fleet_contributing_edges") == 3
        # its staleness grew as the fleet moved on without it
        assert registry.get_sample_value("streampipe_fleet_max_staleness_versions") >= 4
        retained = capture([topics.fleet_updates("power", "edge-c")])
        assert retained.wait(lambda: len(retained.messages) == 1, 5)
        assert decode_update(retained.messages[0].payload).seq == 1  # still on the broker

        # edge-c returns with an update made from v1, several versions old
        now = versions[-1]
        back = learned(make, 1000, seed=3, shift=5.0)
        latest["edge-c"] = send("edge-c", back, seq=2, base=v1, readings=1000)
        final = reflecting(2 * 1500 + 1000)  # its old 500 readings are no longer counted
        # the old update delivered again (a broker's redelivery): refused, counted, unused
        edges.publish(
            topics.fleet_updates("power", "edge-c"),
            encode_update(fleet="power", stage="edge-c", spec=SPEC, seq=1, base=0,
                          readings=500, devices=1, params=extract(stale)),
            qos=1,
        ).wait_for_publish(5)  # fmt: skip
        sent += 1
        deadline = time.monotonic() + 5
        refused = "streampipe_fleet_updates_refused_total"
        while not registry.get_sample_value(refused, {"reason": "duplicate"}):
            assert time.monotonic() < deadline, "the redelivered update was not refused"
            time.sleep(0.02)
        time.sleep(0.3)
        assert newest() == final
    finally:
        stop.set()
        worker.join(5)
        service.close()
        edges.close()

    # The worker has stopped: its aggregator is ours to read.
    assert registry.get_sample_value("streampipe_fleet_updates_received_total") == sent
    assert registry.get_sample_value(refused, {"reason": "duplicate"}) == 1
    agg = service.aggregator
    assert agg.latest["edge-c"].seq == 2
    contribs = {c.stage: c for c in agg.contributions(final - 1)}
    assert [c.stage for c in agg.contributions(final - 1)] == ["edge-a", "edge-b", "edge-c"]
    c = contribs["edge-c"]
    assert c.staleness == now - v1 >= 4
    assert c.weight == pytest.approx(1000 * (1 + c.staleness) ** -0.5)
    # the fresh edges are behind only by the versions their own and edge-c's updates made
    assert max(contribs["edge-a"].staleness, contribs["edge-b"].staleness) <= 2 < c.staleness

    fleet = extract(verify(published()[-1], public).load())
    assert fleet == agg.combine(final - 1)
    # The fleet model is the weighted mean of the three edges' models, edge-c's with its
    # discounted weight: it predicts the mean of their predictions so weighted (and not
    # what the undiscounted weights would give).
    s = agg.combine(final - 1)["scaler"]
    xs = [
        {
            f: s["means"][f] + k * math.sqrt(s["vars"][f]) * (-1) ** i
            for i, f in enumerate(s["means"])
        }
        for k in (-2, -1, 0, 1, 2)
    ]
    models = {stage: agg.build(u.params) for stage, u in agg.latest.items()}
    fleet_model = agg.build(fleet)

    def mean_of_edges(weight):
        total = sum(weight(c) for c in contribs.values())
        return [
            sum(weight(c) * models[st].predict_one(x) for st, c in contribs.items()) / total
            for x in xs
        ]

    got = [fleet_model.predict_one(x) for x in xs]
    assert got == pytest.approx(mean_of_edges(lambda c: c.weight), rel=1e-9)
    assert got != pytest.approx(mean_of_edges(lambda c: c.readings), rel=1e-9)
