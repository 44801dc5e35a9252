"""Model artifacts: a pickled River model, compressed, described and signed.

Layout (all integers big-endian)::

    b"SPMODEL" + format version (1 byte, 1)
    u32 header length, header: UTF-8 JSON (:class:`ArtifactHeader`)
    u32 payload length, payload: the pickled model, one zstd frame
    u16 signature length, signature: Ed25519 over every byte before this field

A signature length of 0 (or no signature field at all) is an unsigned artifact.

:func:`verify` treats its input as hostile and checks, in this order, before a single
byte is decompressed or unpickled: the total size, the magic and format version, the
lengths, the header's shape, the signer's key id, the Ed25519 signature, the payload's
SHA-256 against the header, and the declared model size against the limit. Only
:meth:`Artifact.model_bytes` decompresses — never past the declared size — and only
:meth:`Artifact.load` unpickles. Every refusal is an :class:`ArtifactError` whose
``reason`` (one of :data:`REASONS`) becomes a dead letter and a Prometheus label.

A verified artifact is trusted code: unpickling runs whatever its signer put in it.
The signature moves that trust from "whoever can publish on the broker" to "whoever
holds the private key".

>>> import pickle, tempfile
>>> from streampipe.models.keys import SigningKey
>>> key = SigningKey.generate()
>>> data = make_artifact(pickle.dumps({"w": 1.5}), name="power", version=2,
...                      kind="regressor", key=key)
>>> art = verify(data, key.public)
>>> art.header.name, art.header.version, art.load()
('power', 2, {'w': 1.5})
>>> def reason(data, key):
...     try:
...         verify(data, key)
...     except ArtifactError as err:
...         return err.reason
>>> reason(data[:-1] + bytes([data[-1] ^ 1]), key.public)
'bad_signature'
>>> reason(data, SigningKey.generate().public)
'wrong_key'
"""

from __future__ import annotations

import hashlib
import math
import pickle
import platform
import re
import struct
import time
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import orjson
import zstandard as zstd

from streampipe.models.keys import SigningKey, VerifyKey
from streampipe.topics import InvalidName, check_name

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_LIMITS",
    "FORMAT_VERSION",
    "KINDS",
    "REASONS",
    "Artifact",
    "ArtifactError",
    "ArtifactHeader",
    "ArtifactLimits",
    "make_artifact",
    "read_header",
    "unpickle",
    "verify",
]

#: MQTT v5 content type of artifacts on ``ROOT/models/<name>``.
CONTENT_TYPE = "application/vnd.streampipe.model"
MAGIC = b"SPMODEL"
FORMAT_VERSION = 1
SIGNATURE_BYTES = 64  # Ed25519
KINDS = ("regressor", "classifier", "anomaly")
#: Versions go up to 2**53 so that every JSON reader reads them exactly.
MAX_VERSION = 1 << 53
#: ``--devices`` patterns are fnmatch patterns over device ids (128 characters at most).
MAX_PATTERN_CHARS = 256
_LEVEL = 12  # ~3x smaller than the pickle for River models, in tens of ms per MiB
_WINDOW_LOG = 23  # 8 MiB: the decompressor never needs more memory than that

#: Every :attr:`ArtifactError.reason`: a bounded set, safe as a Prometheus label.
REASONS: frozenset[str] = frozenset(
    {
        "artifact_too_large",  # the message, its header or its model exceeds ArtifactLimits
        "artifact_malformed",  # not an artifact, truncated, bad lengths or header fields
        "artifact_unsupported_version",  # an artifact format this build cannot read
        "unsigned",  # no signature at all
        "wrong_key",  # signed, but by a key other than the edge's deploy key
        "bad_signature",  # claims our key, but the signature fails: tampered
        "digest_mismatch",  # signed, but the payload is not what the header's SHA-256 says
        "wrong_model_name",  # an artifact of another model name, on this model's topic
        "downgrade",  # a version not newer than the one the edge runs
        "version_collision",  # a version the edge runs (or ran) with another model in it
        "wrong_model_kind",  # e.g. a classifier for a regression stage
        "model_load_failed",  # verified, but it does not decompress or unpickle to a model
        "model_incompatible",  # e.g. a model without learn_many for a --mode minibatch stage
    }
)


