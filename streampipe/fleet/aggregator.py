"""Combining the edges' updates into the fleet's parameters, asynchronously and robustly.

The aggregator keeps the *latest* update of each stage, nothing older: an update is
never applied twice, and an edge that returns after a while replaces its own old
update rather than adding to it. :meth:`Aggregator.combine` merges what it keeps:

- the scalers exactly, by their counts (River's ``stats`` merge), whatever the rule;
- the linear part (weights, intercept, optimizer state) coordinate-wise, each edge
  weighted by ``readings × (1 + staleness) ** -staleness_exponent`` (FedAsync's
  polynomial staleness discount, Xie et al. 2019), where staleness is how many fleet
  versions were published since the one the update was made from (``version − base``);
- by the rule: ``mean`` (weighted), ``trimmed-mean`` (per coordinate, drop the ``trim``
  share of the lowest and of the highest values, at least one each side, then the
  weighted mean; Yin et al. 2018), ``median`` (weighted, per coordinate), or ``auto``:
  the weighted mean for one or two edges, the trimmed mean for more. An edge that
  publishes weights ×1,000 then moves no coordinate past the honest edges' values.

Updates that reflect no readings are kept but carry no weight. Refused updates are
counted by reason in :attr:`Aggregator.refused`.

>>> from river import linear_model
>>> from streampipe.fleet.update import Update
>>> def update(stage, w, readings=100, base=0):
...     params = {"scaler": None, "weights": {"x": w}, "intercept": 0.0}
...     return Update("power", stage, "linear_model.LinearRegression", 1, base, readings, 1,
...                   params, 0.0)
>>> agg = Aggregator("linear_model.LinearRegression")
>>> for i, w in enumerate([1.0, 1.1, 0.9]):
...     agg.add(update(f"edge-{i}", w), version_now=0)
>>> agg.add(update("evil", 900.0), version_now=0)
>>> round(agg.combine()["weights"]["x"], 6)
1.05
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from streampipe.fleet import RULES
from streampipe.fleet.leastsq import from_scaler_space, to_scaler_space
from streampipe.fleet.params import (
    DEFAULT_LIMIT,
    NotFederable,
    Params,
    apply,
    check_federable,
    merge_scalers,
    refusal,
)
from streampipe.fleet.update import Update, canonical_spec

__all__ = ["MAX_STAGES", "REFUSALS", "RULES", "Aggregator", "Contribution", "Rule"]

Rule = Literal["auto", "mean", "trimmed-mean", "median"]
#: Stages whose updates one aggregator keeps. Beyond it a new stage is refused
#: (``too_many_stages``): each costs its parameters in memory and in every combination.
MAX_STAGES = 1000
#: Reasons :meth:`Aggregator.add` gives beside those of decoding an update.
REFUSALS = frozenset(
    {
        "wrong_spec",  # another model than the fleet's, or one that cannot be federated
        "malformed",  # parameters that do not fit the fleet's model
        "non_finite",
        "absurd",
        "duplicate",  # a seq not newer than the stage's latest: already applied
        "too_many_stages",
    }
)


@dataclass(frozen=True, slots=True)
class Contribution:
    """What one stage's latest update weighs in the combination."""

    stage: str
    readings: int
    staleness: int
    weight: float


