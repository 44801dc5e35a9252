"""The checkpoint store: incremental commits, all-or-nothing under SIGKILL, untrusted rows
never unpickled, one process per stage."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import random
import re
import shutil
import signal
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from streampipe.state import KEY_ENV, CheckpointError, CheckpointStore

fork = multiprocessing.get_context("fork")


class WritesAFile:
    """Unpickling this creates a file: the stand-in for code an attacker wants run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def sql(path: Path, statement: str, *args) -> None:
    with closing(sqlite3.connect(path)) as db:
        db.execute(statement, args)
        db.commit()


def test_incremental_commits_replace_meta_and_only_the_devices_given(tmp_path):
    store = CheckpointStore(tmp_path, "edge-1")
    assert store.path == tmp_path / "edge-1.checkpoint.sqlite"
    assert store.load() is None, "never saved"
    store.save({"commit": 1}, {"a": [1], "b": [1]})
    store.save({"commit": 2}, {"b": [2], "c": [2]})
    expected = ({"commit": 2}, {"a": [1], "b": [2], "c": [2]})
    assert store.load() == expected
    store.close()
    store = CheckpointStore(tmp_path, "edge-1")
    assert store.load() == expected
    store.save({"commit": 3}, {"a": [3]})
    assert store.load() == ({"commit": 3}, {"a": [3], "b": [2], "c": [2]})
    store.close()


def test_a_full_save_deletes_the_devices_not_in_it(tmp_path):
    store = CheckpointStore(tmp_path, "e")
    store.save("m1", {"a": 1, "b": 1, "c": 1})
    store.save("m2", {"b": 2}, full=True)
    assert store.load() == ("m2", {"b": 2})
    store.save("m3", {"a": 3})  # the stage row's device count follows
    store.close()
    store = CheckpointStore(tmp_path, "e")
    assert store.load() == ("m3", {"a": 3, "b": 2})
    store.close()


def test_a_state_that_does_not_pickle_changes_nothing(tmp_path):
    store = CheckpointStore(tmp_path, "e")
    store.save("m1", {"a": 1})
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        store.save("m2", {"a": 2, "b": lambda: None})
    assert store.load() == ("m1", {"a": 1})
    store.save("m3", {"b": 3})
    assert store.load() == ("m3", {"a": 1, "b": 3})
    store.close()


def test_saves_may_come_from_another_thread_than_the_one_that_opened(tmp_path):
    store = CheckpointStore(tmp_path, "e")
    worker = threading.Thread(target=store.save, args=("m", {"a": 1}))
    worker.start()
    worker.join()
    assert store.load() == ("m", {"a": 1})
    store.close()


def test_the_evil_pickle_runs_when_trusted(tmp_path):
    """The check the refusals below rely on: loading this pickle does create the file."""
    store = CheckpointStore(tmp_path, "e")
    store.save("m", {"a": WritesAFile(tmp_path / "pwned")})
    store.load()
    store.close()
    assert (tmp_path / "pwned").exists()


def damage(case: str, path: Path, evil: bytes, marker: Path) -> None:
    """Damage the checkpoint at ``path`` (devices a and b, closed) as ``case`` says."""
    other = path.parent / "other"
    if case == "tampered device":
        sql(path, "UPDATE devices SET blob = ? WHERE device = 'a'", evil)
    elif case == "tampered meta":
        sql(path, "UPDATE meta SET blob = ?", evil)
    elif case == "not a blob":
        sql(path, "UPDATE devices SET blob = 'text', mac = 7 WHERE device = 'a'")
    elif case == "swapped devices":
        for old, new in (("a", "tmp"), ("b", "a"), ("tmp", "b")):
            sql(path, "UPDATE devices SET device = ? WHERE device = ?", new, old)
    elif case == "renamed device":
        sql(path, "UPDATE devices SET device = 'c' WHERE device = 'a'")
    elif case == "deleted device":
        sql(path, "DELETE FROM devices WHERE device = 'a'")
    elif case == "older meta":
        before = path.read_bytes()
        store = CheckpointStore(path.parent, "e")
        store.save(WritesAFile(marker), {"a": WritesAFile(marker)})
        store.close()
        path.with_suffix(".old").write_bytes(before)
        with closing(sqlite3.connect(path)) as db:
            db.execute("ATTACH ? AS old", (str(path.with_suffix(".old")),))
            db.execute("DELETE FROM main.meta")
            db.execute("INSERT INTO main.meta SELECT * FROM old.meta")
            db.commit()
    elif case in ("device of another stage", "file of another stage"):
        store = CheckpointStore(path.parent, "f")  # same directory, same key
        store.save(WritesAFile(marker), {"a": WritesAFile(marker), "b": WritesAFile(marker)})
        store.close()
        if case == "file of another stage":
            shutil.copy(store.path, path)
        else:
            with closing(sqlite3.connect(path)) as db:
                db.execute("ATTACH ? AS f", (str(store.path),))
                db.execute("DELETE FROM main.devices WHERE device = 'a'")
                db.execute("INSERT INTO main.devices SELECT * FROM f.devices WHERE device = 'a'")
                db.commit()
    elif case == "another key":
        store = CheckpointStore(other, "e")
        store.save(WritesAFile(marker), {"a": WritesAFile(marker), "b": WritesAFile(marker)})
        store.close()
        shutil.copy(store.path, path)
    elif case == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "not a database":
        path.write_bytes(evil)
    elif case == "another application's database":
        path.unlink()
        sql(path, "CREATE TABLE devices (device TEXT, blob BLOB)")
    elif case == "another format version":
        sql(path, "PRAGMA user_version = 2")
    elif case == "old single-file checkpoint":
        (path.parent / "e.checkpoint").write_bytes(b"SPCK1\n" + bytes(32) + evil)
    else:
        raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "tampered device",
        "tampered meta",
        "not a blob",
        "swapped devices",
        "renamed device",
        "deleted device",
        "older meta",
        "device of another stage",
        "file of another stage",
        "another key",
        "truncated",
        "not a database",
        "another application's database",
        "another format version",
        "old single-file checkpoint",
    ],
)
def test_untrusted_checkpoints_are_refused_and_never_unpickled(tmp_path, case):
    marker = tmp_path / "pwned"
    store = CheckpointStore(tmp_path, "e")
    store.save({"n": 1}, {"a": [1] * 300, "b": [2] * 300})
    for i in range(50):  # a file of several pages, so that truncation cuts real data
        store.save({"n": 1}, {f"x{i}": os.urandom(2000)})
    store.save({"n": 1}, {"b": [3] * 300})
    store.close()
    damage(case, store.path, pickle.dumps(WritesAFile(marker)), marker)
    with pytest.raises(CheckpointError) as refused:
        store = CheckpointStore(tmp_path, "e")
        try:
            store.load()
        finally:
            store.close()
    message = str(refused.value)
    assert str(tmp_path) in message and "\n" not in message, message
    assert not marker.exists(), "an untrusted pickle ran"


