"""A LinearRegression fleet's edge publishes the least-squares fit of what it learned
(streampipe.fleet.leastsq): the fit is numpy's lstsq on the same rows, written for the
scaler it predicts exactly as in raw space, and the edge's update carries it, no
statistics of the readings beyond the scaler's."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from river import linear_model, preprocessing

from streampipe import codec
from streampipe.fleet.edge import FleetMember
from streampipe.fleet.leastsq import LeastSquares, to_scaler_space
from streampipe.fleet.params import apply, extract
from streampipe.fleet.update import decode_update
from streampipe.learn.spec import ModelSpec
from streampipe.models.keys import SigningKey
from streampipe.readings import Batch, Reading
from streampipe.stage import EdgeStage

NAMES = ("a", "b", "c")


def rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal([230.0, 5.0, 1e4], [3.0, 2.0, 0.5], size=(n, 3))
    y = X @ [2.0, -40.0, 9.0] - 9e4 + rng.normal(0.0, 1.0, n)
    return X, y


def lstsq(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    Z = np.column_stack([X, np.ones(len(X))])
    coef = np.linalg.lstsq(Z, y, rcond=None)[0]
    return coef[:-1], float(coef[-1])


def added(X: np.ndarray, y, sizes=(1, 7, 50)) -> LeastSquares:
    ls = LeastSquares()
    at = 0
    for size in [*sizes, len(X)]:
        ls.add(NAMES, X[at : at + size], y[at : at + size])
        at += size
    return ls


def test_the_fit_is_numpys_lstsq_on_the_same_rows_without_ridge():
    X, y = rows(300)
    w, w0 = added(X, y).fit(ridge=0.0)
    want, want0 = lstsq(X, y)
    assert [w[f] for f in NAMES] == pytest.approx(want, rel=1e-9)
    assert w0 == pytest.approx(want0, rel=1e-9)
    # the default ridge, 1e-6 of each sum of squares, barely moves it
    w, w0 = added(X, y).fit()
    assert [w[f] for f in NAMES] == pytest.approx(want, rel=1e-4)


def test_readings_without_a_target_are_not_fitted():
    X, y = rows(100)
    targets = [None if i % 3 == 0 else v for i, v in enumerate(y.tolist())]
    w, w0 = added(X, targets).fit(ridge=0.0)
    keep = np.array([t is not None for t in targets])
    want, want0 = lstsq(X[keep], y[keep])
    assert [w[f] for f in NAMES] == pytest.approx(want, rel=1e-9)
    assert w0 == pytest.approx(want0, rel=1e-9)
    assert added(X, targets).n == keep.sum()


def test_an_absent_value_counts_as_the_running_mean_and_a_new_feature_as_its_first_mean():
    X, y = rows(120, seed=1)
    ls = LeastSquares()
    ls.add(("a", "b"), X[:40, :2], y[:40])  # "c" not yet seen
    part = X[40:80].copy()
    part[::4, 1] = np.nan  # some readings lack "b"
    ls.add(NAMES, part, y[40:80])
    ls.add(NAMES, X[80:], y[80:])
    full = X.copy()
    full[:40, 2] = X[40:80, 2].mean()  # the new feature's first batch mean
    b = X[:80, 1]
    seen = np.r_[b[:40], b[40:80][np.arange(40) % 4 != 0]]
    full[40:80:4, 1] = seen.mean()  # the running mean, this batch's values included
    w, w0 = ls.fit(ridge=0.0)
    want, want0 = lstsq(full, y)
    assert [w[f] for f in NAMES] == pytest.approx(want, rel=1e-7)
    assert w0 == pytest.approx(want0, rel=1e-7)


@pytest.mark.parametrize("with_std", [True, False])
def test_the_fit_in_scaler_space_predicts_as_in_raw_space(with_std):
    X, y = rows(200, seed=2)
    X[:, 1] = 3.0  # no variance: River's scaler maps it to 0, so the fit leaves it out
    model = preprocessing.StandardScaler(with_std=with_std) | linear_model.LinearRegression()
    for x, t in zip(X.tolist(), y.tolist()):
        model.learn_one(dict(zip(NAMES, x)), t)
    params = extract(model)
    scaler = params["scaler"]
    assert not with_std or scaler["vars"]["b"] == 0.0
    drop = {f for f, v in scaler["vars"].items() if not v > 0} if with_std else set()
    raw, raw0 = added(X, y).fit(drop=drop)
    assert raw["b"] == 0.0
    weights, intercept = to_scaler_space(raw, raw0, scaler, with_std=with_std)
    fitted = apply(model.clone(), {**params, "weights": weights, "intercept": intercept})
    rng = np.random.default_rng(3)
    for x in rng.normal([230.0, 3.0, 1e4], [10.0, 1.0, 2.0], size=(50, 3)).tolist():
        want = sum(raw[f] * v for f, v in zip(NAMES, x)) + raw0
        got = fitted.predict_one(dict(zip(NAMES, x)))
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_too_many_feature_names_stop_the_fit():
    ls = LeastSquares(max_features=2)
    X, y = rows(10)
    ls.add(NAMES, X, y)
    assert ls.overflow and ls.n == 0


def test_the_statistics_pickle_for_checkpoints():
    X, y = rows(50)
    ls = added(X, y)
    back = pickle.loads(pickle.dumps(ls))
    assert back.fit() == ls.fit() and back.names == ls.names


def stage_with(spec: str) -> tuple[EdgeStage, FleetMember]:
    stage = EdgeStage("edge-1", ModelSpec.parse(spec))
    return stage, FleetMember(stage, SigningKey.generate().public, "power")


def learn(stage: EdgeStage, device: str, X: np.ndarray, y: np.ndarray, names=NAMES) -> None:
    readings = [
        Reading(device, i, 1.0 + i, dict(zip(names, x)), t)
        for i, (x, t) in enumerate(zip(X.tolist(), y.tolist()))
    ]
    stage.handle(stage.topics.readings(device), codec.encode(Batch.from_readings(readings)))


def test_an_edges_update_is_the_fit_of_all_its_devices_readings_for_its_merged_scaler():
    # Each device's "c" is constant (a chick's diet): its own scaler maps it to 0 and it
    # learns no weight of it; the pooled fit does.
    stage, member = stage_with("preprocessing.StandardScaler | linear_model.LinearRegression")
    X, y = rows(240, seed=4)
    X[:120, 2], X[120:, 2] = 0.0, 1.0
    y = X @ [2.0, -40.0, 300.0] + 7.0
    learn(stage, "d1", X[:120], y[:120])
    learn(stage, "d2", X[120:], y[120:])
    for st in stage.learner.devices.values():
        assert extract(st.model)["weights"]["c"] == 0.0
    update = decode_update(member.update().payload)
    assert update.readings == 240 and update.devices == 2
    assert set(update.params) == {"scaler", "weights", "intercept", "optimizer"}
    fleet = apply(stage.spec.build(), update.params)
    for x, t in zip(X[::7].tolist(), y[::7].tolist()):
        assert fleet.predict_one(dict(zip(NAMES, x))) == pytest.approx(t, rel=1e-4)


def test_a_logistic_regression_fleet_still_averages():
    _, member = stage_with("preprocessing.StandardScaler | linear_model.LogisticRegression")
    assert member.least_squares is None
