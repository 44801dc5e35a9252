"""Fleet learning's core: parameters, their merge and checks, the update message, the
aggregator's rules (issue 21). No broker: see test_fleet_service.py for that."""

from __future__ import annotations

import math
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river import (
    anomaly,
    forest,
    linear_model,
    neighbors,
    optim,
    preprocessing,
    stats,
    tree,
)

from streampipe.fleet.aggregator import Aggregator
from streampipe.fleet.params import (
    NotFederable,
    apply,
    check_federable,
    extract,
    merge,
    merge_scalers,
    refusal,
    validate,
)
from streampipe.fleet.update import (
    REASONS,
    Update,
    UpdateError,
    canonical_spec,
    decode_update,
    encode_update,
)

SPEC = "preprocessing.StandardScaler | linear_model.LinearRegression"

FEDERABLE = {
    "scaled-linear": lambda: preprocessing.StandardScaler() | linear_model.LinearRegression(),
    "linear": lambda: linear_model.LinearRegression(optim.SGD(0.001), l2=0.01),
    "adam": lambda: linear_model.LinearRegression(optimizer=optim.Adam()),
    "rmsprop": lambda: (
        preprocessing.StandardScaler() | linear_model.LinearRegression(optimizer=optim.RMSProp())
    ),
    "logistic": lambda: preprocessing.StandardScaler() | linear_model.LogisticRegression(),
    "logistic-adagrad": lambda: linear_model.LogisticRegression(optimizer=optim.AdaGrad()),
    "logistic-momentum": lambda: (
        preprocessing.StandardScaler() | linear_model.LogisticRegression(optimizer=optim.Momentum())
    ),
    "unscaled-std": lambda: (
        preprocessing.StandardScaler(with_std=False) | linear_model.LinearRegression()
    ),
}


def stream(n: int, seed: int = 0, *, classes: bool = False, shift: float = 0.0):
    """Readings of a linear world, y = 3 x1 − 2 x2 + 5 (+ noise), or its sign."""
    rng = random.Random(seed)
    for _ in range(n):
        x = {"x1": rng.gauss(10 + shift, 3), "x2": rng.gauss(-4, 2), "x3": rng.random()}
        y = 3 * x["x1"] - 2 * x["x2"] + 5 + rng.gauss(0, 0.5)
        yield x, (y > 43 if classes else y)


def learned(make, n: int = 500, seed: int = 0, **kw):
    model = make()
    classes = "Logistic" in repr(model)
    for x, y in stream(n, seed, classes=classes, **kw):
        model.learn_one(x, y)
    return model


# -- what can be federated --------------------------------------------------------------


@pytest.mark.parametrize("make", FEDERABLE.values(), ids=FEDERABLE.keys())
def test_federable_models_pass(make):
    check_federable(make())


@pytest.mark.parametrize(
    ("model", "step"),
    [
        (tree.HoeffdingTreeRegressor(), "HoeffdingTreeRegressor"),
        (preprocessing.StandardScaler() | forest.ARFRegressor(), "ARFRegressor"),
        (neighbors.KNNRegressor(), "KNNRegressor"),
        (preprocessing.MinMaxScaler() | linear_model.LinearRegression(), "MinMaxScaler"),
        (anomaly.HalfSpaceTrees(), "HalfSpaceTrees"),
        (
            preprocessing.StandardScaler()
            | preprocessing.StandardScaler()
            | linear_model.LinearRegression(),
            "StandardScaler",
        ),
        (linear_model.LinearRegression(optimizer=optim.FTRLProximal()), "FTRLProximal"),
        (linear_model.LinearRegression(l1=0.1, l2=0), "LinearRegression"),
        (
            preprocessing.StandardScaler(window_size=10) | linear_model.LinearRegression(),
            "StandardScaler",
        ),
    ],
)
def test_other_models_are_refused_naming_the_step(model, step):
    with pytest.raises(NotFederable, match=step) as err:
        check_federable(model)
    assert "use preprocessing.StandardScaler | linear_model.LinearRegression" in str(err.value)


def test_the_refusal_reads_as_the_issue_asks():
    with pytest.raises(NotFederable) as err:
        check_federable(tree.HoeffdingTreeRegressor())
    assert str(err.value) == (
        "fleet learning averages StandardScaler and linear models only; step "
        "'HoeffdingTreeRegressor' of the spec cannot be merged (use "
        "preprocessing.StandardScaler | linear_model.LinearRegression, or LogisticRegression)"
    )


