"""Per-device online learning in River's progressive-validation order.

For every reading, in sequence order: ``predict_one``, then the metrics are updated
with the prediction and the target, then ``learn_one`` — exactly what
``river.evaluate.progressive_val_score`` does, so predictions equal River's own.

Each device has its own model and a watermark ``(epoch, seq)``: a reading at or below
the watermark has been learned already and is refused as a ``duplicate``, so a
redelivered message changes no model. A sensor that reboots starts a new, larger epoch
and its sequence numbers start again; a smaller epoch is ``stale_epoch``. Sequence
numbers skipped above the watermark are a ``gap``; a device's first accepted reading
(no watermark yet: a new device, or a stage that joined a running fleet) starts the
watermark, since readings sent before the stage saw the device were not lost.

Each device's model has a *version*: 1 is what the stage's spec builds. :meth:`OnlineLearner.deploy`
hot-swaps a deployed model in between two batches: every matching device continues
from its own copy of it, watermark unchanged, and devices seen later start from it.
With fleet learning (:mod:`streampipe.fleet.edge`), a device seen for the first time
that no deployed model matches starts from a copy of :attr:`OnlineLearner.fleet`, the
fleet model, and its :attr:`DeviceState.fleet_version` says which version that was.

In ``minibatch`` mode each batch is predicted with ``predict_many`` and then learned
with ``learn_many``: much faster, but a reading's prediction no longer comes from a
model that has learned its predecessors in the same batch, so it is *not* River's
progressive validation. A batch with missing values is learned reading by reading.

What "predict" means depends on the model's kind (see :mod:`streampipe.learn.labels`
for what its targets become):

- a regressor: ``predict_one``;
- a classifier: ``predict_proba_one``, and the predicted class is the most probable
  one, as River's own ``predict_one`` picks it (a model that overrides ``predict_one``
  is asked both); ``proba`` is the probability of the predicted class;
- an anomaly detector: ``score_one``, then ``learn_one(x)``: its target is a label to
  evaluate it with, never learned. When the model ends in one of River's anomaly
  filters (``QuantileFilter``, ``ThresholdFilter``) the filter's ``classify`` says,
  before the reading is learned, whether the reading is an anomaly.

>>> from streampipe.learn.spec import ModelSpec
>>> from streampipe.readings import Batch, Reading
>>> from streampipe.validate import validate
>>> learner = OnlineLearner(ModelSpec.parse("linear_model.LinearRegression"))
>>> batch = validate(Batch.from_readings([Reading("d", 0, 0.0, {"a": 1.0}, 2.0)]))
>>> learner.process(batch).y_pred
[0.0]
>>> learner.process(batch).duplicates
[0]
"""

from __future__ import annotations

import bisect
import math
import pickle
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
from river import base

from streampipe.learn.labels import label_kind
from streampipe.learn.scores import DEFAULT_WINDOW, Scores, scores_for
from streampipe.learn.spec import ModelSpec, _final_step
from streampipe.limits import MAX_DEVICES, MAX_FEATURES, MAX_SEQ_JUMP
from streampipe.validate import Validated

__all__ = [
    "MODES",
    "Deployed",
    "DeviceState",
    "LearnResult",
    "OnlineLearner",
    "supports_minibatch",
]

#: ``exact``: predict, score and learn reading by reading (River's progressive
#: validation). ``minibatch``: ``predict_many`` then ``learn_many`` per batch.
MODES = ("exact", "minibatch")


@dataclass(slots=True)
class DeviceState:
    """What a stage keeps per device; checkpointed as one piece."""

    model: Any
    epoch: int = -1
    seq: int = -1  # highest sequence number learned in ``epoch``
    learned: int = 0
    version: int = 1  # of the model this one was built or deployed as, then learned on
    features: set[str] = field(default_factory=set)  # names its model has learned
    #: ``(epoch, seq)`` of the last reading refused as ``seq_jump``, until one is learned.
    jumped_to: tuple[int, int] | None = None
    #: The fleet model version this device's model started from (0: none).
    fleet_version: int = 0

    def __setstate__(self, state: tuple[None, dict[str, Any]]) -> None:
        self.version = 1  # checkpoints from before deployments did not record it
        self.features, self.jumped_to = set(), None  # nor these
        self.fleet_version = 0  # nor this, from before fleet learning
        for name, value in state[1].items():
            setattr(self, name, value)


