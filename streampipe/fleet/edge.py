"""The edge side of fleet learning: publish what a stage learned, take the fleet model.

An edge started with ``--fleet NAME`` (which needs ``--deploy-key``) has a
:class:`FleetMember`. On the stage's worker thread, between two messages, it

- publishes an **update** (:mod:`streampipe.fleet.update`) retained, QoS 1, on
  ``ROOT/fleet/<name>/updates/<stage>``, at most one every ``interval`` seconds and no
  later than ``interval`` seconds after the stage learned something new. The update is
  *all* of the stage's devices that learned anything, pre-combined with
  :func:`~streampipe.fleet.params.merge` weighted by the readings each device learned,
  since the aggregator keeps only the latest update of a stage (FedAsync: it must be the
  edge's current model, not what changed). For a ``LinearRegression`` the weights and
  intercept are instead the least-squares fit of every reading the stage learned, written
  for that merged scaler (:mod:`streampipe.fleet.leastsq`: averaged SGD models took a
  few hundred steps each). Parameters and counts only: no reading, no
  seq, no timestamp of a reading leaves the edge. A device that started from the fleet
  model contributes its scaler *minus* the fleet scaler it started from (Chan et al.'s
  merge, inverted), and the readings it learned itself, so the fleet's readings are never
  counted twice;
- verifies the **fleet model**, a signed artifact retained on ``ROOT/fleet/<name>/model``,
  with the deploy key exactly as deployed models are verified (refusals become dead
  letters with the same reasons, counted); a device the stage has not seen before then
  starts from a copy of it (learned state included) and its predictions carry
  ``"fleet_version"``. Devices that have a model keep it; with ``blend`` > 0 each one's
  linear part becomes ``(1 - blend)·own + blend·fleet`` after each new fleet model. The
  device's own StandardScaler is kept as it is: it holds the statistics (the
  calibration) of the device's own readings, and merging the fleet's in exactly would
  bury them under the fleet's counts and count the fleet's readings again in the next
  update;
- scores the fleet model on every reading the stage predicts (it never learns here):
  ``streampipe_model_mae{model="fleet", window=...}`` beside the served model's.

>>> from streampipe.models.keys import SigningKey
>>> from streampipe.stage import EdgeStage
>>> stage = EdgeStage("edge-1")
>>> member = FleetMember(stage, SigningKey.generate().public, "power")
>>> member.topic, member.updates_topic
('streampipe/fleet/power/model', 'streampipe/fleet/power/updates/edge-1')
>>> from streampipe.learn.spec import ModelSpec
>>> FleetMember(EdgeStage("e", ModelSpec.parse("tree.HoeffdingTreeRegressor")),
...             SigningKey.generate().public, "power")
Traceback (most recent call last):
...
streampipe.fleet.params.NotFederable: fleet learning averages StandardScaler and linear models only; step 'HoeffdingTreeRegressor' of the spec cannot be merged (use preprocessing.StandardScaler | linear_model.LinearRegression, or LogisticRegression)
"""  # noqa: E501

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from river import linear_model, preprocessing

from streampipe.fleet.leastsq import LeastSquares, to_scaler_space
from streampipe.fleet.params import Params, apply, check_federable, extract, merge, refusal
from streampipe.fleet.update import CONTENT_TYPE, UpdateError, canonical_spec, encode_update
from streampipe.learn.learner import Deployed, LearnResult
from streampipe.learn.scores import scores_for
from streampipe.learn.spec import _final_step, model_kind
from streampipe.models.artifact import (
    DEFAULT_LIMITS,
    Artifact,
    ArtifactError,
    ArtifactLimits,
    unpickle,
    verify,
)
from streampipe.models.keys import VerifyKey
from streampipe.stage import EdgeStage, Outgoing
from streampipe.topics import check_name
from streampipe.validate import Validated

if TYPE_CHECKING:
    from streampipe.learn.learner import OnlineLearner

__all__ = ["DEFAULT_INTERVAL", "FleetMember", "own_scaler"]

log = logging.getLogger(__name__)

#: Seconds from learning something new to the update that reflects it, at the latest.
DEFAULT_INTERVAL = 10.0


