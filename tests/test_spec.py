"""Model specs: good ones build the model they say, bad ones fail with a clear message."""

from __future__ import annotations

import builtins
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river import base, datasets, evaluate, linear_model, metrics, optim, preprocessing

from streampipe.learn.spec import (
    DEFAULT_MODEL_SPEC,
    MAX_NESTING,
    MAX_SPEC_CHARS,
    ModelSpec,
    ModelSpecError,
    model_kind,
    parse_model_spec,
)

# (spec, kind, name)
GOOD = [
    (DEFAULT_MODEL_SPEC, "regressor", "StandardScaler|LinearRegression"),
    (
        "preprocessing.StandardScaler | linear_model.LinearRegression(l2=0.01)",
        "regressor",
        "StandardScaler|LinearRegression",
    ),
    (
        "river.preprocessing.StandardScaler | river.linear_model.LinearRegression",
        "regressor",
        "StandardScaler|LinearRegression",
    ),
    (
        "preprocessing.StandardScaler | linear_model.LinearRegression("
        "optimizer=optim.SGD(0.01), loss=optim.losses.Huber(epsilon=0.5), intercept_lr=-0.0)",
        "regressor",
        "StandardScaler|LinearRegression",
    ),
    (
        "linear_model.LinearRegression(optimizer=optim.SGD(lr=optim.schedulers.InverseScaling(0.1)))",
        "regressor",
        "LinearRegression",
    ),
    (
        "(preprocessing.StandardScaler + feature_extraction.PolynomialExtender(degree=2))"
        " | linear_model.LinearRegression",
        "regressor",
        "(StandardScaler+PolynomialExtender)|LinearRegression",
    ),
    (
        "compose.Select('temp', 'rh') | preprocessing.MinMaxScaler | preprocessing.StandardScaler"
        " | tree.HoeffdingTreeRegressor(grace_period=50, splitter=tree.splitter.QOSplitter())",
        "regressor",
        "Select|MinMaxScaler|StandardScaler|HoeffdingTreeRegressor",
    ),
    (
        "preprocessing.TargetStandardScaler(regressor=linear_model.LinearRegression())",
        "regressor",
        "TargetStandardScaler(LinearRegression)",
    ),
    (
        "forest.ARFRegressor(n_models=3, seed=1, metric=metrics.MAE())",
        "regressor",
        "ARFRegressor",
    ),
    (
        "preprocessing.StandardScaler | linear_model.LogisticRegression",
        "classifier",
        "StandardScaler|LogisticRegression",
    ),
    (
        "ensemble.VotingClassifier([tree.HoeffdingTreeClassifier(), naive_bayes.GaussianNB()])",
        "classifier",
        "VotingClassifier(HoeffdingTreeClassifier,GaussianNB)",
    ),
    (
        "drift.DriftRetrainingClassifier(tree.HoeffdingTreeClassifier, drift.binary.DDM())",
        "classifier",
        "DriftRetrainingClassifier(HoeffdingTreeClassifier)",
    ),
    (
        "preprocessing.MinMaxScaler | anomaly.HalfSpaceTrees(seed=42)",
        "anomaly",
        "MinMaxScaler|HalfSpaceTrees",
    ),
    (
        "anomaly.QuantileFilter(anomaly.HalfSpaceTrees(seed=42), q=0.95)",
        "anomaly",
        "QuantileFilter(HalfSpaceTrees)",
    ),
    ("anomaly.GaussianScorer", "anomaly", "GaussianScorer"),
    (
        "compose.Renamer({'t': 'temp'}) | neighbors.KNNRegressor(n_neighbors=3, "
        "engine=neighbors.LazySearch(window_size=(50)))",
        "regressor",
        "Renamer|KNNRegressor",
    ),
]