@dataclass(frozen=True, slots=True)
class Deployed:
    """A deployed model that matching devices start from: its version, the fnmatch
    pattern of device ids it applies to, its pickle (verified before it got here) and
    the SHA-256 its artifact stated, to recognise that artifact when it comes again."""

    version: int
    devices: str
    model: bytes
    sha256: str = ""

    def matches(self, device: str) -> bool:
        return fnmatchcase(device, self.devices)

    def build(self) -> Any:
        """A new copy of the deployed model, learned state included (a deep copy)."""
        return pickle.loads(self.model)  # signed and verified by streampipe.models


@dataclass(slots=True)
class LearnResult:
    """What became of one device's validated batch.

    The first ``skipped`` accepted readings were at or below the device's watermark
    (``duplicates``, or all of them ``stale`` for an older epoch); the rest were
    predicted, in order, as ``y_pred``.
    """

    skipped: int = 0
    y_pred: list[Any] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)
    stale: list[int] = field(default_factory=list)
    gap: int = 0  # readings missing before or inside this batch (sequence numbers skipped)
    #: The device had no watermark: the seq its first accepted reading started it at.
    first_seq: int | None = None
    non_finite: int = 0  # predictions that were not finite numbers (published as null)
    version: int = 1  # of the device's model that made the predictions
    fleet_version: int = 0  # the fleet model version the device's model started from
    #: The predicted readings' targets as the model saw them (labels for a classifier).
    y_true: list[Any] = field(default_factory=list)
    #: A classifier's probability of each predicted class (None where it has none).
    proba: list[float | None] | None = None
    #: A binary classifier's probability of True, as River's ROCAUC reads it.
    p_true: list[float] | None = None
    #: An anomaly filter's verdict on each reading, and the threshold it compared with.
    anomalies: list[bool] | None = None
    thresholds: list[float | None] | None = None


def supports_minibatch(model: Any) -> bool:
    """Whether every step of ``model`` has River's ``learn_many`` (and it predicts many)."""
    steps = list(model.steps.values()) if hasattr(model, "steps") else [model]
    return all(hasattr(s, "learn_many") for s in steps) and hasattr(steps[-1], "predict_many")