class FleetMember:
    """One edge stage's part in fleet ``name``: its updates out, the fleet model in.

    Everything runs on the stage's worker thread (its one owner): :meth:`handle` for a
    message on :attr:`topic`, :meth:`poll` between messages, :meth:`snapshot` and
    :meth:`restore` with the stage's checkpoints. A scrape reads the counts.
    """

    #: The ``model`` label of the fleet model's scores in Prometheus and metrics.
    LABEL = "fleet"

    def __init__(
        self,
        stage: EdgeStage,
        key: VerifyKey,
        name: str,
        *,
        interval: float = DEFAULT_INTERVAL,
        blend: float = 0.0,
        limits: ArtifactLimits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        built = stage.spec.build()
        check_federable(built)  # NotFederable names the step
        if not interval > 0:
            raise ValueError(f"--fleet-interval must be more than 0 seconds, not {interval}")
        if not 0 <= blend <= 1:
            raise ValueError(f"--fleet-blend must be from 0 to 1, not {blend}")
        self.stage = stage
        self.key = key
        self.name = check_name(name, "fleet name")
        self.interval = interval
        self.blend = blend
        self.limits = limits
        self.clock = clock
        self._spec_text = stage.spec.text
        self.spec = canonical_spec(stage.spec.text)
        self.topic = stage.topics.fleet_model(self.name)
        self.updates_topic = stage.topics.fleet_updates(self.name, stage.stage_id)
        learner = stage.learner
        self.scores = scores_for(learner.kind, learner.metrics.window, learner.labels)
        self.model: Any = None  # the fleet model itself, unpickled once: it only predicts
        #: The fleet scalers devices started from, by fleet version (see own_scaler).
        self.bases: dict[int, dict[str, Any] | None] = {}
        self.seq = 0  # of the last update published
        self.updates = 0  # published since start
        self.received = 0  # fleet models taken since start
        self._refused: Counter[str] = Counter()
        self._sent_at = -math.inf  # when the last update was published (poll's clock)
        self._sent_learned = 0  # the learner's count of learned readings then
        self._withheld: set[str] = set()  # reasons an update was withheld, logged once
        final = _final_step(built)
        #: A LinearRegression fleet's least-squares statistics (None for another model):
        #: its updates carry their fit (streampipe.fleet.leastsq).
        self.least_squares: LeastSquares | None = None
        if type(final) is linear_model.LinearRegression:
            self.least_squares = LeastSquares()
        self._l2 = float(getattr(final, "l2", 0.0))
        first = next(iter(built.steps.values())) if hasattr(built, "steps") else None
        self._with_std = not isinstance(first, preprocessing.StandardScaler) or first.with_std
        stage.on_predicted = self._learned
        stage.stats.fleet = self

    @property
    def learner(self) -> OnlineLearner:
        return self.stage.learner

    @property
    def version(self) -> int:
        """The fleet model version this stage has; 0 before it has one."""
        fleet = self.learner.fleet
        return 0 if fleet is None else fleet.version

    def refused_by_reason(self) -> dict[str, int]:
        return dict(self._refused)

    def snapshot_stats(self) -> dict[str, Any]:
        """The ``fleet`` part of the stage's metrics message."""
        return {
            "fleet": self.name,
            "version": self.version,
            "updates_sent": self.updates,
            "models_received": self.received,
            "models_refused": self.refused_by_reason(),
            "metrics": self.scores.as_dict(),
        }

    # -- the fleet model in ----------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> list[Outgoing]:
        """A message on :attr:`topic`: take the fleet model, ignore it, or dead-letter it."""
        if not payload:  # a cleared retained fleet model: keep the one we have
            return []
        try:
            art = verify(payload, self.key, self.limits)
            if self._have(art):
                return []
            raw, model = self._check(art)
        except ArtifactError as exc:
            self._refused[exc.reason] += 1
            log.warning("refused a fleet model on %s: %s (%s)", topic, exc.reason, exc)
            return [self.stage.dead_letter(topic, payload, exc.reason, str(exc))]
        h = art.header
        self._take(Deployed(h.version, "*", raw, h.sha256), model)
        self.received += 1
        blended = self._blend(model) if self.blend > 0 else 0
        log.info(
            "fleet %s model version %d taken: new devices start from it%s",
            self.name, h.version,
            f"; blended into {blended} devices (alpha {self.blend:g})" if self.blend else "",
        )  # fmt: skip
        return [self.stage.metrics_message()]

    def _have(self, art: Artifact) -> bool:
        """The fleet model this stage has, delivered again (a restart, a resubscription)."""
        fleet = self.learner.fleet
        h = art.header
        return fleet is not None and fleet.version == h.version and fleet.sha256 == h.sha256

    def _check(self, art: Artifact) -> tuple[bytes, Any]:
        """Everything but the signature (which :func:`verify` checked), as
        :class:`~streampipe.models.receive.ModelReceiver` checks a deployed model."""
        h = art.header
        learner = self.learner
        if h.name != self.name:
            raise ArtifactError(
                "wrong_model_name",
                f"a model named {h.name!r} on fleet {self.name!r}'s topic",
            )
        have = learner.fleet
        if have is not None and h.version == have.version:
            raise ArtifactError(
                "version_collision",
                f"fleet version {h.version} is already another model here (SHA-256 "
                f"{have.sha256[:12]}…, not {h.sha256[:12]}…): a version names one model",
            )
        if have is not None and h.version < have.version:
            raise ArtifactError(
                "downgrade", f"fleet version {h.version} is older than version {have.version}"
            )
        if h.kind != learner.kind:
            raise ArtifactError(
                "wrong_model_kind", f"a {h.kind} cannot start this stage's {learner.kind}s"
            )
        if h.spec is not None and _canonical(h.spec) != self.spec:
            raise ArtifactError(
                "model_incompatible",
                f"a fleet model of {h.spec!r}; this stage learns {self.spec!r}",
            )
        raw = art.model_bytes(self.limits)
        model = unpickle(raw, h)
        try:
            kind = model_kind(model) if callable(getattr(model, "learn_one", None)) else None
        except (ValueError, TypeError):
            kind = None
        if kind != learner.kind:
            raise ArtifactError(
                "wrong_model_kind",
                f"the artifact says {h.kind}, but its model is "
                + (f"a {kind}" if kind else f"a {type(model).__name__}, not a River model"),
            )
        try:  # the same steps as this stage's spec: its parameters fit a model of it
            apply(learner.spec.build(), extract(model))
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(
                "model_incompatible", f"the fleet model does not fit {self.spec!r}: {exc}"
            ) from None
        return raw, model

    def _take(self, fleet: Deployed, model: Any) -> None:
        self.learner.fleet = fleet
        self.model = model
        self.bases[fleet.version] = extract(model)["scaler"]

    def _blend(self, model: Any) -> int:
        """Mix the fleet model into every device's linear part; return how many."""
        fleet = extract(model)
        a = self.blend
        learner = self.learner
        for device, st in learner.devices.items():
            own = extract(st.model)
            mixed = merge([(own, 1.0 - a), (fleet, a)])
            mixed["scaler"] = own["scaler"]  # the device's own statistics stay (module doc)
            apply(st.model, mixed)
            learner.dirty.add(device)
        return len(learner.devices)

    # -- what the stage learned --------------------------------------------------------

    def _learned(self, checked: Validated, result: LearnResult) -> None:
        """A batch the stage predicted and learned: its readings into the least-squares
        statistics, its predictions scored against the fleet model's."""
        if self.least_squares is not None:
            self.least_squares.add(
                checked.batch.features, checked.values[result.skipped :], result.y_true
            )
        self._score(checked, result)

    def _score(self, checked: Validated, result: LearnResult) -> None:
        """Predict the batch's predicted readings with the fleet model (which does not
        learn them) and score those predictions as the served model's are scored."""
        model = self.model
        if model is None:
            return
        xs = checked.features()[result.skipped :]
        ys = result.y_true
        if self.learner.kind != "classifier":
            preds = [_finite(model.predict_one(x)) for x in xs]
            self.scores.update_many(ys, preds)
            return
        preds, p_true = [], []
        for x in xs:
            p = model.predict_proba_one(x)
            c = max(p, key=p.get) if p else None
            preds.append(c)
            p_true.append(p.get(True, 0.0) if p else float(c is True))
        self.scores.update_many(ys, preds, p_true)  # type: ignore[call-arg]

    # -- updates out -------------------------------------------------------------------

    def poll(self, now: float) -> Outgoing | None:
        """The update to publish now, if the stage learned something since the last one
        and ``interval`` seconds have passed since it (``now`` is monotonic)."""
        learned = self.learner.learned
        if learned == self._sent_learned or now < self._sent_at + self.interval:
            return None
        self._sent_at, self._sent_learned = now, learned
        return self.update()

    def update(self) -> Outgoing | None:
        """The stage's update as it is now; None when no device has learned anything."""
        learner = self.learner
        if learner.spec.text != self._spec_text:
            return self._withhold("spec", "a promoted challenger's model is not the fleet's")
        items: list[tuple[Params, float]] = []
        readings = 0
        for st in learner.devices.values():
            if st.learned <= 0:
                continue
            params = extract(st.model)
            base = self.bases.get(st.fleet_version) if st.fleet_version else None
            if base is not None and params["scaler"] is not None:
                params["scaler"] = own_scaler(params["scaler"], base)
            items.append((params, float(st.learned)))
            readings += st.learned
        if not items:
            return None
        params = merge(items)
        if self.least_squares is not None:
            params = self._fit(params)
        seq = max(self.seq + 1, int(self.clock() * 1000))  # rises across restarts too
        try:
            data = encode_update(
                fleet=self.name,
                stage=self.stage.stage_id,
                spec=self.spec,
                seq=seq,
                base=self.version,
                readings=readings,
                devices=len(items),
                params=params,
            )
        except UpdateError as exc:  # a model that diverged: an aggregator would refuse it
            return self._withhold(exc.reason, str(exc))
        self.seq = seq
        self.updates += 1
        return Outgoing(self.updates_topic, data, qos=1, retain=True, content_type=CONTENT_TYPE)

    def _fit(self, merged: Params) -> Params:
        """``merged`` with its linear part the least-squares fit of the readings the
        stage learned, written for its (exactly merged) scaler; ``merged`` as it is when
        the statistics cannot stand for it (see streampipe.fleet.leastsq)."""
        ls = self.least_squares
        assert ls is not None
        scaler = merged["scaler"]
        if ls.overflow or ls.n == 0:
            return merged
        if scaler is not None:
            if not set(scaler["counts"]) <= set(ls.index):  # readings from before the stats
                return merged
            variances = scaler["vars"]
            drop = (
                {f for f in ls.names if not variances.get(f, 0.0) > 0} if self._with_std else set()
            )
            scales = {f: v**0.5 for f, v in variances.items()} if self._with_std else None
        else:
            drop, scales = set(), None
        weights, intercept = ls.fit(scales=scales, l2=self._l2, drop=drop)
        weights, intercept = to_scaler_space(weights, intercept, scaler, with_std=self._with_std)
        fitted = {**merged, "weights": weights, "intercept": intercept}
        if refusal(fitted) is not None:  # an aggregator would refuse it: the average then
            return merged
        return fitted

    def _withhold(self, reason: str, detail: str) -> None:
        if reason not in self._withheld:
            self._withheld.add(reason)
            log.warning("fleet %s: update withheld: %s", self.name, detail)
        return None

    # -- checkpoints -------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What a checkpoint keeps: the fleet model (its pickle), the scalers devices
        started from, the last update's seq and the fleet model's scores."""
        used = {st.fleet_version for st in self.learner.devices.values()} | {self.version}
        self.bases = {v: b for v, b in self.bases.items() if v in used}
        return {
            "model": self.learner.fleet,
            "bases": self.bases,
            "seq": self.seq,
            "scores": self.scores,
            "least_squares": self.least_squares,
        }

    def restore(self, saved: dict[str, Any] | None) -> None:
        """Resume from :meth:`snapshot`'s dict (None: a checkpoint without one)."""
        if not saved:
            return
        self.seq = saved["seq"]
        self.scores = saved["scores"]
        fleet = saved["model"]
        if fleet is not None:
            self._take(fleet, fleet.build())
        self.bases.update(saved["bases"])
        if self.least_squares is not None and saved.get("least_squares") is not None:
            self.least_squares = saved["least_squares"]


def own_scaler(total: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Scaler parameters with ``base`` taken out: what ``total``, a scaler that started
    as ``base`` and then learned more readings, learned from those alone (Chan et al.'s
    merge inverted; features it learned nothing of are left out).

    >>> from streampipe.fleet.params import merge_scalers
    >>> base = {"counts": {"x": 3}, "means": {"x": 2.0}, "vars": {"x": 2 / 3}}
    >>> own = {"counts": {"x": 2, "y": 1}, "means": {"x": 10.0, "y": 1.0},
    ...        "vars": {"x": 1.0, "y": 0.0}}
    >>> back = own_scaler(merge_scalers([base, own]), base)
    >>> back["counts"], round(back["means"]["x"], 9), round(back["vars"]["x"], 9)
    ({'x': 2, 'y': 1}, 10.0, 1.0)
    """
    counts: dict[str, int] = {}
    means: dict[str, float] = {}
    variances: dict[str, float] = {}
    for f, n in total["counts"].items():
        nb = base["counts"].get(f, 0)
        na = n - nb
        if na <= 0:
            continue
        m, v = total["means"].get(f, 0.0), total["vars"].get(f, 0.0)
        if nb <= 0:
            counts[f], means[f], variances[f] = n, m, v
            continue
        mb, vb = base["means"].get(f, 0.0), base["vars"].get(f, 0.0)
        ma = (n * m - nb * mb) / na
        squares = v * n - vb * nb - (ma - mb) ** 2 * na * nb / n
        counts[f], means[f], variances[f] = na, ma, max(0.0, squares / na)
    return {"counts": counts, "means": means, "vars": variances}


def _canonical(spec: str) -> str | None:
    try:
        return canonical_spec(spec)
    except ValueError:  # not a spec this build reads
        return None


def _finite(y: Any) -> Any:
    return y if isinstance(y, (int, float)) and math.isfinite(y) else None
