from __future__ import annotations

import math
import statistics
import time

import numpy as np
import pytest
from river import evaluate, linear_model, metrics, preprocessing

from streampipe.readings import Reading
from streampipe.sources.simulate import (
    DECIMALS,
    DROPOUT_PROBABILITY,
    FEATURES,
    SPIKE_PROBABILITY,
    TARGET,
    UNITS,
    SensorFleet,
)

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def stream(fleet: SensorFleet, n: int, *, step: float = 1.0, start: float = T0) -> list[Reading]:
    """n readings, round-robin over the fleet's devices, one device every ``step`` s."""
    k = len(fleet)
    return [fleet.read(i % k, start + (i // k) * step) for i in range(n)]


def one_device(fleet: SensorFleet, index: int, n: int, step: float = 1.0) -> list[Reading]:
    return [fleet.read(index, T0 + i * step) for i in range(n)]


CONFIGS = [
    pytest.param({}, id="defaults"),
    pytest.param({"faults": False}, id="no-faults"),
    pytest.param({"seed": 12345, "time_scale": 600.0, "epoch": 3}, id="fast-time"),
]


def test_feature_names_units_and_decimals_are_documented() -> None:
    assert TARGET not in FEATURES
    assert set(UNITS) == set(DECIMALS) == {*FEATURES, TARGET}


def test_device_ids_are_numbered_topic_levels() -> None:
    assert SensorFleet().device_ids == tuple(f"sensor-{i:03d}" for i in range(10))
    assert SensorFleet(2, prefix="boiler_room").device_ids == ("boiler_room-000", "boiler_room-001")
    wide = SensorFleet(1500).device_ids
    assert wide[0] == "sensor-0000" and wide[-1] == "sensor-1499"
    assert len(set(wide)) == 1500
    for name in wide:
        assert name and not set(name) & set("+#/") and name.isprintable()


@pytest.mark.parametrize("prefix", ["", "a/b", "a+", "#", "tab\there", "nul\x00", "del\x7f"])
def test_invalid_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="topic level"):
        SensorFleet(prefix=prefix)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"devices": 0},
        {"seed": -1},
        {"time_scale": 0.0},
        {"time_scale": -1.0},
        {"time_scale": math.inf},
        {"time_scale": math.nan},
    ],
)
def test_invalid_arguments_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SensorFleet(**kwargs)


@pytest.mark.parametrize("index", [-1, 3])
def test_unknown_device_index_is_refused(index: int) -> None:
    with pytest.raises(IndexError):
        SensorFleet(3).read(index, T0)


@pytest.mark.parametrize("ts", [math.nan, math.inf])
def test_non_finite_time_is_refused(ts: float) -> None:
    with pytest.raises(ValueError):
        SensorFleet(3).read(0, ts)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_same_seed_and_calls_give_identical_readings(kwargs: dict) -> None:
    assert stream(SensorFleet(4, **kwargs), 2000) == stream(SensorFleet(4, **kwargs), 2000)


def test_different_seeds_differ() -> None:
    a = stream(SensorFleet(3, seed=1), 30)
    b = stream(SensorFleet(3, seed=2), 30)
    assert all(ra.x != rb.x for ra, rb in zip(a, b))


def test_a_device_does_not_depend_on_reads_of_other_devices() -> None:
    alone = one_device(SensorFleet(5, seed=9), 2, 200)
    mixed = [r for r in stream(SensorFleet(5, seed=9), 1000) if r.device == "sensor-002"]
    assert alone == mixed


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_seq_counts_from_zero_per_device(kwargs: dict) -> None:
    fleet = SensorFleet(3, **kwargs)
    readings = stream(fleet, 300, step=0.5)
    for index, device in enumerate(fleet.device_ids):
        mine = [r for r in readings if r.device == device]
        assert [r.seq for r in mine] == list(range(100))
        assert [r.ts for r in mine] == [T0 + 0.5 * i for i in range(100)]
        assert all(r.epoch == kwargs.get("epoch", 0) for r in mine)
        assert fleet.read(index, T0 + 1000).seq == 100


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_values_are_finite_and_at_their_precision(kwargs: dict) -> None:
    for r in stream(SensorFleet(10, **kwargs), 20_000, step=7.0):
        assert list(r.x) == [k for k in FEATURES if k in r.x]  # FEATURES order
        assert r.y is not None and math.isfinite(r.y) and round(r.y, DECIMALS[TARGET]) == r.y
        for k, v in r.x.items():
            assert type(v) is float and math.isfinite(v), (k, v)
            assert round(v, DECIMALS[k]) == v, (k, v)