class OnlineLearner:
    """One River model per device, learned reading by reading (or batch by batch)."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        window: int = DEFAULT_WINDOW,
        mode: str = "exact",
        max_devices: int = MAX_DEVICES,
        max_features: int = MAX_FEATURES,
        max_seq_jump: int = MAX_SEQ_JUMP,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.max_devices = max_devices
        self.max_features = max_features
        self.max_seq_jump = max_seq_jump
        #: The most feature names any one device's model has learned.
        self.most_features = 0
        self.spec = spec
        self.kind = spec.kind
        self.mode = mode
        self.devices: dict[str, DeviceState] = {}
        #: Devices whose state changed since the last :meth:`snapshot`.
        self.dirty: set[str] = set()
        model = spec.build()
        #: What targets must be and become: None (numbers), "binary" or "integer".
        self.labels = label_kind(model)
        final = _final_step(model)
        if self.kind == "anomaly" and final._supervised:
            raise ValueError(
                f"{spec.text} is a supervised anomaly detector, which scores the target "
                "itself; an edge stage runs unsupervised ones (the target is a label)"
            )
        # River's classifiers predict the most probable class unless they say otherwise.
        own = type(final)
        self._argmax = getattr(own, "predict_one", None) is base.Classifier.predict_one
        self._has_proba = getattr(own, "predict_proba_one", None) not in (
            None,
            base.Classifier.predict_proba_one,
        )
        self.metrics: Scores = scores_for(self.kind, window, self.labels)
        if mode == "minibatch" and self.kind == "anomaly":
            raise ValueError("anomaly detectors learn reading by reading: use --mode exact")
        #: The newest model version this stage runs: 1 until a model is deployed.
        self.version = 1
        #: The version of models built from the spec (a promoted challenger's is higher).
        self.spec_version = 1
        #: Deployed models that new devices start from, oldest first (the newest match wins).
        self.deployed: list[Deployed] = []
        #: The fleet model that new devices start from, if any (set by
        #: streampipe.fleet.edge, which checkpoints it), under its fleet version.
        self.fleet: Deployed | None = None
        #: Readings predicted (and learned, where they had a target) since this learner
        #: was made: tells that something was learned since a given moment.
        self.learned = 0
        if mode == "minibatch":
            _need_pandas()
        if mode == "minibatch" and not supports_minibatch(model):
            raise ValueError(
                f"{spec.text} cannot learn in mini-batches (a step lacks learn_many or "
                "predict_many): use --mode exact"
            )

    def snapshot(self, everything: bool = False) -> tuple[dict[str, Any], dict[str, DeviceState]]:
        """What a checkpoint needs: the stage-wide state, and the devices that changed
        since the last snapshot (all of them when ``everything``)."""
        changed = self.devices if everything else {d: self.devices[d] for d in self.dirty}
        self.dirty = set()
        meta = {
            "spec": self.spec.text,
            "metrics": self.metrics,
            "version": self.version,
            "spec_version": self.spec_version,
            "deployed": self.deployed,  # pickles as bytes: cheap to checkpoint every time
        }
        return meta, changed

    def restore(self, meta: dict[str, Any], devices: dict[str, DeviceState]) -> None:
        """Resume from a checkpoint; refuse one learned with another model spec."""
        if meta.get("spec") != self.spec.text:
            raise ValueError(
                f"the checkpoint holds models of {meta.get('spec')!r}, not "
                f"{self.spec.text!r}: use the same --model or another --state-dir"
            )
        self.devices = dict(devices)
        self.metrics = meta["metrics"]
        self.version = meta.get("version", 1)
        self.spec_version = meta.get("spec_version", 1)
        self.deployed = list(meta.get("deployed", ()))
        self.dirty = set()
        self.most_features = max((len(st.features) for st in self.devices.values()), default=0)

    def deploy(self, version: int, model: bytes, devices: str = "*", sha256: str = "") -> int:
        """Hot swap to a deployed model (``model`` is its verified pickle); return how
        many devices swapped.

        Every device whose id matches the fnmatch pattern ``devices`` continues from a
        copy of the deployed model with its watermark unchanged, so no reading is
        skipped or learned twice; matching devices seen later start from it too.
        Call it between two batches, on the thread that calls :meth:`process`.

        >>> import pickle
        >>> from river import linear_model
        >>> from streampipe.learn.spec import ModelSpec
        >>> learner = OnlineLearner(ModelSpec.parse("linear_model.LinearRegression"))
        >>> trained = linear_model.LinearRegression()
        >>> trained.learn_one({"a": 1.0}, 5.0)
        >>> learner.deploy(2, pickle.dumps(trained), "boiler-*")
        0
        >>> learner.state("boiler-1").version, learner.state("pump-1").version
        (2, 1)
        >>> learner.state("boiler-1").model.predict_one({"a": 1.0}) > 0
        True
        """
        if version <= self.version:
            raise ValueError(f"version {version} is not newer than {self.version}")
        new = Deployed(version, devices, model, sha256)
        # A deployment hides older ones of the same pattern (all of them, for "*").
        self.deployed = [d for d in self.deployed if devices != "*" and d.devices != devices]
        self.deployed.append(new)
        self.version = version
        swapped = 0
        for device, st in self.devices.items():
            if new.matches(device):
                st.model, st.version = new.build(), version
                self.dirty.add(device)
                swapped += 1
        return swapped

    def state(self, device: str) -> DeviceState:
        st = self.devices.get(device)
        if st is None:
            st = self.devices[device] = self._new_state(device)
        return st

    def _new_state(self, device: str) -> DeviceState:
        for deployed in reversed(self.deployed):
            if deployed.matches(device):
                return DeviceState(deployed.build(), version=deployed.version)
        fleet = self.fleet
        if fleet is not None:
            return DeviceState(
                fleet.build(), version=self.spec_version, fleet_version=fleet.version
            )
        return DeviceState(self.spec.build(), version=self.spec_version)

    def promoted(self, version: int) -> None:
        """These models now serve as ``version`` (a challenger promoted to champion)."""
        self.version = self.spec_version = version
        for st in self.devices.values():
            st.version = version

    def reset_model(self, device: str) -> None:
        """Replace a device's model by a fresh one of the spec; its watermark stays."""
        st = self.state(device)
        st.model, st.version = self.spec.build(), self.spec_version
        self.dirty.add(device)

    def admit(self, batch: Validated) -> Validated:
        """``batch`` with the readings refused that would pass a per-device bound: all of
        a new device's beyond :attr:`max_devices`; from the first past its watermark by
        more than :attr:`max_seq_jump`; every new one, if the batch brings feature names
        beyond :attr:`max_features`. Changes no model (only a confirmed seq jump moves
        the watermark): call it once, then :meth:`process` the result with each model.
        """
        seqs = batch.seqs
        if not seqs:
            return batch
        device, epoch = batch.batch.device, batch.batch.epoch
        st = self.devices.get(device)
        if st is None:
            if len(self.devices) >= self.max_devices:
                detail = f"the stage has a model for {len(self.devices):,} devices, its most"
                return batch.refuse_from(0, "too_many_devices", detail)
            start, known = 0, set()
        elif st.epoch < 0:  # no watermark yet: its first reading starts one, wherever
            start, known = 0, st.features
        elif epoch < st.epoch:
            return batch  # stale_epoch, all of it
        else:
            base = st.seq if epoch == st.epoch else -1
            start, known = bisect.bisect_right(seqs, base), st.features
            far = bisect.bisect_right(seqs, base + self.max_seq_jump)
            if far < len(seqs):
                jumped = st.jumped_to
                if (
                    far == 0
                    and jumped is not None
                    and jumped[0] == epoch
                    and 0 < seqs[0] - jumped[1] <= self.max_seq_jump
                ):  # the device follows on from the seq refused before: a real jump
                    st.epoch, st.seq, st.jumped_to = epoch, jumped[1], None
                    self.dirty.add(device)
                else:
                    st.jumped_to = (epoch, seqs[-1])
                    detail = f"seq jumps past {base} by more than {self.max_seq_jump:,}"
                    batch = batch.refuse_from(far, "seq_jump", detail)
            elif start < len(seqs):
                st.jumped_to = None
        names = batch.batch.features
        if start < len(batch) and not known.issuperset(names):
            new = len(set(names) - known)
            if len(known) + new > self.max_features:
                detail = (
                    f"{new} new feature names on top of {len(known)} pass the device's "
                    f"most, {self.max_features:,}"
                )
                batch = batch.refuse_from(start, "too_many_features", detail)
        return batch

    def process(self, batch: Validated) -> LearnResult:
        """Predict, score, then learn each new reading of one device's batch, in order."""
        out = LearnResult()
        if not len(batch):  # all refused: a device is not made for it
            return out
        st = self.state(batch.batch.device)
        out.version = st.version
        out.fleet_version = st.fleet_version
        epoch = batch.batch.epoch
        seqs = batch.seqs
        if epoch < st.epoch:
            out.stale, out.skipped = seqs, len(seqs)
            return out
        if st.epoch < 0:  # no watermark: earlier readings predate this learner, not lost
            if not seqs:
                return out
            st.epoch, st.seq = epoch, seqs[0] - 1
            out.first_seq = seqs[0]
            self.dirty.add(batch.batch.device)
        elif epoch > st.epoch:
            st.epoch, st.seq = epoch, -1
            self.dirty.add(batch.batch.device)
        # Accepted sequence numbers increase strictly, so what was learned is a prefix.
        start = bisect.bisect_right(seqs, st.seq)
        out.skipped, out.duplicates = start, seqs[:start]
        if start == len(seqs):
            return out
        out.gap = seqs[-1] - st.seq - (len(seqs) - start)
        ys = batch.targets() if self.labels is None else batch.labels(self.labels)
        if start:
            ys = ys[start:]
        if self.mode == "minibatch" and batch.complete:
            y_pred = self._learn_many(st.model, batch, start, ys, out)
        else:
            xs = batch.features()
            if start:
                xs = xs[start:]
            if self.kind == "regressor":
                y_pred = self._learn_one_by_one(st.model, xs, ys)
            elif self.kind == "classifier":
                y_pred = self._classify_one_by_one(st.model, xs, ys, out)
            else:
                y_pred = self._score_one_by_one(st.model, xs, out)
        if self.kind == "regressor":
            out.non_finite = _null_non_finite(y_pred)
            self.metrics.update_many(ys, y_pred)
        elif self.kind == "classifier":
            self.metrics.update_many(ys, y_pred, out.p_true)  # type: ignore[call-arg]
        else:
            out.non_finite = _null_non_finite(y_pred)
            self.metrics.update_many(ys, y_pred)
        out.y_pred = y_pred
        out.y_true = ys
        st.seq = seqs[-1]
        st.learned += len(y_pred)
        self.learned += len(y_pred)
        names = batch.batch.features
        if not st.features.issuperset(names):
            st.features.update(names)
            self.most_features = max(self.most_features, len(st.features))
        self.dirty.add(batch.batch.device)
        return out

    @staticmethod
    def _learn_one_by_one(model: Any, xs: list[dict], ys: list[Any]) -> list[Any]:
        # River's progressive validation: predict, (score,) learn. Scoring is done for
        # the whole batch afterwards, which changes nothing: a metric never feeds back.
        predict, learn = model.predict_one, model.learn_one
        y_pred = []
        append = y_pred.append
        for x, y in zip(xs, ys):
            append(predict(x))
            if y is not None:
                learn(x, y)
        return y_pred

    def _classify_one_by_one(
        self, model: Any, xs: list[dict], ys: list[Any], out: LearnResult
    ) -> list[Any]:
        # Predict the class and its probability, then learn.
        predict, learn = model.predict_one, model.learn_one
        proba_of = model.predict_proba_one if self._has_proba else lambda x: {}
        argmax = self._argmax and self._has_proba
        y_pred: list[Any] = []
        proba: list[float | None] = []
        p_true: list[float] = []
        for x, y in zip(xs, ys):
            p = proba_of(x)
            # River's Classifier.predict_one, unless the model has its own
            c = (max(p, key=p.get) if p else None) if argmax else predict(x)
            y_pred.append(c)
            proba.append(p.get(c))
            p_true.append(p.get(True, 0.0) if p else float(c is True))
            if y is not None:
                learn(x, y)
        out.proba, out.p_true = proba, p_true
        return y_pred

    @staticmethod
    def _score_one_by_one(model: Any, xs: list[dict], out: LearnResult) -> list[Any]:
        # River's order for anomaly detectors: score, then learn; the target is never
        # learned. A filter classifies the score before the reading changes it.
        score, learn = model.score_one, model.learn_one
        scores: list[Any] = []
        final = _final_step(model)
        if not isinstance(final, base.AnomalyFilter):
            for x in xs:
                scores.append(score(x))
                learn(x)
            return scores
        classify, threshold = final.classify, _threshold_of(final)
        flags: list[bool] = []
        thresholds: list[float | None] = []
        for x in xs:
            s = score(x)
            scores.append(s)
            thresholds.append(threshold())
            flags.append(bool(classify(s)))
            learn(x)
        out.anomalies, out.thresholds = flags, thresholds
        return scores

    def _learn_many(
        self, model: Any, batch: Validated, start: int, ys: list[Any], out: LearnResult
    ) -> list[Any]:
        import pandas as pd  # River's mini-batch API takes DataFrames

        X = pd.DataFrame(batch.values[start:], columns=list(batch.batch.features))
        if self.kind == "classifier":
            # River's predict_many for classifiers: the column of the largest probability.
            P = model.predict_proba_many(X)
            y_pred = P.idxmax(axis="columns").tolist() if not P.empty else [None] * len(X)
            out.proba = P.max(axis="columns").tolist() if not P.empty else [None] * len(X)
            p_true = P[True] if True in P.columns else pd.Series(0.0, index=P.index)
            out.p_true = p_true.tolist()
        else:
            y_pred = model.predict_many(X).tolist()
        if self.labels is None:  # numbers: an absent target is NaN (validate refuses NaN)
            target = np.array(ys, dtype=float)
            has = ~np.isnan(target)
            y = pd.Series(target)
        else:  # labels as River's numpy code needs them, not objects
            y = pd.Series(ys, dtype=object)
            present = y.notna()
            y = y.where(present, 0).astype(bool if self.labels == "binary" else np.int64)
            has = present.to_numpy()
        if has.all():
            model.learn_many(X, y)
        elif has.any():
            model.learn_many(X[has], y[has])
        return y_pred