# -- extract and apply: an exact round trip ---------------------------------------------


@pytest.mark.parametrize("make", FEDERABLE.values(), ids=FEDERABLE.keys())
def test_extract_apply_round_trips_exactly_through_msgpack(make):
    model = learned(make, 300)
    params = extract(model)
    wire = msgpack.unpackb(msgpack.packb(params), raw=False)
    assert validate(wire) is None
    copy = apply(make(), wire)
    assert extract(copy) == params
    data = list(stream(200, seed=1, classes="Logistic" in repr(model)))
    predict = "predict_proba_one" if "Logistic" in repr(model) else "predict_one"
    assert [getattr(copy, predict)(x) for x, _ in data] == [
        getattr(model, predict)(x) for x, _ in data
    ]
    for x, y in data:  # and they go on learning alike, bit for bit
        model.learn_one(x, y)
        copy.learn_one(x, y)
    assert extract(copy) == extract(model)


def test_a_fresh_model_round_trips():
    make = FEDERABLE["adam"]
    assert extract(apply(make(), extract(make()))) == extract(make())


def test_apply_refuses_params_that_do_not_fit():
    params = extract(learned(FEDERABLE["scaled-linear"]))
    with pytest.raises(ValueError, match="StandardScaler"):
        apply(linear_model.LinearRegression(), params)
    with pytest.raises(ValueError, match="optimizer state"):
        apply(preprocessing.StandardScaler() | linear_model.LinearRegression(
            optimizer=optim.Adam()), params)  # fmt: skip


# -- merge ------------------------------------------------------------------------------

_values = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False)
_readings = st.lists(
    st.dictionaries(st.sampled_from(["a", "b", "c"]), _values, min_size=1), min_size=2
)


@settings(max_examples=200, deadline=None)
@given(readings=_readings, cut=st.floats(0, 1), with_std=st.booleans())
def test_scalers_of_two_halves_merge_into_the_scaler_of_the_whole(readings, cut, with_std):
    k = round(cut * len(readings))

    def scaler(rows):
        s = preprocessing.StandardScaler(with_std=with_std)
        for x in rows:
            s.learn_one(x)
        return {
            "counts": dict(s.counts),
            "means": dict(s.means),
            "vars": dict(s.vars),
        }

    whole = scaler(readings)
    merged = merge_scalers([scaler(readings[:k]), scaler(readings[k:])])
    assert merged["counts"] == whole["counts"]
    assert set(merged["vars"]) == set(whole["vars"])
    for part in ("means", "vars"):
        for f, v in whole[part].items():
            scale = max(1.0, abs(v), *(abs(x[f]) for x in readings if f in x))
            assert merged[part][f] == pytest.approx(v, rel=1e-9, abs=1e-9 * scale**2)


def test_scalers_merge_as_rivers_stats_merge():
    rng = random.Random(3)
    parts = [[rng.gauss(i, i + 1) for _ in range(50 + 10 * i)] for i in range(4)]
    scalers, var = [], stats.Var(ddof=0)
    for xs in parts:
        s, v = preprocessing.StandardScaler(), stats.Var(ddof=0)
        for x in xs:
            s.learn_one({"x": x})
            v.update(x)
        scalers.append({"counts": dict(s.counts), "means": dict(s.means), "vars": dict(s.vars)})
        var += v
    merged = merge_scalers(scalers)
    assert merged["counts"]["x"] == var.n
    assert merged["means"]["x"] == pytest.approx(var.mean.get(), rel=1e-12)
    assert merged["vars"]["x"] == pytest.approx(var.get(), rel=1e-12)


def test_merge_weights_the_linear_part_and_counts_the_scaler():
    a = extract(learned(FEDERABLE["scaled-linear"], 200, seed=1))
    b = extract(learned(FEDERABLE["scaled-linear"], 600, seed=2))
    m = merge([(a, 200.0), (b, 600.0)])
    assert m["scaler"]["counts"] == {"x1": 800, "x2": 800, "x3": 800}
    for f in a["weights"]:
        assert m["weights"][f] == pytest.approx((a["weights"][f] + 3 * b["weights"][f]) / 4)
    assert m["intercept"] == pytest.approx((a["intercept"] + 3 * b["intercept"]) / 4)
    assert validate(m) is None
    assert merge([(a, 1.0)]) == {**a, "scaler": merge_scalers([a["scaler"]])}
    with pytest.raises(ValueError):
        merge([])


# -- validate ---------------------------------------------------------------------------