def test_clean_values_are_physically_plausible() -> None:
    readings = stream(SensorFleet(20, faults=False, time_scale=100.0), 50_000, step=10.0)
    lows = {"temperature": 5, "humidity": 0, "pressure": 950, "vibration": 0, "current": 0}
    highs = {"temperature": 45, "humidity": 100, "pressure": 1075, "vibration": 20, "current": 20}
    for r in readings:
        assert len(r.x) == len(FEATURES)
        for k, v in r.x.items():
            assert lows[k] <= v <= highs[k], (k, v)
        assert 0 < r.y < 5000


def test_temperature_follows_the_day_and_humidity_opposes_it() -> None:
    # An hour of wall-clock time is a simulated day at time_scale=24.
    readings = one_device(SensorFleet(1, faults=False, time_scale=24.0, seed=4), 0, 3600)
    temp = np.array([r.x["temperature"] for r in readings])
    rh = np.array([r.x["humidity"] for r in readings])
    assert temp.max() - temp.min() > 3.0
    assert np.corrcoef(temp, rh)[0, 1] < -0.5
    # Across devices, mid-afternoon is warmer than the small hours.
    fleet = SensorFleet(30, faults=False)
    night = T0 - T0 % 86400 + 3 * 3600
    warm = [fleet.read(i, night + 12 * 3600).x["temperature"] for i in range(30)]
    cold = [fleet.read(i, night + 24 * 3600).x["temperature"] for i in range(30)]
    assert statistics.mean(warm) > statistics.mean(cold) + 3.0


def test_faults_are_rare_dropouts_and_spikes_and_can_be_turned_off() -> None:
    n = 40_000
    faulty = stream(SensorFleet(8, seed=5), n)
    clean = stream(SensorFleet(8, seed=5, faults=False), n)
    dropouts = spikes = 0
    for f, c in zip(faulty, clean):
        assert len(c.x) == len(FEATURES)
        assert (f.seq, f.ts, f.y) == (c.seq, c.ts, c.y)  # faults never touch the target
        if len(f.x) < len(FEATURES):
            dropouts += 1
            assert len(f.x) == len(FEATURES) - 1
            assert all(c.x[k] == v for k, v in f.x.items())
        elif f.x != c.x:
            spikes += 1
            (k,) = [k for k in FEATURES if f.x[k] != c.x[k]]
            assert 4.5 <= f.x[k] / c.x[k] <= 10.5, (k, f.x[k], c.x[k])
    # Expected 200 dropouts and 80 spikes; bounds are far outside binomial noise.
    assert 0.5 * DROPOUT_PROBABILITY * n < dropouts < 1.5 * DROPOUT_PROBABILITY * n
    assert 0.4 * SPIKE_PROBABILITY * n < spikes < 1.6 * SPIKE_PROBABILITY * n


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("time_scale", [1.0, 60.0])
def test_power_is_learnable_by_a_linear_model(seed: int, time_scale: float) -> None:
    fleet = SensorFleet(3, seed=seed, time_scale=time_scale, faults=False)
    readings = one_device(fleet, 1, 4000)
    spread = statistics.pstdev(r.y for r in readings)
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    first = readings[:3000]
    mae = evaluate.progressive_val_score(((r.x, r.y) for r in first), model, metrics.MAE())
    assert mae.get() < 0.3 * spread
    # Once it has learnt, the same model does much better still.
    later = metrics.MAE()
    for r in readings[3000:]:
        later.update(r.y, model.predict_one(r.x))
        model.learn_one(r.x, r.y)
    assert later.get() < 0.1 * spread


def test_read_costs_well_under_fifty_microseconds() -> None:
    fleet = SensorFleet(100)
    n = 5000
    best = math.inf
    for attempt in range(5):
        start = time.perf_counter()
        for i in range(n):
            fleet.read(i % 100, T0 + attempt + i * 1e-3)
        best = min(best, (time.perf_counter() - start) / n)
    assert best < 50e-6, f"{best * 1e6:.1f} µs per read"
