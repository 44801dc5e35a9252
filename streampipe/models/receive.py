"""The edge side of deployment: verify a model artifact, then refuse it or hot-swap to it.

An edge started with ``--deploy-key`` subscribes to ``ROOT/models/<model name>``. Its
worker thread takes artifacts from the same queue as readings, so a swap happens in
between two messages, in the order they arrived: every reading before it is predicted
by the old model, every reading after it by the new one, and none is skipped or
processed twice. The swap changes the learner, so the artifact message is acknowledged
with the readings, after the checkpoint that records the new models and version.

A refused artifact becomes a dead letter with its reason (one of
:data:`~streampipe.models.artifact.REASONS`) and a count in
``streampipe_rejected_total{reason=...}``; the stage goes on with the model it runs.

>>> import pickle
>>> from river import linear_model
>>> from streampipe.models.artifact import make_artifact
>>> from streampipe.models.keys import SigningKey
>>> from streampipe.stage import EdgeStage
>>> key = SigningKey.generate()
>>> stage = EdgeStage("edge-1")
>>> receiver = ModelReceiver(stage, key.public, "power")
>>> model = pickle.dumps(linear_model.LinearRegression())
>>> art = make_artifact(model, name="power", version=2, kind="regressor", key=key)
>>> [m.topic for m in receiver.handle(receiver.topic, art)]
['streampipe/metrics/edge-1']
>>> stage.learner.version, stage.stats.model_version
(2, 2)
>>> tampered = art[:-70] + bytes([art[-70] ^ 1]) + art[-69:]  # a bit of the model
>>> [m.topic for m in receiver.handle(receiver.topic, tampered)]
['streampipe/deadletter/edge-1']
>>> stage.stats.rejected
{'bad_signature': 1}
"""

from __future__ import annotations

import logging
from typing import Any

from streampipe.learn.learner import supports_minibatch
from streampipe.learn.spec import model_kind
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

__all__ = ["ModelReceiver"]

log = logging.getLogger(__name__)


class ModelReceiver:
    """Verifies artifacts for one model name and hot-swaps a stage's learner to them."""

    def __init__(
        self,
        stage: EdgeStage,
        key: VerifyKey,
        name: str,
        limits: ArtifactLimits = DEFAULT_LIMITS,
    ) -> None:
        self.stage = stage
        self.key = key
        self.name = check_name(name, "model name")
        self.limits = limits
        self.topic = stage.topics.models(self.name)

    def handle(self, topic: str, payload: bytes) -> list[Outgoing]:
        """Process one message from the models topic: swap, ignore or dead-letter it."""
        if not payload:  # a cleared retained artifact: keep what runs
            return []
        try:
            art = verify(payload, self.key, self.limits)
            if self._already_running(art):
                return []
            raw = self._check(art)
        except ArtifactError as exc:
            log.warning("refused a model artifact on %s: %s (%s)", topic, exc.reason, exc)
            return [self.stage.dead_letter(topic, payload, exc.reason, str(exc))]
        h = art.header
        swapped = self.stage.learner.deploy(h.version, raw, h.devices, h.sha256)
        stats = self.stage.stats
        stats.model_version = h.version
        stats.swaps += 1
        log.info("hot swap to %s: %d devices swapped", h.describe(), swapped)
        return [self.stage.metrics_message()]

    def _already_running(self, art: Artifact) -> bool:
        """The artifact this stage already runs, delivered again (a restart, a retained
        copy after a checkpoint): nothing to do, and nothing wrong either."""
        learner = self.stage.learner
        newest = learner.deployed[-1] if learner.deployed else None
        return (
            newest is not None
            and newest.version == art.header.version == learner.version
            and newest.sha256 == art.header.sha256
            and newest.devices == art.header.devices
        )

    def _check(self, art: Artifact) -> bytes:
        """Everything but the signature, which :func:`verify` checked; the model's pickle."""
        h = art.header
        learner = self.stage.learner
        if h.name != self.name:
            raise ArtifactError(
                "wrong_model_name", f"an artifact of model {h.name!r} on {self.name!r}'s topic"
            )
        known = {d.sha256 for d in learner.deployed if d.version == h.version and d.sha256}
        if known and h.sha256 not in known:
            # Two different models signed as one version: whichever an edge runs, the
            # version would not say which predictions came from which (issue 18 §6).
            raise ArtifactError(
                "version_collision",
                f"version {h.version} is already another model here (SHA-256 "
                f"{min(known)[:12]}…, not {h.sha256[:12]}…): a version names one artifact",
            )
        if h.version <= learner.version:
            raise ArtifactError(
                "downgrade",
                f"version {h.version} is not newer than version {learner.version}, which runs",
            )
        if h.kind != learner.kind:
            raise ArtifactError(
                "wrong_model_kind", f"a {h.kind} cannot replace this stage's {learner.kind}"
            )
        raw = art.model_bytes(self.limits)
        model = unpickle(raw, h)
        kind = _kind(model)
        if kind != learner.kind:
            raise ArtifactError(
                "wrong_model_kind",
                f"the artifact says {h.kind}, but its model is "
                + (f"a {kind}" if kind else f"a {type(model).__name__}, not a River model"),
            )
        if learner.mode == "minibatch" and not supports_minibatch(model):
            raise ArtifactError(
                "model_incompatible",
                f"{type(model).__name__} cannot learn in mini-batches and this stage runs "
                "--mode minibatch",
            )
        return raw


def _kind(model: Any) -> str | None:
    if not (callable(getattr(model, "learn_one", None))):
        return None
    try:
        return model_kind(model)
    except (ValueError, TypeError):
        return None