class ArtifactError(ValueError):
    """An artifact refused; ``reason`` is one of :data:`REASONS`, ``str()`` says why.

    >>> ArtifactError("unsigned", "no signature").reason
    'unsigned'
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise AssertionError(f"unknown artifact error reason {reason!r}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[ArtifactError], tuple[str, str]]:
        return ArtifactError, (self.reason, str(self))


@dataclass(frozen=True, slots=True)
class ArtifactLimits:
    """What an edge accepts, checked before anything of that size is allocated."""

    # A River pipeline pickles to KiB, a forest of Hoeffding trees to a few MiB, and
    # compresses ~3x; 16 MiB stays far below Mosquitto's 256 MiB packet limit.
    max_artifact_bytes: int = 16 << 20
    # The header is a few hundred bytes of JSON; the spec in it is at most 2,000 chars.
    max_header_bytes: int = 16 << 10
    # What the pickle may inflate to: bounds the edge's memory for one deployment.
    max_model_bytes: int = 128 << 20


DEFAULT_LIMITS = ArtifactLimits()

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX16 = re.compile(r"[0-9a-f]{16}")


def _malformed(message: str) -> ArtifactError:
    return ArtifactError("artifact_malformed", message)


def _int(value: Any, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _malformed(f"header field {what} must be a whole number in {low}..{high}")
    return value


def _str(value: Any, what: str, longest: int) -> str:
    if not isinstance(value, str) or len(value) > longest:
        raise _malformed(f"header field {what} must be a string of at most {longest} chars")
    return value


@dataclass(frozen=True, slots=True)
class ArtifactHeader:
    """What an artifact says about its model; signed together with the model.

    ``version`` 1 is the model an edge builds from its own ``--model`` spec, so
    deployed versions start at 2. ``devices`` is an fnmatch pattern over device ids.
    ``restores`` is set by a rollback: the version whose model this one carries again.

    >>> h = ArtifactHeader("power", 2, 0.0, "regressor", "0" * 64, 10, "0" * 16)
    >>> ArtifactHeader.from_json(h.to_json()) == h
    True
    >>> ArtifactHeader("power", 0, 0.0, "regressor", "0" * 64, 10, "0" * 16)
    Traceback (most recent call last):
    ...
    streampipe.models.artifact.ArtifactError: header field version must be a whole number in 1..9007199254740992
    """  # noqa: E501

    name: str
    version: int
    created: float
    kind: str
    sha256: str  # of the payload, as it travels (compressed)
    size: int  # bytes of the pickle, once decompressed
    key_id: str
    devices: str = "*"
    spec: str | None = None
    river: str = ""
    python: str = ""
    restores: int | None = None
    format: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        try:
            check_name(self.name, "model name")
        except InvalidName as exc:
            raise _malformed(str(exc)) from None
        _int(self.version, "version", 1, MAX_VERSION)
        if isinstance(self.created, bool) or not isinstance(self.created, (int, float)):
            raise _malformed("header field created must be a number (Unix time)")
        if not math.isfinite(self.created):
            raise _malformed("header field created must be finite")
        if self.kind not in KINDS:
            raise _malformed(f"header field kind must be one of {', '.join(KINDS)}")
        if not isinstance(self.sha256, str) or not _HEX64.fullmatch(self.sha256):
            raise _malformed("header field sha256 must be 64 lowercase hex digits")
        _int(self.size, "size", 0, 1 << 62)
        if not isinstance(self.key_id, str) or not _HEX16.fullmatch(self.key_id):
            raise _malformed("header field key_id must be 16 lowercase hex digits")
        if not _str(self.devices, "devices", MAX_PATTERN_CHARS):
            raise _malformed("header field devices must not be empty")
        if self.spec is not None:
            _str(self.spec, "spec", 2000)
        _str(self.river, "river", 64)
        _str(self.python, "python", 64)
        if self.restores is not None:
            _int(self.restores, "restores", 1, MAX_VERSION)
        _int(self.format, "format", 1, 255)

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, data: bytes) -> ArtifactHeader:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise _malformed("the header is not JSON") from None
        if not isinstance(obj, dict):
            raise _malformed("the header is not a JSON object")
        known = cls.__dataclass_fields__  # unknown keys: from a newer writer, ignored
        missing = [f for f in _REQUIRED if f not in obj]
        if missing:
            raise _malformed(f"the header lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in obj.items() if k in known})

    def describe(self) -> str:
        """One line for logs and the command line."""
        extra = f", restoring version {self.restores}'s model" if self.restores else ""
        return (
            f"model {self.name} version {self.version} (a {self.kind}, pickled in "
            f"{self.size:,} bytes, for devices {self.devices!r}, signed by {self.key_id}{extra})"
        )


_REQUIRED = tuple(
    f.name for f in fields(ArtifactHeader) if f.default is MISSING and f.default_factory is MISSING
)


@dataclass(frozen=True, slots=True)
class Artifact:
    """An artifact whose signature and digest have been verified."""

    header: ArtifactHeader
    payload: bytes  # the compressed pickle

    def model_bytes(self, limits: ArtifactLimits = DEFAULT_LIMITS) -> bytes:
        """The pickle, decompressed to exactly the declared size and never further."""
        size = self.header.size
        if size > limits.max_model_bytes:
            raise ArtifactError(
                "artifact_too_large",
                f"the model is {size:,} bytes, over the limit of {limits.max_model_bytes:,}",
            )
        dctx = zstd.ZstdDecompressor(max_window_size=1 << _WINDOW_LOG)
        try:
            out = dctx.stream_reader(self.payload, read_across_frames=False).read(size + 1)
        except zstd.ZstdError as exc:
            raise ArtifactError("model_load_failed", f"corrupt zstd payload: {exc}") from None
        if len(out) != size:
            raise ArtifactError(
                "model_load_failed",
                f"the payload inflates to {'more than' if len(out) > size else len(out)} "
                f"bytes, not the {size:,} its header declares",
            )
        return out

    def load(self, limits: ArtifactLimits = DEFAULT_LIMITS) -> Any:
        """The model. Runs the pickle: it is only reachable through :func:`verify`."""
        return unpickle(self.model_bytes(limits), self.header)


def unpickle(model_pickle: bytes, header: ArtifactHeader) -> Any:
    """Unpickle the model bytes of a *verified* artifact; :class:`ArtifactError` if that fails."""
    try:
        return pickle.loads(model_pickle)  # verified: signed by the deploy key
    except Exception as exc:
        raise ArtifactError(
            "model_load_failed",
            f"the model does not unpickle here ({type(exc).__name__}: {exc}); it was "
            f"made with River {header.river or '?'}, Python {header.python or '?'}",
        ) from None


def _compress(raw: bytes) -> bytes:
    params = zstd.ZstdCompressionParameters.from_level(_LEVEL, source_size=len(raw))
    if params.window_log > _WINDOW_LOG:
        params = zstd.ZstdCompressionParameters.from_level(
            _LEVEL, source_size=len(raw), window_log=_WINDOW_LOG
        )
    return zstd.ZstdCompressor(compression_params=params).compress(raw)


def make_artifact(
    model_pickle: bytes,
    *,
    name: str,
    version: int,
    kind: str,
    key: SigningKey,
    devices: str = "*",
    spec: str | None = None,
    created: float | None = None,
    river: str | None = None,
    python: str | None = None,
    restores: int | None = None,
) -> bytes:
    """A signed artifact carrying ``model_pickle`` (the bytes of ``pickle.dumps(model)``).

    ``river`` and ``python`` say what made the pickle (by default: this process).
    """
    if river is None:
        import river as river_pkg

        river = river_pkg.__version__
    payload = _compress(model_pickle)
    header = ArtifactHeader(
        name=name,
        version=version,
        created=time.time() if created is None else created,
        kind=kind,
        sha256=hashlib.sha256(payload).hexdigest(),
        size=len(model_pickle),
        key_id=key.key_id,
        devices=devices,
        spec=spec,
        river=river,
        python=platform.python_version() if python is None else python,
        restores=restores,
    )
    head = header.to_json()
    signed = b"".join(
        (
            MAGIC,
            bytes([FORMAT_VERSION]),
            struct.pack(">I", len(head)),
            head,
            struct.pack(">I", len(payload)),
            payload,
        )
    )
    signature = key.sign(signed)
    return signed + struct.pack(">H", len(signature)) + signature


@dataclass(frozen=True, slots=True)
class _Parts:
    header: ArtifactHeader
    signed: memoryview
    payload: memoryview
    signature: bytes


def _split(data: bytes, limits: ArtifactLimits) -> _Parts:
    """Check sizes and lengths of untrusted bytes and cut them into their parts."""
    if len(data) > limits.max_artifact_bytes:
        raise ArtifactError(
            "artifact_too_large",
            f"the artifact is {len(data):,} bytes, over the limit of {limits.max_artifact_bytes:,}",
        )
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 1:
        raise _malformed("not a streampipe model artifact (bad magic)")
    if data[len(MAGIC)] != FORMAT_VERSION:
        raise ArtifactError(
            "artifact_unsupported_version",
            f"artifact format {data[len(MAGIC)]} is not supported (this build reads "
            f"{FORMAT_VERSION})",
        )
    view = memoryview(data)
    pos = len(MAGIC) + 1

    def take(n: int, what: str) -> memoryview:
        nonlocal pos
        if n > len(view) - pos:
            raise _malformed(f"truncated: the {what} runs past the end")
        part = view[pos : pos + n]
        pos += n
        return part

    (hlen,) = struct.unpack(">I", take(4, "header length"))
    if hlen > limits.max_header_bytes:
        raise ArtifactError(
            "artifact_too_large", f"a header of {hlen:,} bytes is over {limits.max_header_bytes:,}"
        )
    head = take(hlen, "header")
    (plen,) = struct.unpack(">I", take(4, "payload length"))
    payload = take(plen, "payload")
    signed = view[:pos]
    header = ArtifactHeader.from_json(bytes(head))
    if pos == len(view):
        signature = b""
    else:
        (slen,) = struct.unpack(">H", take(2, "signature length"))
        signature = bytes(take(slen, "signature"))
        if pos != len(view):
            raise _malformed(f"{len(view) - pos} bytes after the signature")
    return _Parts(header, signed, payload, signature)


def read_header(data: bytes, limits: ArtifactLimits = DEFAULT_LIMITS) -> ArtifactHeader:
    """The header of an artifact, *unverified*: for display and version numbering only."""
    return _split(data, limits).header


def verify(data: bytes, key: VerifyKey, limits: ArtifactLimits = DEFAULT_LIMITS) -> Artifact:
    """Check an untrusted artifact against the deploy key; raise :class:`ArtifactError`.

    Nothing is decompressed or unpickled here: that is :meth:`Artifact.load`'s, after.
    """
    parts = _split(data, limits)
    header = parts.header
    if not parts.signature:
        raise ArtifactError("unsigned", "the artifact carries no signature")
    if header.key_id != key.key_id:
        raise ArtifactError(
            "wrong_key",
            f"signed by key {header.key_id}, not by the deploy key {key.key_id} this edge trusts",
        )
    if len(parts.signature) != SIGNATURE_BYTES or not key.verify(
        parts.signature, bytes(parts.signed)
    ):
        raise ArtifactError(
            "bad_signature",
            "signature does not verify: the artifact was altered after it was signed",
        )
    if hashlib.sha256(parts.payload).hexdigest() != header.sha256:
        raise ArtifactError(
            "digest_mismatch", "the payload's SHA-256 is not the one its signed header states"
        )
    if header.size > limits.max_model_bytes:
        raise ArtifactError(
            "artifact_too_large",
            f"the model is {header.size:,} bytes, over the limit of {limits.max_model_bytes:,}",
        )
    return Artifact(header, bytes(parts.payload))
