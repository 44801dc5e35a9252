"""The batch-at-a-time scoreboard gives River's own metric values."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river import metrics, utils

from streampipe.learn.scores import ClassificationScores, RegressionScores

RIVER = {"mae": metrics.MAE, "rmse": metrics.RMSE, "r2": metrics.R2}


def river_values(pairs, window):
    progressive = {k: make() for k, make in RIVER.items()}
    rolling = {k: utils.Rolling(make, window_size=window) for k, make in RIVER.items()}
    for y, p in pairs:
        if y is None or p is None:
            continue
        for m in (*progressive.values(), *rolling.values()):
            m.update(y, p)
    return (
        {k: m.get() for k, m in progressive.items()},
        {k: m.get() for k, m in rolling.items()},
    )


@settings(max_examples=60, deadline=None)
@given(
    window=st.integers(2, 40),  # River's Rolling divides by zero at window 1
    sizes=st.lists(st.integers(0, 60), min_size=1, max_size=8),
    seed=st.integers(0, 2**32 - 1),
)
def test_regression_scores_equal_rivers_progressive_and_rolling_metrics(window, sizes, seed):
    rng = random.Random(seed)
    scores = RegressionScores(window)
    pairs = []
    for size in sizes:  # batches of any size, crossing the window's edge anywhere
        batch = [
            (
                None if rng.random() < 0.05 else rng.uniform(-50, 50),
                None if rng.random() < 0.05 else rng.uniform(-50, 50),
            )
            for _ in range(size)
        ]
        pairs += batch
        scores.update_many([y for y, _ in batch], [p for _, p in batch])
    progressive, rolling = river_values(pairs, window)
    got = scores.as_dict()
    assert got["count"] == sum(1 for y, p in pairs if y is not None and p is not None)
    for name in RIVER:
        assert got["progressive"][name] == pytest.approx(progressive[name], rel=1e-9, abs=1e-9)
        assert got["rolling"][name] == pytest.approx(rolling[name], rel=1e-9, abs=1e-9)


def test_a_constant_target_has_rivers_r2_of_zero():
    scores = RegressionScores(5)
    scores.update_many([3.0, 3.0, 3.0], [1.0, 2.0, 3.0])
    assert scores.as_dict()["progressive"]["r2"] == 0.0 == metrics.R2().get()


def test_classification_scores_are_rivers_accuracy():
    scores = ClassificationScores(window=2)
    scores.update_many([True, False, True, None], [True, True, True, False])
    d = scores.as_dict()
    assert (d["count"], d["progressive"]["accuracy"], d["rolling"]["accuracy"]) == (3, 2 / 3, 0.5)