# (spec, a fragment the message must contain)
BAD = [
    ("__import__('os')", "private or dunder name '__import__'"),
    ("__import__('os').system('true')", "expected module.Class"),
    ("os.system", "unknown River module 'os'"),
    ("os.system('true')", "unknown River module 'os'"),
    ("river.os.system", "unknown River module 'os'"),
    ("preprocessing.StandardScaler.__class__", "dunder name '__class__'"),
    ("preprocessing.StandardScaler.clone()", "goes deeper than module.Class"),
    ("preprocessing.StandardScaler().learn_one({})", "expected module.Class, found a call"),
    ("preprocessing.StandardScaler()()", "a call on a call"),
    ("open", "bare name 'open'"),
    ("open('/etc/passwd')", "bare name 'open'"),
    ("preprocessing", "bare name 'preprocessing'"),
    ("preprocessing.StandardScalar", "did you mean 'StandardScaler'"),
    ("linear_models.LinearRegression", "did you mean 'linear_model'"),
    ("preprocessing._private", "private or dunder name '_private'"),
    ("compose.FuncTransformer(1)", "'FuncTransformer' is not a River class allowed in compose"),
    ("compose.learn_during_predict()", "not a River class allowed in compose"),
    ("tree.splitter.Splitter", "not a River class allowed in tree.splitter"),  # abstract
    ("tree.base.Leaf", "goes deeper than module.Class"),
    ("datasets.TrumpApproval", "unknown River module 'datasets'"),
    ("linear_model.LinearRegression(nope=1)", "unexpected keyword argument 'nope'"),
    ("linear_model.LinearRegression(l2=x)", "bare name 'x' as argument 'l2'"),
    ("linear_model.LinearRegression(l2=1 + 1)", "arithmetic in argument 'l2'"),
    ("linear_model.LinearRegression(l2=2 ** 1000)", "arithmetic in argument 'l2'"),
    ("linear_model.LinearRegression(l2=-True)", "a sign may only precede a number"),
    ("linear_model.LinearRegression(l2=b'1')", "bytes literals are not allowed"),
    ("linear_model.LinearRegression(l2=f'{x}')", "found an f-string"),
    ("linear_model.LinearRegression(*args)", "starred arguments"),
    ("linear_model.LinearRegression(**{'l2': 1})", "'**' arguments"),
    ("linear_model.LinearRegression(l2={**d})", "'**' in a dict"),
    ("linear_model.LinearRegression(l2={optim.SGD(): 1})", "dict keys must be literals"),
    ("lambda: 1", "found a lambda"),
    ("linear_model.LinearRegression(optimizer=lambda: 1)", "found a lambda"),
    ("[m for m in preprocessing]", "found a comprehension"),
    ("preprocessing.StandardScaler[0]", "found a subscript"),
    ("preprocessing.StandardScaler - linear_model.LinearRegression", "only '|'"),
    ("linear_model.LinearRegression | preprocessing.StandardScaler", "is not a transformer"),
    ("linear_model.LinearRegression + preprocessing.StandardScaler", "joined with '+'"),
    ("preprocessing.StandardScaler", "must end in a regressor, classifier or anomaly"),
    ("optim.SGD(0.01)", "must end in a regressor, classifier or anomaly"),
    ("linear_model.LinearRegression(", "not valid syntax at column 30"),
    ("(" * 300 + "linear_model.LinearRegression" + ")" * 300, "not valid syntax"),
    (
        "linear_model.LinearRegression(l2=" + "[" * 40 + "]" * 40 + ")",
        f"nested more than {MAX_NESTING} levels",
    ),
    (
        "anomaly.QuantileFilter(" * 20 + "anomaly.HalfSpaceTrees" + ")" * 20,
        f"nested more than {MAX_NESTING} levels",
    ),
    ("x" * (MAX_SPEC_CHARS + 1), f"the limit is {MAX_SPEC_CHARS}"),
    ("", "model spec is empty"),
    ("  \n ", "model spec is empty"),
    ("preprocessing.StandardScaler\x00", "not valid syntax"),
]

READINGS = [({"temp": 20.0 + i, "rh": 40.0 - i % 3}, 1.5 * i) for i in range(30)]


def _exercise(model: base.Estimator, kind: str) -> list[float | bool | None]:
    """Learn the readings online and return what the model said before each one."""
    said: list[float | bool | None] = []
    for x, y in READINGS:
        if kind == "anomaly":
            supervised = model._supervised
            said.append(model.score_one(x, y) if supervised else model.score_one(x))
            model.learn_one(x, y) if supervised else model.learn_one(x)
        else:
            target = y > 20 if kind == "classifier" else y
            said.append(model.predict_one(x))
            model.learn_one(x, target)
    return said


@pytest.mark.parametrize(("text", "kind", "name"), GOOD, ids=[g[2] for g in GOOD])
def test_good_spec_builds_fresh_models_of_its_kind(text: str, kind: str, name: str) -> None:
    spec = ModelSpec.parse(text)
    assert (spec.text, spec.name, spec.kind) == (text, name, kind)
    model = parse_model_spec(text)
    assert isinstance(model, base.Estimator)
    assert model_kind(model) == kind

    first, second = spec.build(), spec.build()
    assert first is not second
    assert repr(first) == repr(second) == repr(model)
    learned = _exercise(first, kind)
    assert _exercise(second, kind) == learned  # the first model's learning left no trace
    assert _exercise(spec.build(), kind) == learned


