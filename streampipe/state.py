"""Authenticated, incremental checkpoints of a stage's learned state.

A checkpoint holds the stage-level state (``meta``: model spec, metric scores, counters)
and one row per device (its model and ``(epoch, seq)`` watermark); a stage may keep
other rows beside them, which the store treats alike, under names no device id has
(with a ``/``: a challenger's devices, the field-name schemas the stage has seen).
:meth:`save` is one SQLite transaction that replaces ``meta`` and only the devices it
is given, so its cost follows what changed, not how many devices there are. SQLite
gives the atomicity: a process killed at any moment leaves the previous commit whole,
meta and devices alike.

Every row is pickled and carries an HMAC-SHA256 over a domain tag, the stage id, the
row's kind, the device name, its commit number and the pickle, so a tampered row, a row
moved to another device or copied from another stage, or a file written with another key
is refused with :class:`CheckpointError`; all HMACs are checked *before* a single byte is
unpickled, so such a file never runs code. The stage row also vouches for the commit
number and the number of device rows, so a deleted device row, or a stage row older than
its devices, is refused too. Not detected: an older copy of this same checkpoint put
back, whole or a device row at a time (each row is authenticated on its own).

The key comes from ``$STREAMPIPE_CHECKPOINT_KEY`` (hex) or ``<state_dir>/checkpoint.key``,
which is created with 32 random bytes and mode 0600 on first start. A store locks
``<state_dir>/<stage_id>.lock`` while open: a second process for the same stage is
refused at once, and the lock dies with the process that held it.

>>> import tempfile
>>> store = CheckpointStore(tempfile.mkdtemp(), "edge-1")
>>> store.load() is None
True
>>> store.save({"readings": 2}, {"d1": "model 1", "d2": "model 2"})
>>> store.save({"readings": 3}, {"d2": "model 2'"})  # d1 is untouched
>>> store.load()
({'readings': 3}, {'d1': 'model 1', 'd2': "model 2'"})
>>> store.close()
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import os
import pickle
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["CheckpointError", "CheckpointStore"]

KEY_ENV = "STREAMPIPE_CHECKPOINT_KEY"
#: In the SQLite header (``PRAGMA application_id``, ``user_version``): "a streampipe
#: checkpoint, row format 1" — anything else is not ours and is never touched.
APPLICATION_ID = 0x53504350  # "SPCP"
FORMAT_VERSION = 1
#: WAL with ``synchronous=FULL``: one fsync per commit, of the log only; a rollback
#: journal (DELETE) fsyncs the journal and then the database, ~2x slower per small
#: commit here (``python benchmarks/checkpoint.py --journal-mode delete``).
JOURNAL_MODE = "wal"

_DOMAIN = b"streampipe checkpoint row v1"
_SQLITE_MAGIC = b"SQLite format 3\x00"
_SCHEMA = (
    """CREATE TABLE meta (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        commit_no INTEGER NOT NULL,
        devices INTEGER NOT NULL,
        blob BLOB NOT NULL,
        mac BLOB NOT NULL)""",
    """CREATE TABLE devices (
        device TEXT PRIMARY KEY,
        commit_no INTEGER NOT NULL,
        blob BLOB NOT NULL,
        mac BLOB NOT NULL)""",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {FORMAT_VERSION}",
)
_UPSERT = """INSERT INTO devices (device, commit_no, blob, mac) VALUES (?, ?, ?, ?)
    ON CONFLICT (device) DO UPDATE
    SET commit_no = excluded.commit_no, blob = excluded.blob, mac = excluded.mac"""


class CheckpointError(ValueError):
    """A checkpoint cannot be trusted, read or written, or its stage is in use."""


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


def _lock(state_dir: Path, stage_id: str) -> IO[str]:
    """Hold ``<stage_id>.lock`` exclusively, or say which process does."""
    fd = os.open(state_dir / f"{stage_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    f = os.fdopen(fd, "r+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = f.read().strip() or "unknown"
        f.close()
        raise CheckpointError(
            f"another streampipe process (pid {pid}) is using stage id {stage_id} in {state_dir}"
        ) from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


@contextmanager
def _sqlite_errors(path: Path, doing: str) -> Iterator[None]:
    """SQLite's errors (corrupt, truncated, not a database, disk full) as ours."""
    try:
        yield
    except sqlite3.Error as exc:
        raise CheckpointError(f"{path} {doing}: {exc}") from None