def _good():
    return extract(learned(FEDERABLE["scaled-linear"], 100))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda p: p["weights"].update(x1=math.nan), "non_finite"),
        (lambda p: p["weights"].update(x1=math.inf), "non_finite"),
        (lambda p: p.update(intercept=-math.inf), "non_finite"),
        (lambda p: p["scaler"]["means"].update(x1=math.nan), "non_finite"),
        (lambda p: p["weights"].update(x1=2e6), "absurd"),
        (lambda p: p.update(intercept=-5e6), "absurd"),
        (lambda p: p["scaler"]["vars"].update(x1=-1.0), "absurd"),
        (lambda p: p["scaler"]["counts"].update(x1=-3), "absurd"),
        (lambda p: p["optimizer"]["state"].update(g2={"x1": -1.0}), "absurd"),
        (lambda p: p["scaler"]["counts"].update(x1=1.5), "malformed"),
        (lambda p: p["scaler"]["means"].update(zz=1.0), "malformed"),
        (lambda p: p["weights"].update(x1="1"), "malformed"),
        (lambda p: p["weights"].update(x1=True), "malformed"),
        (lambda p: p.pop("weights"), "malformed"),
        (lambda p: p.update(scaler=[1, 2]), "malformed"),
        (lambda p: p["optimizer"].update(n_iterations=-1), "malformed"),
    ],
)
def test_validate_names_what_is_wrong(change, reason):
    p = _good()
    assert validate(p) is None
    change(p)
    assert validate(p) == reason
    assert refusal(p)[0] == reason and refusal(p)[1]


@pytest.mark.parametrize("params", [None, 1, [], "x", {}, {"scaler": None}])
def test_validate_calls_nonsense_malformed(params):
    assert validate(params) == "malformed"


def test_validate_takes_its_limit():
    p = _good()
    p["weights"]["x1"] = 50.0
    assert validate(p, limit=10) == "absurd"
    assert validate(p) is None


# -- the update message -----------------------------------------------------------------


def _update(**kw):
    fields = {
        "fleet": "power",
        "stage": "edge-1",
        "spec": canonical_spec(SPEC),
        "seq": 1,
        "base": 0,
        "readings": 100,
        "devices": 2,
        "params": _good(),
        "ts": 1_700_000_000.0,
    }
    return {**fields, **kw}


def test_an_update_round_trips():
    fields = _update()
    u = decode_update(encode_update(**fields), fleet="power", spec=fields["spec"], stage="edge-1")
    assert u == Update(**fields)


def test_canonical_spec_ignores_spacing():
    assert canonical_spec(" preprocessing.StandardScaler|linear_model.LinearRegression ") == SPEC
    with pytest.raises(ValueError):
        canonical_spec("os.system('x')")


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"fleet": "heat"}, "wrong_fleet"),
        ({"spec": "linear_model.LinearRegression"}, "wrong_spec"),
        ({"stage": "edge-2"}, "wrong_stage"),
        ({"max_bytes": 100}, "too_large"),
    ],
)
def test_decode_refuses_updates_that_are_not_for_us(kwargs, reason):
    data = encode_update(**_update())
    expect = {"fleet": "power", "spec": canonical_spec(SPEC), "stage": "edge-1"}
    with pytest.raises(UpdateError) as err:
        decode_update(data, **{**expect, **kwargs})
    assert err.value.reason == reason


def test_decode_refuses_bad_params_and_fields():
    bad = _update()
    bad["params"]["weights"]["x1"] = math.nan
    data = msgpack.packb({"v": 1, **bad})
    with pytest.raises(UpdateError) as err:
        decode_update(data)
    assert err.value.reason == "non_finite"
    with pytest.raises(UpdateError, match="non_finite"):
        encode_update(**bad)
    for field, value in [("seq", -1), ("readings", 1.5), ("stage", "a/b"), ("v", 2), ("ts", None)]:
        data = msgpack.packb({"v": 1, **_update(), field: value})
        with pytest.raises(UpdateError) as err:
            decode_update(data)
        assert err.value.reason == "malformed", field


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_of_any_bytes_raises_only_update_error(data):
    try:
        decode_update(data)
    except UpdateError as exc:
        assert exc.reason in REASONS


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=20,
    )
)
def test_decode_of_any_msgpack_raises_only_update_error(obj):
    for value in (obj, {"v": 1, **_update(), "params": obj}):
        try:
            decode_update(msgpack.packb(value))
        except UpdateError as exc:
            assert exc.reason in REASONS