@pytest.mark.parametrize(("text", "fragment"), BAD, ids=[repr(b[0])[:40] for b in BAD])
def test_bad_spec_fails_with_a_one_line_message(text: str, fragment: str) -> None:
    with pytest.raises(ModelSpecError) as caught:
        ModelSpec.parse(text)
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message
    with pytest.raises(ModelSpecError):
        parse_model_spec(text)


def test_error_says_where() -> None:
    with pytest.raises(ModelSpecError, match=r"at column 34 of model spec: 'x'"):
        parse_model_spec("linear_model.LinearRegression(l2=x)")
    with pytest.raises(ModelSpecError, match=r"allowed: anomaly, bandit, compose"):
        parse_model_spec("os.system")


def test_default_spec_learns_exactly_like_the_hand_built_model() -> None:
    def mae(model: base.Estimator) -> float:
        return evaluate.progressive_val_score(datasets.TrumpApproval(), model, metrics.MAE()).get()

    by_hand = mae(preprocessing.StandardScaler() | linear_model.LinearRegression())
    from_spec = mae(ModelSpec.parse(DEFAULT_MODEL_SPEC).build())
    assert from_spec == by_hand
    assert math.isclose(from_spec, 1.314548, abs_tol=1e-6)


def test_arguments_reach_the_constructor() -> None:
    model = parse_model_spec(
        "linear_model.LinearRegression(l2=0.01, intercept_lr=-0.5, "
        "optimizer=optim.SGD(0.05), loss=optim.losses.Huber(epsilon=0.5))"
    )
    assert model.l2 == 0.01
    assert model.intercept_lr.learning_rate == -0.5
    assert isinstance(model.optimizer, optim.SGD)
    assert model.optimizer.learning_rate == 0.05
    assert model.loss.epsilon == 0.5


def test_mutable_arguments_are_not_shared_between_builds() -> None:
    spec = ModelSpec.parse("compose.Renamer({'t': 'temp'}) | linear_model.LinearRegression")
    first, second = spec.build(), spec.build()
    assert first["Renamer"].mapping == second["Renamer"].mapping == {"t": "temp"}
    assert first["Renamer"].mapping is not second["Renamer"].mapping


def test_spec_is_a_value() -> None:
    spec = ModelSpec.parse(DEFAULT_MODEL_SPEC)
    assert spec == ModelSpec.parse(DEFAULT_MODEL_SPEC)
    assert ModelSpec(DEFAULT_MODEL_SPEC, name="baseline").name == "baseline"
    with pytest.raises(AttributeError):
        spec.text = "other"  # type: ignore[misc]
    with pytest.raises(ModelSpecError):
        ModelSpec("os.system")  # the constructor validates too


def test_model_kind_refuses_non_learners() -> None:
    with pytest.raises(ValueError, match="StandardScaler is not a regressor"):
        model_kind(preprocessing.StandardScaler())


def test_parsing_never_evaluates(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("model specs must never be evaluated")

    # ast.parse needs compile(), and pytest needs __import__; eval and exec can go.
    for name in ("eval", "exec"):
        monkeypatch.setattr(builtins, name, refuse)
    assert ModelSpec.parse(GOOD[3][0]).kind == "regressor"
    with pytest.raises(ModelSpecError):
        parse_model_spec("__import__('os')")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_model_spec_error(text: str) -> None:
    try:
        ModelSpec.parse(text)
    except ModelSpecError as exc:
        assert "\n" not in str(exc)


_TOKENS = [
    "preprocessing.StandardScaler",
    "linear_model.LinearRegression",
    "anomaly.HalfSpaceTrees",
    "optim.SGD",
    "os.system",
    "__class__",
    "(",
    ")",
    "|",
    "+",
    "-",
    ",",
    "=",
    ".",
    "l2",
    "0.01",
    "'a'",
    "[",
    "]",
    "{",
    "}",
    ":",
    "*",
    "**",
    "lambda",
    "None",
    "True",
    " ",
]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(_TOKENS), max_size=25).map("".join))
def test_near_miss_specs_raise_only_model_spec_error(text: str) -> None:
    try:
        ModelSpec.parse(text)
    except ModelSpecError as exc:
        assert "\n" not in str(exc)
