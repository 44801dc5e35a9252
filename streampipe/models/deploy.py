"""``streampipe deploy``: publish a signed model artifact for edges to hot-swap to.

An artifact is published retained, QoS 1, on ``ROOT/models/<name>``: an edge started
later gets it the moment it subscribes. The artifact it replaces is first re-published,
retained, on ``ROOT/models/<name>/previous``; that is what ``--rollback`` goes back to.

Versions only go up, because edges refuse a version not newer than the one they run,
and a version names one artifact: an edge refuses another model under a version it
runs (``version_collision``). What is retained on the broker is not enough to number
the next version: anyone who can publish there can re-publish an old, validly signed
artifact, after which "retained + 1" would be a version some edges already ran with
another model. So the deployer also keeps a :class:`VersionLedger` of its own (the CLI:
``deploy.versions`` beside the signing key) with the highest version it published of
each model and that artifact's SHA-256:

- a deployment's version defaults to one more than the highest of the retained
  artifact's, the previous artifact's and the ledger's (2 when there is none: version
  1 is what an edge builds from its own ``--model`` spec); an explicit ``--version``
  at or below that highest is refused;
- a rollback publishes the previous artifact's model, unchanged, as a *new* version
  (current + 1) whose header says which version it ``restores``. The artifact it
  replaces becomes the previous one, so a second rollback undoes the first.

Reading "the retained artifact" is exact, not a guess after a timeout: after
subscribing, :class:`ModelPublisher` publishes a probe to a topic of its own and waits
for it to come back; the broker sends retained messages when it handles the
SUBSCRIBE, so by the time the probe returns they have all arrived.

The header of the retained artifact is read *unverified* to number the next version
(anyone it could mislead would have to be able to publish there: in the secured set-up,
only the operator can). A rollback re-signs an old model, so it verifies the previous
artifact against the signing key's own public key first and refuses anything else.
Neither deploying nor rolling back unpickles a received artifact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streampipe.models.artifact import (
    CONTENT_TYPE,
    DEFAULT_LIMITS,
    MAX_PATTERN_CHARS,
    ArtifactError,
    ArtifactHeader,
    ArtifactLimits,
    make_artifact,
    read_header,
    verify,
)
from streampipe.models.keys import SigningKey
from streampipe.topics import Topics, check_name
from streampipe.transport import BrokerURL, Connection, Message, MQTTError

__all__ = ["DeployError", "ModelPublisher", "Published", "VersionLedger", "read_model_file"]

log = logging.getLogger(__name__)


class DeployError(ValueError):
    """A deployment or rollback that cannot be made; ``str()`` says why and what to do."""


@dataclass(frozen=True, slots=True)
class Published:
    """What a deployment or rollback published, and the artifact it replaced."""

    header: ArtifactHeader
    size: int  # bytes of the artifact
    replaced: ArtifactHeader | None


class VersionLedger:
    """The highest version this deployer published of each model, with its SHA-256.

    A JSON file (mode 0600) that only the deployer writes: the versions it numbers from
    cannot be lowered by what someone re-publishes on the broker. Keyed by topic root
    and model name, as those are different deployments.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     ledger = VersionLedger(tmp + "/deploy.versions")
    ...     ledger.record("streampipe", "power", 3, "ab" * 32)
    ...     VersionLedger(tmp + "/deploy.versions").highest("streampipe", "power")
    (3, 'abababababababababababababababababababababababababababababababab')
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def beside(cls, signing_key: str | os.PathLike[str]) -> VersionLedger:
        """The ledger kept next to a signing key file: ``deploy.key`` -> ``deploy.versions``."""
        key = Path(signing_key)
        return cls(key.with_name(key.stem + ".versions"))

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise DeployError(
                f"the version ledger {self.path} cannot be read ({exc}): fix or remove it "
                "(then give --version above every version deployed so far)"
            ) from None
        if not isinstance(data, dict):
            raise DeployError(f"the version ledger {self.path} is not a JSON object")
        return data

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held from reading the highest version to recording the next one: deployers on
        this machine take turns (an exclusive lock on ``<ledger>.lock``)."""
        import fcntl  # POSIX; the operator's machine

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def highest(self, root: str, name: str) -> tuple[int, str] | None:
        """The highest version published of ``name`` under ``root`` and its SHA-256."""
        entry = self._read().get(f"{root}/{name}")
        if not isinstance(entry, dict) or type(entry.get("version")) is not int:
            return None
        return entry["version"], str(entry.get("sha256", ""))

    def record(self, root: str, name: str, version: int, sha256: str) -> None:
        """Remember a published version: written to a temporary file, synced, renamed."""
        data = self._read()
        key = f"{root}/{name}"
        old = data.get(key)
        if isinstance(old, dict) and type(old.get("version")) is int and old["version"] > version:
            return
        data[key] = {"version": version, "sha256": sha256}
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(data, indent=1, sort_keys=True).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def read_model_file(path: str | Path, limits: ArtifactLimits = DEFAULT_LIMITS) -> tuple[bytes, str]:
    """The bytes of a pickled River model and its kind (regressor, classifier, anomaly).

    The file is unpickled here, on the operator's machine, to check that it holds a River
    model an edge can run: deploy only files you made (``pickle.dump``, ``export-model``).
    """
    from streampipe.learn.spec import model_kind  # imports River: only when deploying

    p = Path(path)
    try:
        size = p.stat().st_size
        if size > limits.max_model_bytes:
            raise DeployError(
                f"{p} is {size:,} bytes; edges accept models of at most {limits.max_model_bytes:,}"
            )
        data = p.read_bytes()
    except FileNotFoundError:
        raise DeployError(f"model file {p} does not exist") from None
    except IsADirectoryError:
        raise DeployError(f"model file {p} is a directory") from None
    try:
        model = pickle.loads(data)  # the operator's own file
    except Exception as exc:
        raise DeployError(f"{p} is not a pickled model ({type(exc).__name__}: {exc})") from None
    if not callable(getattr(model, "learn_one", None)):
        raise DeployError(f"{p} holds a {type(model).__name__}, not a River model")
    try:
        kind = model_kind(model)
    except ValueError as exc:
        raise DeployError(f"{p}: {exc}") from None
    return data, kind


class ModelPublisher:
    """A connection for publishing model artifacts under one topic root.

    >>> from streampipe.broker import PrivateMosquitto
    >>> from streampipe.models.keys import SigningKey
    >>> import pickle
    >>> from river import linear_model
    >>> with PrivateMosquitto() as broker, ModelPublisher(broker.url, Topics()) as pub:
    ...     key = SigningKey.generate()
    ...     model = pickle.dumps(linear_model.LinearRegression())
    ...     first = pub.deploy(model, "regressor", name="power", key=key)
    ...     second = pub.deploy(model, "regressor", name="power", key=key)
    ...     back = pub.rollback("power", key)
    >>> first.header.version, second.header.version, back.header.version, back.header.restores
    (2, 3, 4, 2)
    """

    def __init__(
        self, url: BrokerURL, topics: Topics, *, timeout: float = 10.0, client_id: str = ""
    ) -> None:
        self.topics = topics
        self.timeout = timeout
        self._lock = threading.Condition()
        self._received: dict[str, bytes] = {}
        self.conn = Connection(
            url,
            client_id or f"streampipe-deploy-{uuid.uuid4().hex[:12]}",
            on_message=self._on_message,
        ).connect(timeout)

    def __enter__(self) -> ModelPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    def _on_message(self, msg: Message) -> None:
        with self._lock:
            self._received[msg.topic] = msg.payload
            self._lock.notify_all()

    def retained(self, name: str) -> tuple[bytes | None, bytes | None]:
        """The artifacts retained now on ``models/<name>`` and ``models/<name>/previous``."""
        check_name(name, "model name")
        current, previous = self.topics.models(name), self.topics.previous_model(name)
        probe = f"{current}/probe/{uuid.uuid4().hex}"
        with self._lock:
            self._received.clear()
        self.conn.subscribe([current, previous, probe], qos=1, timeout=self.timeout)
        try:
            self._wait(self.conn.publish(probe, b"", qos=1), probe)
            with self._lock:
                if not self._lock.wait_for(lambda: probe in self._received, self.timeout):
                    raise MQTTError(
                        f"broker did not send back a probe within {self.timeout:g} s: "
                        "cannot tell which model is deployed"
                    )
                got = dict(self._received)
        finally:
            self.conn.unsubscribe([current, previous, probe])
        return got.get(current) or None, got.get(previous) or None

    def deploy(
        self,
        model_pickle: bytes,
        kind: str,
        *,
        name: str,
        key: SigningKey,
        version: int | None = None,
        devices: str = "*",
        spec: str | None = None,
        ledger: VersionLedger | None = None,
    ) -> Published:
        """Sign ``model_pickle`` and publish it as the next version of model ``name``,
        numbered after the highest version retained or in ``ledger``. Deployers sharing
        a ledger take turns, so two cannot pick one version."""
        with ledger.locked() if ledger is not None else contextlib.nullcontext():
            return self._deploy(model_pickle, kind, name, key, version, devices, spec, ledger)

    def _deploy(
        self,
        model_pickle: bytes,
        kind: str,
        name: str,
        key: SigningKey,
        version: int | None,
        devices: str,
        spec: str | None,
        ledger: VersionLedger | None,
    ) -> Published:
        if not devices or len(devices) > MAX_PATTERN_CHARS:
            raise DeployError(f"--devices must be 1 to {MAX_PATTERN_CHARS} characters")
        current, previous = self.retained(name)
        replaced = _header_or_none(current, self.topics.models(name), explicit=version)
        highest, why = self._highest(name, replaced, previous, ledger)
        if version is None:
            version = highest + 1
        elif version <= highest:
            raise DeployError(
                f"version {version} is not newer than version {highest} ({why}), so edges "
                "would refuse it as a downgrade, or as a version_collision where that "
                "version is another model"
            )
        artifact = make_artifact(
            model_pickle, name=name, version=version, kind=kind, key=key, devices=devices, spec=spec
        )
        return self._publish(name, artifact, current if replaced is not None else None, ledger)

    def _highest(
        self,
        name: str,
        current: ArtifactHeader | None,
        previous: bytes | None,
        ledger: VersionLedger | None,
    ) -> tuple[int, str]:
        """The highest version of ``name`` anyone may run, and where it was seen."""
        topic = self.topics.models(name)
        seen = [(1, "what an edge builds from its --model")]
        if current is not None:
            seen.append((current.version, f"retained on {topic}"))
        if previous is not None:
            with contextlib.suppress(ArtifactError):
                seen.append((read_header(previous).version, "the previous version"))
        published = ledger.highest(self.topics.root, name) if ledger is not None else None
        if ledger is not None and published is not None:
            seen.append((published[0], f"published last, says {ledger.path}"))
            if current is not None and current.version < published[0]:
                log.warning(
                    "model %s version %d is retained on %s, but version %d was published "
                    "after it: someone re-published an old artifact; edges started since "
                    "run it until this deployment",
                    name, current.version, topic, published[0],
                )  # fmt: skip
        return max(seen, key=lambda s: s[0])

    def rollback(
        self, name: str, key: SigningKey, *, ledger: VersionLedger | None = None
    ) -> Published:
        """Publish the previous artifact's model again, as a new version."""
        with ledger.locked() if ledger is not None else contextlib.nullcontext():
            return self._rollback(name, key, ledger)

    def _rollback(self, name: str, key: SigningKey, ledger: VersionLedger | None) -> Published:
        current, previous = self.retained(name)
        topic = self.topics.models(name)
        if current is None:
            raise DeployError(f"no model {name!r} is deployed (nothing retained on {topic})")
        if previous is None:
            raise DeployError(
                f"no previous version of model {name!r} is kept on "
                f"{self.topics.previous_model(name)}: nothing to roll back to"
            )
        now = _header_or_none(current, topic, explicit=None)
        assert now is not None
        try:
            old = verify(previous, key.public)
            model = old.model_bytes()
        except ArtifactError as exc:
            raise DeployError(
                f"the previous artifact of model {name!r} cannot be re-published: {exc}"
            ) from None
        h = old.header
        highest, _ = self._highest(name, now, previous, ledger)
        artifact = make_artifact(
            model,
            name=name,
            version=highest + 1,
            kind=h.kind,
            key=key,
            devices=h.devices,
            spec=h.spec,
            river=h.river,
            python=h.python,
            restores=h.version,
        )
        return self._publish(name, artifact, current, ledger)

    def _publish(
        self,
        name: str,
        artifact: bytes,
        replaced: bytes | None,
        ledger: VersionLedger | None = None,
    ) -> Published:
        if len(artifact) > DEFAULT_LIMITS.max_artifact_bytes:
            raise DeployError(
                f"the artifact is {len(artifact):,} bytes; edges accept at most "
                f"{DEFAULT_LIMITS.max_artifact_bytes:,}"
            )
        if replaced is not None:
            topic = self.topics.previous_model(name)
            self._wait(self._send(topic, replaced), topic)
        header = read_header(artifact)
        if ledger is not None:
            # Before sending: a publish that times out may still reach edges, and its
            # version must not be numbered again.
            ledger.record(self.topics.root, name, header.version, header.sha256)
        topic = self.topics.models(name)
        self._wait(self._send(topic, artifact), topic)
        log.debug("published %s on %s", header.describe(), topic)
        return Published(header, len(artifact), read_header(replaced) if replaced else None)

    def _send(self, topic: str, payload: bytes) -> Any:
        return self.conn.publish(topic, payload, qos=1, retain=True, content_type=CONTENT_TYPE)

    def _wait(self, info: Any, topic: str) -> None:
        info.wait_for_publish(self.timeout)
        if not info.is_published():
            raise MQTTError(f"broker did not acknowledge the message on {topic} in time")


def _header_or_none(
    data: bytes | None, topic: str, *, explicit: int | None
) -> ArtifactHeader | None:
    """The header of a retained artifact, to number the next version after it."""
    if data is None:
        return None
    try:
        return read_header(data)
    except ArtifactError as exc:
        if explicit is not None:
            log.warning(
                "the message retained on %s is not an artifact (%s): replacing it", topic, exc
            )
            return None
        raise DeployError(
            f"the message retained on {topic} is not a readable artifact ({exc}); "
            "give --version to replace it"
        ) from None