# -- the aggregator ---------------------------------------------------------------------


def edge_update(stage, model, *, readings=2000, seq=1, base=0, spec=SPEC, scale=1.0):
    params = extract(model)
    params["weights"] = {f: w * scale for f, w in params["weights"].items()}
    return Update("power", stage, canonical_spec(spec), seq, base, readings, 1, params, 0.0)


@pytest.fixture(scope="module")
def honest():
    make = FEDERABLE["scaled-linear"]
    return [learned(make, 2000, seed=s) for s in range(3)]


def _distance(a, b):
    """Relative distance of two parameter sets' linear parts."""
    keys = sorted(b["weights"])
    va = [a["weights"][k] for k in keys] + [a["intercept"]]
    vb = [b["weights"][k] for k in keys] + [b["intercept"]]
    return math.dist(va, vb) / math.hypot(*vb)


@pytest.mark.parametrize("attack", ["x1000", "nan", "x1000-huge-count"])
def test_one_bad_edge_cannot_steer_the_fleet(honest, attack):
    good = Aggregator(SPEC)
    for i, m in enumerate(honest):
        assert good.add(edge_update(f"edge-{i}", m)) is None
    target = good.combine()

    agg = Aggregator(SPEC)
    for i, m in enumerate(honest):
        agg.add(edge_update(f"edge-{i}", m))
    bad = edge_update("evil", honest[0], scale=1000.0, readings=2000)
    if attack == "nan":
        bad.params["weights"]["x2"] = math.nan
    if attack == "x1000-huge-count":
        bad = edge_update("evil", honest[0], scale=1000.0, readings=10**12)
    why = agg.add(bad)
    if attack == "nan":
        assert why == "non_finite"
        assert agg.refused == {"non_finite": 1}
        assert "evil" not in agg.latest
    else:
        assert why is None  # large, but not absurd: the rule has to deal with it
    assert _distance(agg.combine(), target) < 0.05
    # The plain mean is steered: the robust rule is what saves the fleet.
    if attack != "nan":
        agg.rule = "mean"
        assert _distance(agg.combine(), target) > 1


def test_absurd_weights_are_refused_and_counted(honest):
    agg = Aggregator(SPEC)
    assert agg.add(edge_update("evil", honest[0], scale=1e7)) == "absurd"
    assert agg.add(edge_update("evil", honest[0], scale=1e7, seq=2)) == "absurd"
    assert agg.refused == {"absurd": 2}
    assert not agg.latest


def test_auto_is_the_weighted_mean_for_two_edges(honest):
    """With two edges the fleet model is their readings-weighted mean as models of the
    features in their own units: it predicts the weighted mean of their predictions,
    each edge's model with its own scaler (averaged in each edge's scaled units, an
    intercept made at one edge's means was mixed with another's)."""
    agg = Aggregator(SPEC)
    agg.add(edge_update("a", honest[0], readings=100))
    agg.add(edge_update("b", honest[1], readings=300))
    got = agg.combine()
    assert got["scaler"] == merge([(extract(honest[0]), 100), (extract(honest[1]), 300)])["scaler"]
    fleet = agg.build(got)
    for x, _ in stream(20, 7):
        expected = (100 * honest[0].predict_one(x) + 300 * honest[1].predict_one(x)) / 400
        assert fleet.predict_one(x) == pytest.approx(expected, rel=1e-9)


def test_the_scaler_is_merged_exactly_whatever_the_rule(honest):
    agg = Aggregator(SPEC, rule="median")
    for i, m in enumerate(honest):
        agg.add(edge_update(f"edge-{i}", m))
    assert agg.combine()["scaler"] == merge_scalers([extract(m)["scaler"] for m in honest])


def test_rules_on_one_coordinate():
    def combined(rule, values, weights=None):
        agg = Aggregator("linear_model.LinearRegression", rule=rule)
        for i, v in enumerate(values):
            params = {"scaler": None, "weights": {"x": v}, "intercept": 0.0}
            readings = 1 if weights is None else weights[i]
            agg.add(Update("power", f"e{i}", agg.spec or "linear_model.LinearRegression",
                           1, 0, readings, 1, params, 0.0))  # fmt: skip
        return agg.combine()["weights"]["x"]

    values = [1.0, 2.0, 3.0, 4.0, 100.0]
    assert combined("mean", values) == pytest.approx(22.0)
    assert combined("median", values) == 3.0
    assert combined("trimmed-mean", values) == pytest.approx(3.0)  # 1 and 100 cut off
    assert combined("auto", values) == pytest.approx(3.0)
    assert combined("auto", [1.0, 3.0], [1, 3]) == pytest.approx(2.5)  # two: the mean
    assert combined("median", [1.0, 2.0, 3.0, 4.0]) == 2.5
    assert combined("median", [1.0, 2.0, 3.0], [1, 1, 5]) == 3.0
    assert combined("mean", [1.0, 5.0], [0, 0]) == 3.0  # nobody learned: all alike


