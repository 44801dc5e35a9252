"""What fleet learning averages: the parameters of a scaled linear model, as plain data.

Only a River ``preprocessing.StandardScaler`` followed by ``linear_model.LinearRegression``
or ``linear_model.LogisticRegression`` (or the linear model alone) can be federated: their
state is numbers per feature that can be merged. :func:`check_federable` says so for any
other step, naming it.

:data:`Params` is a msgpack-able dict; feature names are strings::

    {
        "scaler": {"counts": {f: int}, "means": {f: float}, "vars": {f: float}} | None,
        "weights": {f: float},
        "intercept": float,
        "optimizer": {"n_iterations": int, "state": {name: {f: float}}},
    }

``optimizer.state`` holds the optimizer's per-feature state where it has one (Adam's
``m`` and ``v``, AdaGrad's and RMSProp's ``g2``, Momentum's ``s``); River's default SGD
has none, only ``n_iterations`` (which a learning-rate schedule reads).

:func:`merge` combines the scalers exactly as River's ``stats.Var`` merge does (counts
add; means and variances by Chan et al.'s parallel formula), whatever the items' weights,
and everything else by a weighted mean over the items that know the feature.

>>> from river import linear_model, preprocessing
>>> model = preprocessing.StandardScaler() | linear_model.LinearRegression()
>>> for i in range(20):
...     model.learn_one({"t": float(i)}, 2.0 * i)
>>> params = extract(model)
>>> params["scaler"]["counts"], round(params["scaler"]["means"]["t"], 3)
({'t': 20}, 9.5)
>>> fresh = apply(preprocessing.StandardScaler() | linear_model.LinearRegression(), params)
>>> fresh.predict_one({"t": 3.0}) == model.predict_one({"t": 3.0})
True
>>> validate(params) is None
True
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

from river import compose, linear_model, preprocessing, utils

__all__ = [
    "DEFAULT_LIMIT",
    "REASONS",
    "NotFederable",
    "Params",
    "apply",
    "check_federable",
    "extract",
    "merge",
    "merge_scalers",
    "refusal",
    "validate",
]

Params = dict[str, Any]

#: A weight or intercept beyond this is no model an honest edge learns on scaled features.
DEFAULT_LIMIT = 1e6
#: Every reason :func:`validate` gives.
REASONS = frozenset({"malformed", "non_finite", "absurd"})

_LINEAR = (linear_model.LinearRegression, linear_model.LogisticRegression)
#: The per-feature state of the optimizers whose state can be averaged.
_OPTIMIZER_STATE: dict[str, tuple[str, ...]] = {
    "SGD": (),
    "Adam": ("m", "v"),
    "AdaGrad": ("g2",),
    "RMSProp": ("g2",),
    "Momentum": ("s",),
}
#: Optimizer state that is a running mean of squares, so never negative.
_NON_NEGATIVE_STATE = frozenset({"v", "g2"})
_HINT = "use preprocessing.StandardScaler | linear_model.LinearRegression, or LogisticRegression"
_MAX_N_ITERATIONS = 1 << 53


class NotFederable(ValueError):
    """A model that fleet learning cannot merge; ``str()`` names the step and what to use.

    >>> from river import tree
    >>> check_federable(tree.HoeffdingTreeRegressor())
    Traceback (most recent call last):
    ...
    streampipe.fleet.params.NotFederable: fleet learning averages StandardScaler and linear models only; step 'HoeffdingTreeRegressor' of the spec cannot be merged (use preprocessing.StandardScaler | linear_model.LinearRegression, or LogisticRegression)
    """  # noqa: E501

    def __init__(self, step: str, why: str = "") -> None:
        why = why or "cannot be merged"
        super().__init__(
            "fleet learning averages StandardScaler and linear models only; "
            f"step {step!r} of the spec {why} ({_HINT})"
        )
        self.step = step


def _steps(model: Any) -> list[Any]:
    if isinstance(model, compose.Pipeline):
        return list(model.steps.values())
    return [model]


def _parts(model: Any) -> tuple[preprocessing.StandardScaler | None, Any]:
    """The scaler (or None) and the linear model of a federable model; raise otherwise."""
    steps = _steps(model)
    if len(steps) > 2:
        first = next((s for s in steps if not isinstance(s, preprocessing.StandardScaler)), None)
        extra = first if first is not None else steps[1]
        raise NotFederable(type(extra).__name__)
    *head, last = steps
    for step in head:
        if type(step) is not preprocessing.StandardScaler:
            raise NotFederable(type(step).__name__)
        if step.window_size is not None:
            raise NotFederable(
                "StandardScaler", "has a window_size, whose rolling statistics cannot be merged"
            )
    if type(last) not in _LINEAR:
        raise NotFederable(type(last).__name__)
    if last.l1 != 0:
        raise NotFederable(
            type(last).__name__, "uses l1, whose per-feature penalty state cannot be merged"
        )
    opt = type(last.optimizer).__name__
    if opt not in _OPTIMIZER_STATE:
        raise NotFederable(
            f"{type(last).__name__}(optimizer={opt})",
            f"uses optimizer {opt}, whose state cannot be merged (SGD, Adam, AdaGrad, "
            "RMSProp and Momentum can)",
        )
    return (head[0] if head else None), last


def check_federable(model: Any) -> None:
    """Raise :class:`NotFederable`, naming the step, unless fleet learning can merge ``model``.

    >>> from river import linear_model, preprocessing
    >>> check_federable(preprocessing.StandardScaler() | linear_model.LogisticRegression())
    >>> check_federable(preprocessing.MinMaxScaler() | linear_model.LinearRegression())
    Traceback (most recent call last):
    ...
    streampipe.fleet.params.NotFederable: fleet learning averages StandardScaler and linear models only; step 'MinMaxScaler' of the spec cannot be merged (use preprocessing.StandardScaler | linear_model.LinearRegression, or LogisticRegression)
    """  # noqa: E501
    _parts(model)


def _features(d: Any) -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if not isinstance(k, str):
            raise NotFederable("features", f"has a feature named {k!r}, not a string")
        out[k] = v
    return out


def extract(model: Any) -> Params:
    """The parameters of a federable model, as plain data (see :data:`Params`)."""
    scaler, lin = _parts(model)
    opt = lin.optimizer
    return {
        "scaler": None
        if scaler is None
        else {
            "counts": {k: int(v) for k, v in _features(scaler.counts).items()},
            "means": {k: float(v) for k, v in _features(scaler.means).items()},
            "vars": {k: float(v) for k, v in _features(scaler.vars).items()},
        },
        "weights": {k: float(v) for k, v in _features(lin._weights).items()},
        "intercept": float(lin.intercept),
        "optimizer": {
            "n_iterations": int(opt.n_iterations),
            "state": {
                name: {k: float(v) for k, v in _features(getattr(opt, name) or {}).items()}
                for name in _OPTIMIZER_STATE[type(opt).__name__]
            },
        },
    }


def _fill(container: Any, values: dict[str, Any]) -> None:
    container.clear()
    for k, v in values.items():
        container[k] = v


def apply(model: Any, params: Params) -> Any:
    """Set a freshly built model's state to ``params`` (validated) and return the model.

    Raises :class:`ValueError` when the params do not fit the model (a scaler for a model
    without one, or the other way round, or another optimizer's state).
    """
    scaler, lin = _parts(model)
    if (scaler is None) != (params["scaler"] is None):
        has = "has no" if scaler is None else "has a"
        raise ValueError(f"the model {has} StandardScaler, the parameters do not agree")
    if scaler is not None:
        s = params["scaler"]
        scaler.counts = Counter(s["counts"])
        scaler.means = defaultdict(float, s["means"])
        scaler.vars = defaultdict(float, s["vars"])
    _fill(lin._weights, params["weights"])
    lin.intercept = params["intercept"]
    opt = lin.optimizer
    state = params.get("optimizer") or {"n_iterations": 0, "state": {}}
    names = _OPTIMIZER_STATE[type(opt).__name__]
    if set(state["state"]) != set(names):
        raise ValueError(
            f"the parameters carry optimizer state {sorted(state['state'])}, "
            f"the model's {type(opt).__name__} has {sorted(names)}"
        )
    opt.n_iterations = state["n_iterations"]
    for name in names:
        values = state["state"][name]
        if getattr(opt, name) is None:  # Adam and RMSProp make theirs at the first step
            if not values:
                continue
            setattr(opt, name, utils.VectorDict())
        _fill(getattr(opt, name), values)
    return model


def merge_scalers(scalers: list[dict[str, Any]]) -> dict[str, Any]:
    """Scaler parameters merged exactly as River's ``stats.Var.__iadd__`` merges, folded
    left over the scalers: counts add; means and variances by Chan et al.'s formula."""
    counts: dict[str, int] = {}
    means: dict[str, float] = {}
    sums: dict[str, float] = {}  # n * var: the sum of squared deviations
    with_vars: set[str] = set()
    for s in scalers:
        with_vars.update(s["vars"])
        for f, nb in s["counts"].items():
            if nb <= 0:
                continue
            mb = s["means"].get(f, 0.0)
            sb = s["vars"].get(f, 0.0) * nb
            na = counts.get(f, 0)
            if na == 0:
                counts[f], means[f], sums[f] = nb, mb, sb
                continue
            ma, n = means[f], na + nb
            sums[f] = sums[f] + sb + (ma - mb) ** 2 * na * nb / n
            means[f] = (na * ma + nb * mb) / n
            counts[f] = n
    return {
        "counts": counts,
        "means": means,
        "vars": {f: sums[f] / counts[f] for f in counts if f in with_vars},
    }


def _weighted_mean(dicts: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """Per key, the weighted mean over the dicts that have the key."""
    total: dict[str, float] = {}
    weight: dict[str, float] = {}
    for d, w in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0.0) + w * v
            weight[k] = weight.get(k, 0.0) + w
    return {k: total[k] / weight[k] if weight[k] > 0 else 0.0 for k in total}


def merge(items: list[tuple[Params, float]]) -> Params:
    """Merge parameters, each with a weight (e.g. the readings it reflects).

    Scalers merge exactly, by their own counts (the weights do not enter); weights,
    intercept and optimizer state are weighted means, per feature over the items that
    have it (an item that never saw a feature knows nothing of its weight).

    >>> a = {"scaler": {"counts": {"x": 2}, "means": {"x": 1.0}, "vars": {"x": 1.0}},
    ...      "weights": {"x": 1.0}, "intercept": 0.0}
    >>> b = {"scaler": {"counts": {"x": 2}, "means": {"x": 3.0}, "vars": {"x": 1.0}},
    ...      "weights": {"x": 3.0, "y": 5.0}, "intercept": 1.0}
    >>> m = merge([(a, 1.0), (b, 3.0)])
    >>> m["scaler"], m["weights"], m["intercept"]
    ({'counts': {'x': 4}, 'means': {'x': 2.0}, 'vars': {'x': 2.0}}, {'x': 2.5, 'y': 5.0}, 0.75)
    """
    if not items:
        raise ValueError("nothing to merge")
    scalers = [p["scaler"] for p, _ in items]
    if any(s is None for s in scalers) and not all(s is None for s in scalers):
        raise ValueError("some parameters have a scaler and some do not")
    total = sum(w for _, w in items)
    if not total > 0:
        items = [(p, 1.0) for p, _ in items]  # all weights zero: an unweighted mean
        total = float(len(items))
    opts = [(p.get("optimizer") or {"n_iterations": 0, "state": {}}, w) for p, w in items]
    names = sorted({n for o, _ in opts for n in o["state"]})
    return {
        "scaler": None if scalers[0] is None else merge_scalers(scalers),
        "weights": _weighted_mean([(p["weights"], w) for p, w in items]),
        "intercept": sum(w * p["intercept"] for p, w in items) / total,
        "optimizer": {
            "n_iterations": round(sum(w * o["n_iterations"] for o, w in opts) / total),
            "state": {
                n: _weighted_mean([(o["state"].get(n, {}), w) for o, w in opts]) for n in names
            },
        },
    }


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_map(m: Any, what: str, *, ints: bool = False) -> tuple[str, str] | None:
    if not isinstance(m, dict):
        return "malformed", f"{what} is not a map"
    for k, v in m.items():
        if not isinstance(k, str):
            return "malformed", f"{what} has a key that is not a string"
        if ints:
            if type(v) is not int:
                return "malformed", f"{what}[{k!r}] is not a whole number"
        elif not _is_number(v):
            return "malformed", f"{what}[{k!r}] is not a number"
        elif not math.isfinite(v):
            return "non_finite", f"{what}[{k!r}] is {v}"
    return None


def refusal(params: Any, limit: float = DEFAULT_LIMIT) -> tuple[str, str] | None:
    """Like :func:`validate`, with the detail: ``(reason, what is wrong)`` or None."""
    if not isinstance(params, dict):
        return "malformed", "the parameters are not a map"
    missing = {"scaler", "weights", "intercept"} - set(params)
    if missing:
        return "malformed", f"the parameters lack {', '.join(sorted(missing))}"
    s = params["scaler"]
    if s is not None:
        if not isinstance(s, dict) or set(s) != {"counts", "means", "vars"}:
            return "malformed", "the scaler is not a map of counts, means and vars"
        for part in ("counts", "means", "vars"):
            if why := _check_map(s[part], f"scaler {part}", ints=part == "counts"):
                return why
        if not set(s["means"]) <= set(s["counts"]) or not set(s["vars"]) <= set(s["counts"]):
            return "malformed", "the scaler has means or vars of features it has no count of"
        if (f := next((f for f, n in s["counts"].items() if n < 0), None)) is not None:
            return "absurd", f"scaler count of {f!r} is negative"
        if (f := next((f for f, v in s["vars"].items() if v < 0), None)) is not None:
            return "absurd", f"scaler variance of {f!r} is negative"
    if why := _check_map(params["weights"], "weights"):
        return why
    b = params["intercept"]
    if not _is_number(b):
        return "malformed", "the intercept is not a number"
    if not math.isfinite(b):
        return "non_finite", f"the intercept is {b}"
    if abs(b) > limit:
        return "absurd", f"the intercept {b:g} is beyond ±{limit:g}"
    if (f := next((f for f, w in params["weights"].items() if abs(w) > limit), None)) is not None:
        return "absurd", f"the weight of {f!r} is {params['weights'][f]:g}, beyond ±{limit:g}"
    opt = params.get("optimizer")
    if opt is None:
        return None
    if not isinstance(opt, dict) or set(opt) != {"n_iterations", "state"}:
        return "malformed", "the optimizer is not a map of n_iterations and state"
    n = opt["n_iterations"]
    if type(n) is not int or not 0 <= n <= _MAX_N_ITERATIONS:
        return "malformed", "optimizer n_iterations is not a whole number in 0..2**53"
    if not isinstance(opt["state"], dict):
        return "malformed", "the optimizer state is not a map"
    for name, values in opt["state"].items():
        if not isinstance(name, str) or len(name) > 16:
            return "malformed", "an optimizer state has a name that is not a short string"
        if why := _check_map(values, f"optimizer {name}"):
            return why
        if name in _NON_NEGATIVE_STATE and any(v < 0 for v in values.values()):
            return "absurd", f"optimizer {name} has a negative value"
    return None


def validate(params: Any, limit: float = DEFAULT_LIMIT) -> str | None:
    """Why ``params`` (untrusted, decoded) must be refused, or None if they are sound.

    The reason is one of :data:`REASONS` (:func:`refusal` adds the detail):
    ``malformed`` (not the shape of :data:`Params`), ``non_finite`` (NaN or infinity),
    ``absurd`` (a weight or intercept beyond ``±limit``, a negative count or variance).

    >>> validate({"scaler": None, "weights": {"x": float("nan")}, "intercept": 0.0})
    'non_finite'
    >>> refusal({"scaler": None, "weights": {"x": 3e9}, "intercept": 0.0})
    ('absurd', "the weight of 'x' is 3e+09, beyond ±1e+06")
    """
    why = refusal(params, limit)
    return None if why is None else why[0]
