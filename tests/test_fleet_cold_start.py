"""The cold-start claim of fleet learning (issue 21), as ``benchmarks/fleet.py`` measures
it over a real Mosquitto: held-out devices that start from the fleet model err at most
half as much over their first 50 readings as the same devices starting from scratch."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("seed", [0, 1])
def test_held_out_devices_starting_from_the_fleet_model_err_at_most_half_as_much(
    broker, topics, fleet_bench, seed
):
    r = fleet_bench.cold_start(
        broker.url, train_devices=16, holdout=8, readings=300, first=50, seed=seed,
        root=topics.root, start=fleet_bench.FIXED_START,
    )  # fmt: skip
    assert r.trained_readings == 16 * 300 and r.holdout_readings == 8 * 50
    assert r.version > 0
    print(f"fleet MAE {r.fleet_mae:.2f}, scratch MAE {r.scratch_mae:.2f}")
    assert r.fleet_mae <= 0.5 * r.scratch_mae
