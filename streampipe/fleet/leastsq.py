"""What an edge publishes for a ``LinearRegression`` fleet: the least-squares fit of
every reading its devices learned, not the average of their SGD models.

Averaging per-device SGD models gives a model that took a few hundred steps (a dozen for
a ChickWeights chick), however many readings the fleet learned; and a device whose
feature is constant (a chick's diet) has its own scaler map it to 0, so no device learns
its weight. Instead, with ``--fleet``, an edge keeps the readings' *sufficient
statistics* (:class:`LeastSquares`): their count, the means of the features and target,
and the co-moment matrix Σ (v − m)(v − m)ᵀ of v = [x, y], merged batch by batch with Chan
et al.'s parallel formula (a sum of squares about the mean, not Σ x xᵀ: no cancellation
when a feature's mean dwarfs its spread). :meth:`LeastSquares.fit` solves the ridge
least squares over them, and :func:`to_scaler_space` writes that fit as the weights and
intercept of a model whose ``StandardScaler`` has the given statistics: for River's
scaled value (x − μ)/σ, weight ``w·σ`` and intercept ``w₀ + Σ w·μ``, so the pipeline
predicts exactly what the raw-space fit does. Features whose scaler variance is 0 are
left out of the fit: River's scaler maps them to 0.

A reading without some feature is learned with that feature's running mean (over the
values seen until then) in its place, which is what a River linear model on scaled
features assumes of an absent feature; a feature seen for the first time counts as its
first batch's mean in every earlier reading.

**Privacy.** These statistics never leave the edge: the update carries the fit (weights
and an intercept per fleet model), the scaler's counts, means and variances, and counts
of readings, as before; no reading, and not Σ x xᵀ or Σ x y either.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X = rng.normal(5.0, 2.0, size=(200, 2))
>>> y = 3.0 * X[:, 0] - X[:, 1] + 7.0
>>> ls = LeastSquares()
>>> ls.add(("a", "b"), X[:100], y[:100])
>>> ls.add(("a", "b"), X[100:], y[100:])
>>> w, w0 = ls.fit()
>>> {k: round(v, 4) for k, v in w.items()}, round(w0, 4)
({'a': 3.0, 'b': -1.0}, 7.0)
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

__all__ = ["MAX_FEATURES", "RIDGE", "LeastSquares", "from_scaler_space", "to_scaler_space"]

log = logging.getLogger(__name__)

#: Feature names one edge's statistics keep. They cost (d + 1)² floats, kept and solved
#: at each update: 256 names are 0.5 MB and a few milliseconds. Beyond it the edge
#: publishes its devices' averaged models, as it does for a LogisticRegression.
MAX_FEATURES = 256
#: The ridge added to each feature's sum of squares, relative to it: as 1e-6 of an added
#: reading per feature on standardised features, enough to solve collinear features.
RIDGE = 1e-6


class LeastSquares:
    """The least-squares sufficient statistics of the readings an edge learned.

    Owned by the stage's worker thread (it adds each learned batch, fits at each update,
    and checkpoints them).
    """

    def __init__(self, max_features: int = MAX_FEATURES) -> None:
        self.max_features = max_features
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.n = 0  # readings added
        self.mean = np.zeros(1)  # of [x_1 .. x_d, y]
        self.comoment = np.zeros((1, 1))  # Σ (v − mean)(v − mean)ᵀ
        self.seen = np.zeros(0)  # values seen of each feature (not imputed)
        self.sums = np.zeros(0)  # their sum: the running means that fill absent values
        #: More feature names came than :attr:`max_features`: no fit any more.
        self.overflow = False

    def add(self, names: tuple[str, ...] | list[str], values: np.ndarray, y: Any) -> None:
        """Add readings: ``values`` has a column per name (NaN: absent), ``y`` a target
        per row (None or NaN: not learned, so left out)."""
        if self.overflow:
            return
        y = np.asarray([np.nan if t is None else t for t in y], dtype=float)
        rows = ~np.isnan(y)
        if not rows.any():
            return
        X = np.asarray(values, dtype=float)[rows]
        y = y[rows]
        new = [f for f in names if f not in self.index]
        if new:
            if len(self.names) + len(new) > self.max_features:
                self.overflow = True
                log.warning(
                    "fleet: more than %d feature names; the edge's updates average its "
                    "devices' models from now on",
                    self.max_features,
                )
                return
            self._grow(new, X, names)
        d = len(self.names)
        cols = [self.index[f] for f in names]
        present = ~np.isnan(X)
        self.seen[cols] += present.sum(axis=0)
        self.sums[cols] += np.where(present, X, 0.0).sum(axis=0)
        running = np.divide(self.sums, self.seen, out=self.mean[:d].copy(), where=self.seen > 0)
        V = np.empty((len(y), d + 1))
        V[:, :d] = running
        V[:, cols] = np.where(present, X, running[cols])
        V[:, d] = y
        self._merge(V)

    def _grow(self, new: list[str], X: np.ndarray, names: tuple[str, ...] | list[str]) -> None:
        # Earlier readings lacked the new features: they take the first batch's mean,
        # a constant, so their deviations are 0 and only the means change.
        d, k = len(self.names), len(new)
        at = {f: i for i, f in enumerate(names)}
        fill = np.zeros(k)
        for i, f in enumerate(new):
            col = X[:, at[f]]
            col = col[~np.isnan(col)]
            fill[i] = col.mean() if col.size else 0.0
        mean = np.concatenate([self.mean[:d], fill, self.mean[d:]])
        comoment = np.zeros((d + k + 1, d + k + 1))
        keep = np.r_[0:d, d + k]  # the old features and the target
        comoment[np.ix_(keep, keep)] = self.comoment
        self.mean, self.comoment = mean, comoment
        self.seen = np.concatenate([self.seen, np.zeros(k)])
        self.sums = np.concatenate([self.sums, np.zeros(k)])
        for f in new:
            self.index[f] = len(self.names)
            self.names.append(f)

    def _merge(self, V: np.ndarray) -> None:
        """Chan et al.'s merge of the batch ``V``'s count, mean and co-moment."""
        nb = len(V)
        mb = V.mean(axis=0)
        D = V - mb
        cb = D.T @ D
        na = self.n
        n = na + nb
        delta = mb - self.mean
        self.comoment += cb + np.outer(delta, delta) * (na * nb / n)
        self.mean += delta * (nb / n)
        self.n = n

    def fit(
        self,
        *,
        scales: dict[str, float] | None = None,
        l2: float = 0.0,
        ridge: float = RIDGE,
        drop: frozenset[str] | set[str] = frozenset(),
    ) -> tuple[dict[str, float], float]:
        """The ridge least-squares fit ``(weights, intercept)`` in raw feature space:
        it minimises Σ (y − w·x − w₀)² + Σ_j λ_j w_j², the intercept unpenalised, with
        λ_j = ``ridge``·S_jj (S_jj: feature j's sum of squares about its mean) +
        n·``l2``/2·``scales[j]``² (River's ``l2`` on the scaled weight w_j·σ_j, the
        stationary point of its SGD; a scale not given is 1). Features in ``drop``, and
        features constant over every reading, get weight 0.
        """
        if self.n == 0:
            raise ValueError("no readings to fit")
        d = len(self.names)
        diag = np.diag(self.comoment)
        # a feature constant in every reading is the intercept's: weight 0
        use = [i for i, f in enumerate(self.names) if f not in drop and diag[i] > 0]
        S = self.comoment[np.ix_(use, use)]
        s = self.comoment[use, d]
        lam = ridge * np.diag(S).copy()
        if l2:
            sigma = np.array([(scales or {}).get(self.names[i], 1.0) for i in use])
            lam += self.n * l2 / 2 * sigma**2
        w = np.zeros(d)
        if use:
            A = S + np.diag(lam)
            try:
                w[use] = np.linalg.solve(A, s)
            except np.linalg.LinAlgError:  # singular (ridge 0 and collinear): least norm
                w[use] = np.linalg.lstsq(A, s, rcond=None)[0]
        intercept = float(self.mean[d] - w @ self.mean[:d])
        return dict(zip(self.names, w.tolist())), intercept

    # -- checkpoints -------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _STATE}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k in _STATE:
            setattr(self, k, state[k])


_STATE = ("max_features", "names", "index", "n", "mean", "comoment", "seen", "sums", "overflow")


def to_scaler_space(
    weights: dict[str, float],
    intercept: float,
    scaler: dict[str, Any] | None,
    *,
    with_std: bool = True,
) -> tuple[dict[str, float], float]:
    """Weights and intercept of the raw-space linear model ``w·x + w₀`` for features as
    River's ``StandardScaler`` with the statistics ``scaler`` (a
    :data:`~streampipe.fleet.params.Params` scaler; None: no scaler) transforms them:
    ``(x − μ)/σ``, or 0 where the variance is 0; ``x − μ`` without ``with_std``.

    Exact for every x when the features the scaler has no variance of have weight 0
    (fit without them: ``LeastSquares.fit(drop=...)``).

    >>> to_scaler_space({"a": 2.0}, 1.0, {"counts": {"a": 4}, "means": {"a": 3.0},
    ...                                   "vars": {"a": 4.0}})
    ({'a': 4.0}, 7.0)
    """
    if scaler is None:
        return dict(weights), intercept
    means, variances = scaler["means"], scaler["vars"]
    out = {}
    for f, w in weights.items():
        mu = means.get(f, 0.0)
        intercept += w * mu
        if with_std:
            v = variances.get(f, 0.0)
            out[f] = w * v**0.5 if v else 0.0
        else:
            out[f] = w
    return out, intercept


def from_scaler_space(
    weights: dict[str, float],
    intercept: float,
    scaler: dict[str, Any] | None,
    *,
    with_std: bool = True,
) -> tuple[dict[str, float], float]:
    """The inverse of :func:`to_scaler_space`: the raw-space model that a linear model
    over features scaled with ``scaler`` is (a feature of no variance is 0 to River's
    scaler, and so gets no raw weight).

    >>> from_scaler_space({"a": 4.0}, 7.0, {"counts": {"a": 4}, "means": {"a": 3.0},
    ...                                     "vars": {"a": 4.0}})
    ({'a': 2.0}, 1.0)
    """
    if scaler is None:
        return dict(weights), intercept
    means, variances = scaler["means"], scaler["vars"]
    out = {}
    for f, w in weights.items():
        if with_std:
            v = variances.get(f, 0.0)
            raw = w / v**0.5 if v else 0.0
        else:
            raw = w
        out[f] = raw
        intercept -= raw * means.get(f, 0.0)
    return out, intercept