def _threshold_of(anomaly_filter: Any) -> Any:
    """A function giving the threshold a River anomaly filter compares scores with now."""
    quantile = getattr(anomaly_filter, "quantile", None)
    if quantile is not None:  # QuantileFilter: score >= quantile (inf before any score)
        return lambda: quantile.get() or math.inf
    if hasattr(anomaly_filter, "threshold"):  # ThresholdFilter
        return lambda: anomaly_filter.threshold
    return lambda: None


def _need_pandas() -> None:
    try:
        import pandas  # noqa: F401
    except ImportError:
        raise ValueError(
            "mini-batch mode needs pandas (River's learn_many takes DataFrames): "
            "pip install 'streampipe[minibatch]'"
        ) from None


def _null_non_finite(y_pred: list[Any]) -> int:
    """Replace non-finite predictions by None in place; return how many there were."""
    bad: list[int] | None = None
    if len(y_pred) > 8:  # for fewer, numpy's per-call cost exceeds the work
        try:
            values = np.asarray(y_pred)  # not dtype=float: that would make None a NaN
        except (TypeError, ValueError):
            values = np.empty(0, dtype=object)
        if values.dtype.kind in "biuf":  # all numbers; else (None among them) see below
            finite = np.isfinite(values)
            if finite.all():
                return 0
            bad = np.flatnonzero(~finite).tolist()
    if bad is None:
        bad = [
            i
            for i, p in enumerate(y_pred)
            if isinstance(p, (float, np.floating)) and not math.isfinite(p)
        ]
    for i in bad:
        y_pred[i] = None
    return len(bad)
