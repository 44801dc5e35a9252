"""The batch-at-a-time scoreboard gives River's own metric values."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river import metrics, utils

from streampipe.learn.scores import (
    AnomalyScores,
    BinaryScores,
    ClassificationScores,
    RegressionScores,
)

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
    if not got["count"]:  # River says 0.0; nothing scored has no value
        assert got["progressive"] == got["rolling"] == dict.fromkeys(RIVER)
        return
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


def river_binary(triples, window, names):
    make = {"accuracy": metrics.Accuracy, "f1": metrics.F1, "rocauc": metrics.ROCAUC}
    progressive = {k: make[k]() for k in names}
    rolling = {k: utils.Rolling(make[k], window_size=window) for k in names}
    for y, d, p in triples:
        if y is None or d is None:
            continue
        for k in names:
            value = p if k == "rocauc" else d
            progressive[k].update(y, value)
            rolling[k].update(y, value)
    return (
        {k: m.get() for k, m in progressive.items()},
        {k: m.get() for k, m in rolling.items()},
    )


@settings(max_examples=60, deadline=None)
@given(
    window=st.integers(1, 40),
    sizes=st.lists(st.integers(0, 60), min_size=1, max_size=8),
    seed=st.integers(0, 2**32 - 1),
    anomaly=st.booleans(),
)
def test_binary_and_anomaly_scores_equal_rivers_accuracy_f1_and_rocauc(
    window, sizes, seed, anomaly
):
    rng = random.Random(seed)
    scores = AnomalyScores(window) if anomaly else BinaryScores(window)
    names = scores.NAMES
    triples = []
    for size in sizes:
        batch = []
        for _ in range(size):
            # Scores outside [0, 1] too: anomaly detectors are not probabilities.
            p = rng.choice([rng.random(), rng.uniform(-1, 2), 0.0, 1.0, 0.5])
            d = None if rng.random() < 0.05 else (p if anomaly else p > 0.5)
            y = None if rng.random() < 0.05 else rng.random() < 0.3
            batch.append((y, d, p))
        triples += batch
        ys, ds, ps = ([t[i] for t in batch] for i in range(3))
        if anomaly:
            scores.update_many(ys, ds)  # the score is the prediction
        else:
            scores.update_many(ys, ds, ps)
    progressive, rolling = river_binary(triples, window, names)
    got = scores.as_dict()
    assert got["count"] == sum(1 for y, d, _ in triples if y is not None and d is not None)
    if not got["count"]:  # River says 0.0; nothing scored has no value
        assert got["progressive"] == got["rolling"] == dict.fromkeys(names)
        return
    assert got["progressive"] == progressive  # the same arithmetic: exactly equal
    assert got["rolling"] == rolling


def test_classification_scores_give_rivers_macro_f1_for_multiclass_labels():
    scores = ClassificationScores(window=3)
    y_true, y_pred = [0, 1, 2, 2, 1], [0, 2, 2, 2, 1]
    scores.update_many(y_true, y_pred)
    macro, rolling = metrics.MacroF1(), utils.Rolling(metrics.MacroF1, window_size=3)
    for t, p in zip(y_true, y_pred):
        macro.update(t, p)
        rolling.update(t, p)
    d = scores.as_dict()
    assert d["progressive"]["macro_f1"] == macro.get() != 1.0
    assert d["rolling"]["macro_f1"] == rolling.get()


@pytest.mark.parametrize(
    ("make", "pairs"),
    [
        (RegressionScores, ([None, None], [1.0, None])),
        (BinaryScores, ([None, None], [True, None], [0.9, 0.1])),
        (AnomalyScores, ([None, None], [0.3, None])),
        (ClassificationScores, ([None, None], [2, None])),
    ],
)
def test_nothing_scored_has_no_value_rather_than_zero(make, pairs):
    scores = make(window=10)
    scores.update_many(*pairs)  # predictions, but no target to score them against
    d = scores.as_dict()
    assert d["count"] == 0 and d["progressive"] and d["rolling"]
    assert set(d["progressive"].values()) == set(d["rolling"].values()) == {None}
