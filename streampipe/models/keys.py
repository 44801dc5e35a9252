"""Ed25519 keys that sign model artifacts: the operator signs, every edge verifies.

``streampipe keys init DIR`` writes ``DIR/deploy.key`` (the private key, PKCS#8 PEM,
mode 0600, for ``streampipe deploy --signing-key``) and ``DIR/deploy.pub`` (the public
key, SubjectPublicKeyInfo PEM, for ``streampipe edge --deploy-key``). A key is named by
its *key id*: the first 8 bytes of the SHA-256 of the raw 32-byte public key, in hex;
artifacts carry it so an edge can tell "signed by another key" from "tampered".

Whoever holds the private key can make every edge that trusts its public key load and
run a pickle: keep it on the operator's machine, never on an edge. Its bytes are never
logged or printed.

Ed25519 rather than HMAC-SHA256: a shared HMAC key would sit on every edge, and anyone
who takes one edge apart could then sign models for all of them. With Ed25519 an edge
holds only what verifies.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> pair = init_keys(d)
>>> signer = load_signing_key(pair.private)
>>> verifier = load_verify_key(pair.public)
>>> signer.key_id == verifier.key_id == pair.key_id
True
>>> verifier.verify(signer.sign(b"model"), b"model")
True
>>> verifier.verify(signer.sign(b"model"), b"other")
False
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streampipe.secure.certs import MissingCryptography

__all__ = [
    "KeyFileError",
    "KeyPair",
    "MissingCryptography",
    "SigningKey",
    "VerifyKey",
    "init_keys",
    "key_id",
    "load_signing_key",
    "load_verify_key",
]

log = logging.getLogger(__name__)

PRIVATE_NAME, PUBLIC_NAME = "deploy.key", "deploy.pub"
INSTALL_HINT = (
    "signing and verifying models needs the 'cryptography' package: "
    "pip install cryptography (it is a dependency of streampipe; reinstall streampipe)"
)
#: A PEM key file is a few hundred bytes; anything much larger is not one.
MAX_KEY_FILE_BYTES = 16 * 1024


class KeyFileError(ValueError):
    """A key file that is missing, unreadable, or not the kind of key asked for."""


def _crypto() -> Any:
    """The parts of ``cryptography`` used here, or :class:`MissingCryptography`."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise MissingCryptography(INSTALL_HINT) from None
    return serialization, ed25519


def key_id(raw_public_key: bytes) -> str:
    """The id of a raw 32-byte Ed25519 public key: 16 hex digits.

    >>> key_id(bytes(32))
    '66687aadf862bd77'
    """
    return hashlib.sha256(raw_public_key).digest()[:8].hex()


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """An Ed25519 public key, as an edge holds it."""

    raw: bytes  # the 32-byte public key
    key_id: str

    @classmethod
    def from_raw(cls, raw: bytes) -> VerifyKey:
        if len(raw) != 32:
            raise KeyFileError("an Ed25519 public key is 32 bytes")
        return cls(raw, key_id(raw))

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of ``data``."""
        _, ed25519 = _crypto()
        from cryptography.exceptions import InvalidSignature

        try:
            ed25519.Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def pem(self) -> bytes:
        serialization, ed25519 = _crypto()
        return ed25519.Ed25519PublicKey.from_public_bytes(self.raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class SigningKey:
    """An Ed25519 private key, as the operator's ``deploy`` holds it. Never printed."""

    __slots__ = ("_key", "public")

    def __init__(self, key: Any) -> None:
        serialization, _ = _crypto()
        self._key = key
        self.public = VerifyKey.from_raw(
            key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )

    @classmethod
    def generate(cls) -> SigningKey:
        _, ed25519 = _crypto()
        return cls(ed25519.Ed25519PrivateKey.generate())

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return bytes(self._key.sign(data))

    def pem(self) -> bytes:
        serialization, _ = _crypto()
        return bytes(
            self._key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r})"


@dataclass(frozen=True, slots=True)
class KeyPair:
    """Where :func:`init_keys` wrote a key pair."""

    private: Path
    public: Path
    key_id: str


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # whatever the umask says
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def init_keys(directory: str | os.PathLike[str], *, force: bool = False) -> KeyPair:
    """Make a new Ed25519 key pair in ``directory``: ``deploy.key`` (0600), ``deploy.pub``.

    Refuses to replace an existing pair unless ``force``: edges that trust the old
    public key would refuse every model signed with the new one.
    """
    d = Path(directory)
    private, public = d / PRIVATE_NAME, d / PUBLIC_NAME
    existing = [p for p in (private, public) if p.exists()]
    if existing and not force:
        raise FileExistsError(
            f"{existing[0]} exists; pass --force to replace the key pair (edges that trust "
            "the old public key then refuse models signed with the new one)"
        )
    key = SigningKey.generate()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    for p in existing:
        p.unlink()
    _write(private, key.pem(), 0o600)
    _write(public, key.public.pem(), 0o644)
    return KeyPair(private, public, key.key_id)


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_KEY_FILE_BYTES:
            raise KeyFileError(f"{what} {p} is {size} bytes: not a key file")
        return p.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{what} {p} does not exist") from None
    except IsADirectoryError:
        raise KeyFileError(f"{what} {p} is a directory, not a key file") from None
    except PermissionError:
        raise KeyFileError(f"{what} {p} cannot be read (permission denied)") from None


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """The Ed25519 private key in the PEM file ``path`` (as ``keys init`` writes it)."""
    serialization, ed25519 = _crypto()
    data = _read(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"signing key {path} is encrypted; give an unencrypted key") from None
    except ValueError:
        raise KeyFileError(
            f"{path} is not a PEM private key (make one with `streampipe keys init DIR`)"
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        log.warning("signing key %s is readable by other users (mode %o): chmod 600 it", path, mode)
    return SigningKey(key)


def load_verify_key(path: str | os.PathLike[str]) -> VerifyKey:
    """The Ed25519 public key in the PEM file ``path``; refuses a private key, so an
    edge never ends up holding what signs."""
    serialization, ed25519 = _crypto()
    data = _read(path, "deploy key")
    if b"PRIVATE KEY" in data:
        raise KeyFileError(
            f"{path} is a private key: give edges the public key "
            f"({PUBLIC_NAME}), and keep the private one on the operator's machine"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise KeyFileError(
            f"{path} is not a PEM public key (make a pair with `streampipe keys init DIR`)"
        ) from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return VerifyKey.from_raw(
        key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