def _field(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


class CheckpointStore:
    """One stage's checkpoint: ``<state_dir>/<stage_id>.checkpoint.sqlite``.

    Calls may come from any thread (the edge loads on start and saves from its worker),
    one at a time; a mutex keeps them from overlapping.
    """

    def __init__(self, state_dir: str | os.PathLike[str], stage_id: str) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.stage_id = stage_id
        self.path = self.dir / f"{stage_id}.checkpoint.sqlite"
        old = self.dir / f"{stage_id}.checkpoint"
        if old.exists():
            raise CheckpointError(
                f"{old} is a checkpoint in the old single-file format, which this version "
                "does not read: move it away (the stage then starts afresh)"
            )
        key = _load_key(self.dir)
        self._prefix = hmac.new(
            key, _field(_DOMAIN) + _field(stage_id.encode()), hashlib.sha256
        )  # every row's HMAC starts here; copied per row
        self._mutex = threading.Lock()
        self._lock = _lock(self.dir, stage_id)
        try:
            self._db, self._commit, self._names = self._open()
        except BaseException:
            self._lock.close()
            raise

    # -- opening -------------------------------------------------------------------

    def _open(self) -> tuple[sqlite3.Connection, int, set[str]]:
        """The database, checked to be ours, its last commit number and its devices."""
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(_SQLITE_MAGIC))
        except FileNotFoundError:
            head = b""
        if head and head != _SQLITE_MAGIC:
            raise CheckpointError(f"{self.path} is not a SQLite database: not a checkpoint")
        # check_same_thread=False: loaded by the starting thread, saved by the worker.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._adopt(db)
            with _sqlite_errors(self.path, "cannot be opened"):
                db.execute(f"PRAGMA journal_mode = {JOURNAL_MODE}")
                db.execute("PRAGMA synchronous = FULL")
                # The WAL is folded back at 1,000 pages; a bigger commit (a full save) grows
                # it to that commit's size: give the disk back once it has been folded.
                db.execute(f"PRAGMA journal_size_limit = {4 << 20}")
                row = db.execute("SELECT commit_no FROM meta").fetchone()
                names = {name for (name,) in db.execute("SELECT device FROM devices")}
        except BaseException:
            db.close()
            raise
        return db, (row[0] if row and isinstance(row[0], int) else 0), names

    def _adopt(self, db: sqlite3.Connection) -> None:
        """Check the database is a checkpoint of ours; make an empty one so."""
        with _sqlite_errors(self.path, "cannot be opened"):
            db.execute("BEGIN IMMEDIATE")
            try:
                app = db.execute("PRAGMA application_id").fetchone()[0]
                version = db.execute("PRAGMA user_version").fetchone()[0]
                empty = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
                fresh = app == 0 and version == 0 and empty
                if fresh:
                    for statement in _SCHEMA:
                        db.execute(statement)
                db.execute("COMMIT")
            finally:
                if db.in_transaction:
                    db.execute("ROLLBACK")
        if fresh or (app, version) == (APPLICATION_ID, FORMAT_VERSION):
            return
        if app == APPLICATION_ID:
            raise CheckpointError(
                f"{self.path} is a streampipe checkpoint of format {version}; this version "
                f"reads format {FORMAT_VERSION}"
            )
        raise CheckpointError(f"{self.path} is a SQLite database but not a streampipe checkpoint")

    # -- the API -------------------------------------------------------------------

    def save(self, meta: Any, devices: Mapping[str, Any], *, full: bool = False) -> None:
        """One atomic commit: ``meta`` replaces the previous meta; each device's state in
        ``devices`` is inserted or replaced, other devices' rows are untouched. With
        ``full=True``, ``devices`` is the complete set: rows of devices not in it go."""
        with self._mutex:
            commit = self._commit + 1
            stamp = commit.to_bytes(8, "big")
            # Pickled before the transaction: a state that fails to pickle changes nothing.
            rows = []
            for name, state in devices.items():
                blob = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
                rows.append((name, commit, blob, self._mac(b"device", name, stamp, blob)))
            new = set(devices) if full else {n for n in devices if n not in self._names}
            count = len(new) if full else len(self._names) + len(new)
            blob = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
            mac = self._mac(b"meta", "", stamp + count.to_bytes(8, "big"), blob)
            db = self._db
            with _sqlite_errors(self.path, "cannot be written"):
                db.execute("BEGIN IMMEDIATE")
                try:
                    if full:
                        db.execute("DELETE FROM devices")
                    db.executemany(_UPSERT, rows)
                    db.execute(
                        "INSERT OR REPLACE INTO meta VALUES (1, ?, ?, ?, ?)",
                        (commit, count, blob, mac),
                    )
                    db.execute("COMMIT")
                finally:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
            self._commit = commit
            if full:
                self._names = new
            else:
                self._names |= new

    def load(self) -> tuple[Any, dict[str, Any]] | None:
        """``(meta, {device: state})`` of the last commit, ``None`` if nothing was ever
        saved; :class:`CheckpointError` if any of it is untrusted or unreadable."""
        with self._mutex:
            with _sqlite_errors(self.path, "cannot be read"):
                check = self._db.execute("PRAGMA quick_check").fetchall()
                if check != [("ok",)]:
                    raise CheckpointError(f"{self.path} is corrupt: {check[0][0]}")
                meta = self._db.execute("SELECT commit_no, devices, blob, mac FROM meta").fetchone()
                rows = self._db.execute(
                    "SELECT device, commit_no, blob, mac FROM devices"
                ).fetchall()
            if meta is None:
                if rows:
                    raise CheckpointError(
                        f"{self.path} holds devices but no stage row: refusing it"
                    )
                return None
            commit, count, blob, mac = meta
            # Every HMAC first: nothing is unpickled from a file with one untrusted row.
            self._verify("the stage row", b"meta", "", (commit, count), blob, mac)
            for name, device_commit, device_blob, device_mac in rows:
                self._verify(
                    f"device {name!r}", b"device", name, (device_commit,), device_blob, device_mac
                )
                if device_commit > commit:
                    raise CheckpointError(
                        f"{self.path}: device {name!r} is newer than the stage row: refusing it"
                    )
            if len(rows) != count:
                raise CheckpointError(
                    f"{self.path} holds {len(rows)} devices where its stage row vouches for "
                    f"{count}: refusing it"
                )
            # Authenticated above: written by us, with our key, for this stage and row.
            states = {name: self._loads(f"device {name!r}", b) for name, _, b, _ in rows}
            return self._loads("the stage row", blob), states

    def close(self) -> None:
        """Close the database and release the stage's lock; the store is done."""
        with self._mutex:
            try:
                self._db.close()
            finally:
                self._lock.close()

    # -- helpers -------------------------------------------------------------------

    def _mac(self, kind: bytes, name: str, header: bytes, blob: bytes) -> bytes:
        h = self._prefix.copy()
        h.update(_field(kind) + _field(name.encode()) + _field(header))
        h.update(blob)
        return h.digest()

    def _verify(
        self, what: str, kind: bytes, name: Any, numbers: tuple[Any, ...], blob: Any, mac: Any
    ) -> None:
        try:
            header = b"".join(n.to_bytes(8, "big") for n in numbers)
            ok = hmac.compare_digest(mac, self._mac(kind, name, header, blob))
        except (TypeError, ValueError, AttributeError, OverflowError):  # not what we write
            ok = False
        if not ok:
            raise CheckpointError(
                f"{self.path}: {what} fails its integrity check (tampered, moved or copied "
                "from another device or stage, or written with another key): refusing to load it"
            )

    def _loads(self, what: str, blob: bytes) -> Any:
        try:
            return pickle.loads(blob)
        except Exception as exc:
            raise CheckpointError(f"{self.path}: {what} cannot be unpickled: {exc}") from None