def test_a_key_from_the_environment_is_bound_to_the_rows(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "11" * 32)
    store = CheckpointStore(tmp_path, "e")
    store.save("m", {"a": 1})
    store.close()
    assert not (tmp_path / "checkpoint.key").exists()
    monkeypatch.setenv(KEY_ENV, "22" * 32)
    store = CheckpointStore(tmp_path, "e")
    with pytest.raises(CheckpointError, match="integrity check"):
        store.load()
    store.close()


def test_a_generated_key_is_private(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    CheckpointStore(tmp_path, "e").close()
    key = tmp_path / "checkpoint.key"
    assert os.stat(key).st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32


# -- one process per stage -----------------------------------------------------------


def hold(state_dir: Path, ready) -> None:
    store = CheckpointStore(state_dir, "edge-1")
    ready.set()
    time.sleep(60)
    store.close()


def test_a_second_process_is_refused_until_the_first_dies(tmp_path):
    ready = fork.Event()
    holder = fork.Process(target=hold, args=(tmp_path, ready), daemon=True)
    holder.start()
    try:
        assert ready.wait(10)
        expected = (
            f"another streampipe process (pid {holder.pid}) is using stage id edge-1 in {tmp_path}"
        )
        with pytest.raises(CheckpointError, match=f"^{re.escape(expected)}$"):
            CheckpointStore(tmp_path, "edge-1")
        CheckpointStore(tmp_path, "edge-2").close()  # another stage is another lock
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
    CheckpointStore(tmp_path, "edge-1").close()  # the kernel released the dead one's lock


def test_close_releases_the_lock(tmp_path):
    first = CheckpointStore(tmp_path, "e")
    with pytest.raises(CheckpointError, match=f"pid {os.getpid()}"):
        CheckpointStore(tmp_path, "e")
    first.close()
    CheckpointStore(tmp_path, "e").close()


# -- SIGKILL during commits ----------------------------------------------------------

DEVICES = [f"d{i}" for i in range(40)]


def written(k: int) -> list[str]:
    """The devices commit ``k`` writes: 8 of 40, moving on by 3 per commit."""
    return [DEVICES[(3 * k + j) % len(DEVICES)] for j in range(8)]


def expected_commits(k: int) -> dict[str, int]:
    """Device -> the commit that last wrote it, after commits 1..k and nothing else."""
    last: dict[str, int] = {}
    for j in range(1, k + 1):
        last.update(dict.fromkeys(written(j), j))
    return last


def commit_forever(state_dir: Path, committed) -> None:
    store = CheckpointStore(state_dir, "kill")
    saved = store.load()
    k = saved[0]["commit"] if saved else 0
    while True:
        k += 1
        # Several pages per commit (overflow pages too): a kill lands inside one often.
        states = {d: {"commit": k, "pad": os.urandom(6000)} for d in written(k)}
        store.save({"commit": k}, states)
        committed.set()


def test_a_commit_killed_at_any_moment_is_all_or_nothing(tmp_path):
    rng = random.Random(8)
    last = 0
    for _ in range(6):
        committed = fork.Event()
        child = fork.Process(target=commit_forever, args=(tmp_path, committed), daemon=True)
        child.start()
        try:
            assert committed.wait(10), "the committer did not commit"
            time.sleep(rng.uniform(0.0, 0.05))
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.join(10)
        store = CheckpointStore(tmp_path, "kill")  # the dead committer's lock is gone
        try:
            meta, devices = store.load()
        finally:
            store.close()
        k = meta["commit"]
        assert k > last
        last = k
        commits = {d: state["commit"] for d, state in devices.items()}
        assert max(commits.values()) <= k, "a device row from a commit the meta does not know"
        assert all(commits[d] == k for d in written(k)), "commit k was written in part"
        assert commits == expected_commits(k), "not exactly the state after commits 1..k"
