"""Authenticated checkpoints of a stage's learned state.

A checkpoint holds the per-device models, their ``(epoch, seq)`` watermarks and the
stage's River metrics, written together so they can never disagree. The file is
``MAGIC + HMAC-SHA256(key, body) + body`` where ``body`` is the pickled state, written
to a temporary file, fsynced and renamed over the previous checkpoint: a crash during
a write leaves the previous checkpoint whole.

The HMAC is checked *before* a single byte is unpickled, so a tampered, truncated or
foreign file (another key) is refused with :class:`CheckpointError` and never runs code.
The key comes from ``$STREAMPIPE_CHECKPOINT_KEY`` (hex) or ``<state_dir>/checkpoint.key``,
which is created with 32 random bytes and mode 0600 on first start.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> store = CheckpointStore(d, "edge-1")
>>> store.save({"answer": 42}, {"d1": [1, 2]})
>>> store.load()
({'answer': 42}, {'d1': [1, 2]})
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import secrets
from pathlib import Path
from typing import Any

__all__ = ["CheckpointError", "CheckpointStore"]

MAGIC = b"SPCK1\n"
KEY_ENV = "STREAMPIPE_CHECKPOINT_KEY"
_DIGEST = 32


class CheckpointError(ValueError):
    """A checkpoint exists but cannot be trusted or read."""


def _load_key(state_dir: Path) -> bytes:
    env = os.environ.get(KEY_ENV)
    if env:
        try:
            key = bytes.fromhex(env.strip())
        except ValueError:
            raise CheckpointError(f"${KEY_ENV} must be hex") from None
        if len(key) < 16:
            raise CheckpointError(f"${KEY_ENV} must hold at least 16 bytes")
        return key
    path = state_dir / "checkpoint.key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) < 16:
            raise CheckpointError(f"key file {path} is too short") from None
        return key
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


class CheckpointStore:
    """Saves and loads one stage's checkpoint in ``state_dir``."""

    def __init__(self, state_dir: str | os.PathLike[str], stage_id: str) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.dir / f"{stage_id}.checkpoint"
        self._key = _load_key(self.dir)

    def save(self, meta: Any, devices: dict[str, Any], *, full: bool = False) -> None:
        """Commit ``meta`` and the given devices' states (all of them when ``full``)."""
        if not full:
            loaded = self.load()
            if loaded is not None:
                devices = {**loaded[1], **devices}
        self._write((meta, dict(devices)))

    def _write(self, state: Any) -> None:
        body = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
        tag = hmac.new(self._key, body, hashlib.sha256).digest()
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC + tag + body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)

    def close(self) -> None:
        """Nothing held open between saves."""

    def load(self) -> Any | None:
        """The saved state, ``None`` if there is none; :class:`CheckpointError` if untrusted."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _DIGEST:
            raise CheckpointError(f"{self.path} is not a streampipe checkpoint")
        tag = data[len(MAGIC) : len(MAGIC) + _DIGEST]
        body = data[len(MAGIC) + _DIGEST :]
        if not hmac.compare_digest(tag, hmac.new(self._key, body, hashlib.sha256).digest()):
            raise CheckpointError(
                f"{self.path} fails its integrity check: tampered, truncated, or written "
                "with another key; refusing to load it"
            )
        try:
            return pickle.loads(body)  # authenticated above: written by us, with our key
        except Exception as exc:
            raise CheckpointError(f"{self.path} cannot be read: {exc}") from None