class Aggregator:
    """The fleet's parameters from the latest update of each edge stage.

    ``spec`` is the fleet's model spec (None: the spec of the first update accepted).
    Not thread-safe: one owner (the service's worker thread) calls everything.
    """

    def __init__(
        self,
        spec: str | None = None,
        rule: Rule = "auto",
        trim: float = 0.2,
        staleness_exponent: float = 0.5,
        *,
        limit: float = DEFAULT_LIMIT,
        max_stages: int = MAX_STAGES,
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, not {rule!r}")
        if not 0 <= trim < 0.5:
            raise ValueError("trim is the share cut off each side: from 0 up to 0.5")
        if not staleness_exponent >= 0:
            raise ValueError("staleness_exponent must be 0 or more")
        self.rule = rule
        self.trim = trim
        self.staleness_exponent = staleness_exponent
        self.limit = limit
        self.max_stages = max_stages
        self.spec: str | None = None
        self._model_spec: Any = None
        if spec is not None:
            self._set_spec(spec)  # raises ModelSpecError or NotFederable: the user's to fix
        self.latest: dict[str, Update] = {}
        #: The highest fleet version seen by :meth:`add`; staleness is counted from it.
        self.version = 0
        self.refused: Counter[str] = Counter()

    def _set_spec(self, spec: str) -> None:
        from streampipe.learn.spec import ModelSpec

        text = canonical_spec(spec)
        model_spec = ModelSpec.parse(text)
        model = model_spec.build()
        check_federable(model)
        self.spec, self._model_spec = text, model_spec
        steps = getattr(model, "steps", {})
        #: Whether the spec's scaler divides by the standard deviation (River's default).
        self._with_std = all(getattr(s, "with_std", True) for s in getattr(steps, "values", dict)())

    @property
    def kind(self) -> str:
        """The fleet model's kind (regressor, classifier), once the spec is known."""
        if self._model_spec is None:
            raise LookupError("no spec yet")
        return str(self._model_spec.kind)

    def build(self, params: Params | None = None) -> Any:
        """A fresh model of the fleet's spec, with ``params`` applied if given."""
        if self._model_spec is None:
            raise LookupError("no spec yet: no update accepted and none given")
        model = self._model_spec.build()
        return model if params is None else apply(model, params)

    def add(self, update: Update, version_now: int | None = None) -> str | None:
        """Keep ``update`` as its stage's latest; the refusal reason, or None if kept.

        ``version_now`` is the fleet model version published now (staleness counts from it).
        """
        if version_now is not None:
            self.version = max(self.version, version_now)
        why = self._refusal(update)
        if why is not None:
            self.refused[why] += 1
            return why
        self.latest[update.stage] = update
        return None

    def _refusal(self, update: Update) -> str | None:
        if self.spec is None:
            try:
                self._set_spec(update.spec)
            except (ValueError, NotFederable):  # ModelSpecError is a ValueError
                return "wrong_spec"
        elif update.spec != self.spec:
            return "wrong_spec"
        why = refusal(update.params, self.limit)
        if why is not None:
            return why[0]
        try:
            self.build(update.params)
        except (ValueError, KeyError, TypeError):  # a scaler the spec has not, say
            return "malformed"
        old = self.latest.get(update.stage)
        if old is not None and update.seq <= old.seq:
            return "duplicate"
        if old is None and len(self.latest) >= self.max_stages:
            return "too_many_stages"
        return None

    def forget(self, stage: str) -> bool:
        """Drop a stage's update (an edge retired for good); whether there was one."""
        return self.latest.pop(stage, None) is not None

    def contributions(self, version_now: int | None = None) -> list[Contribution]:
        """Each kept update's staleness and weight, by stage."""
        now = self.version if version_now is None else version_now
        out = []
        for stage, u in sorted(self.latest.items()):
            staleness = max(0, now - u.base)  # a base from the future: not stale
            weight = u.readings * (1.0 + staleness) ** -self.staleness_exponent
            out.append(Contribution(stage, u.readings, staleness, weight))
        return out

    def combine(self, version_now: int | None = None) -> Params:
        """The fleet's parameters from the kept updates (see the module's docs)."""
        if not self.latest:
            raise LookupError("no update to combine")
        contribs = {c.stage: c for c in self.contributions(version_now)}
        items = [(self.latest[s].params, c.weight) for s, c in contribs.items()]
        counted = [(p, w) for p, w in items if w > 0]
        if not counted:  # nobody learned anything yet: all alike
            counted = [(p, 1.0) for p, _ in items]
        rule = self.rule
        if rule == "auto":
            rule = "mean" if len(counted) <= 2 else "trimmed-mean"

        def combine(values: list[tuple[float, float]]) -> float:
            return _combine(values, rule, self.trim)

        scalers = [p["scaler"] for p, _ in items]
        merged = None if scalers[0] is None else merge_scalers(scalers)
        opts = [(p.get("optimizer") or {"n_iterations": 0, "state": {}}, w) for p, w in counted]
        names = sorted({n for o, _ in opts for n in o["state"]})
        # Each edge's weights apply to features scaled by its own scaler: combined as they
        # are, an edge's intercept (its prediction at its own means) would be mixed with
        # another's at other means. So they are combined as the one model they are in
        # the features' own units, then written for the fleet's merged scaler.
        std = self._with_std
        linear = [
            (from_scaler_space(p["weights"], p["intercept"], p["scaler"], with_std=std), w)
            for p, w in counted
        ]
        weights = _per_key([(ws, w) for (ws, _), w in linear], combine)
        intercept = combine([(b, w) for (_, b), w in linear])
        weights, intercept = to_scaler_space(weights, intercept, merged, with_std=std)
        return {
            "scaler": merged,
            "weights": weights,
            "intercept": intercept,
            "optimizer": {
                "n_iterations": round(combine([(o["n_iterations"], w) for o, w in opts])),
                "state": {
                    n: _per_key([(o["state"].get(n, {}), w) for o, w in opts], combine)
                    for n in names
                },
            },
        }


def _per_key(dicts: list[tuple[dict[str, float], float]], combine: Any) -> dict[str, float]:
    """Per key, ``combine`` over the (value, weight) of the dicts that have the key."""
    values: dict[str, list[tuple[float, float]]] = {}
    for d, w in dicts:
        for k, v in d.items():
            values.setdefault(k, []).append((v, w))
    return {k: combine(vs) for k, vs in values.items()}


def _mean(values: list[tuple[float, float]]) -> float:
    total = sum(w for _, w in values)
    if not total > 0:
        return math.fsum(v for v, _ in values) / len(values)
    return math.fsum(v * w for v, w in values) / total


def _median(values: list[tuple[float, float]]) -> float:
    """The weighted median: the lowest value at which half the weight is reached (with
    equal weights and an even count, the mean of the two middle values)."""
    ordered = sorted(values)
    total = sum(w for _, w in ordered)
    if not total > 0:
        ordered, total = [(v, 1.0) for v, _ in ordered], float(len(ordered))
    seen = 0.0
    for i, (v, w) in enumerate(ordered):
        seen += w
        if seen > total / 2:
            return v
        if seen == total / 2:
            return (v + ordered[i + 1][0]) / 2 if i + 1 < len(ordered) else v
    return ordered[-1][0]


def _combine(values: list[tuple[float, float]], rule: str, trim: float) -> float:
    if rule == "mean" or len(values) == 1:
        return _mean(values)
    if rule == "median":
        return _median(values)
    n = len(values)
    k = max(1, math.floor(trim * n))
    if n - 2 * k < 1:  # too few to cut one off each side and keep one
        return _median(values)
    return _mean(sorted(values)[k : n - k])