def test_stale_updates_weigh_less(honest):
    agg = Aggregator(SPEC, rule="mean")
    agg.add(edge_update("fresh", honest[0], base=9), version_now=10)
    agg.add(edge_update("stale", honest[1], base=1), version_now=10)
    weights = {c.stage: c for c in agg.contributions()}
    assert weights["fresh"].staleness == 1 and weights["stale"].staleness == 9
    assert weights["stale"].weight == pytest.approx(2000 * 10**-0.5)
    assert weights["fresh"].weight == pytest.approx(2000 * 2**-0.5)
    share = (2**-0.5) / (2**-0.5 + 10**-0.5)
    x = dict(next(iter(stream(1, 11)))[0])

    def mixed(share: float) -> float:  # the fleet predicts the weighted mean of the two
        return share * honest[0].predict_one(x) + (1 - share) * honest[1].predict_one(x)

    assert agg.build(agg.combine()).predict_one(x) == pytest.approx(mixed(share), rel=1e-9)
    # with no discount, the two weigh alike
    agg.staleness_exponent = 0
    assert agg.build(agg.combine()).predict_one(x) == pytest.approx(mixed(0.5), rel=1e-9)


def test_a_stage_counts_once_and_its_newer_update_replaces_the_older(honest):
    agg = Aggregator(SPEC)
    agg.add(edge_update("a", honest[0], seq=1))
    agg.add(edge_update("b", honest[1], seq=1))
    before = agg.combine()
    assert agg.add(edge_update("a", honest[0], seq=1)) == "duplicate"  # redelivered
    assert agg.add(edge_update("a", honest[0], seq=0)) == "duplicate"  # older
    assert agg.combine() == before
    assert agg.add(edge_update("a", honest[2], seq=2)) is None  # the edge returns
    assert len(agg.latest) == 2 and agg.latest["a"].seq == 2
    only = Aggregator(SPEC)
    only.add(edge_update("a", honest[2]))
    only.add(edge_update("b", honest[1]))
    assert agg.combine() == only.combine()
    assert agg.combine()["scaler"]["counts"]["x1"] == 4000  # not 6000


def test_the_spec_comes_from_the_first_valid_update(honest):
    agg = Aggregator()
    tree_spec = "tree.HoeffdingTreeRegressor"
    u = Update("power", "t", tree_spec, 1, 0, 1, 1, extract(honest[0]), 0.0)
    assert agg.add(u) == "wrong_spec" and agg.spec is None
    assert agg.add(edge_update("a", honest[0])) is None
    assert agg.spec == SPEC and agg.kind == "regressor"
    other = edge_update("b", learned(FEDERABLE["linear"]), spec="linear_model.LinearRegression")
    assert agg.add(other) == "wrong_spec"
    misfit = edge_update("c", honest[0])
    misfit.params["scaler"] = None  # the spec has a scaler
    assert agg.add(misfit) == "malformed"
    assert agg.refused == {"wrong_spec": 2, "malformed": 1}


def test_an_aggregator_refuses_a_spec_it_cannot_federate():
    with pytest.raises(NotFederable, match="HoeffdingTreeRegressor"):
        Aggregator("tree.HoeffdingTreeRegressor")


def test_stages_are_bounded(honest):
    agg = Aggregator(SPEC, max_stages=2)
    assert agg.add(edge_update("a", honest[0])) is None
    assert agg.add(edge_update("b", honest[0])) is None
    assert agg.add(edge_update("c", honest[0])) == "too_many_stages"
    assert agg.add(edge_update("a", honest[1], seq=2)) is None  # a known stage still may


def test_the_fleet_model_predicts_as_its_params(honest):
    agg = Aggregator(SPEC)
    for i, m in enumerate(honest):
        agg.add(edge_update(f"edge-{i}", m))
    params = agg.combine()
    model = agg.build(params)
    assert extract(model) == params
    for x, y in stream(200, seed=9):
        assert model.predict_one(x) == pytest.approx(y, abs=3)
