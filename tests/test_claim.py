"""A stage's claim dies with the process that made it (issue 17 §6).

A crashed stage (a power cut that takes the broker down with it, a full disk) must start
again at once under its supervisor, while a second live process for one stage is still
refused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import Capture
from test_faults import start_edge

from streampipe import codec
from streampipe.readings import Batch, Reading
from streampipe.topics import Topics
from streampipe.transport import BrokerURL, Connection

STAGE = "faults"  # start_edge's stage id
#: Far below the 1.5 keepalives (45 s) a restart used to wait for a will that never came.
PROMPTLY = 10.0


def live_onlines(cap: Capture, topics: Topics, stage: str = STAGE) -> int:
    """``online`` announced while the capture listened (not a retained one it was given)."""
    return sum(m.payload == b"online" and not m.retain for m in cap.on(topics.status(stage)))


def publish_reading(url: BrokerURL, topics: Topics, device: str) -> None:
    frame = codec.encode(Batch.from_readings([Reading(device, 0, 1.0, {"a": 1.0}, 2.0)]))
    conn = Connection(url, f"reading-{uuid.uuid4().hex[:6]}").connect()
    try:
        conn.publish(topics.readings(device), frame).wait_for_publish(10)
    finally:
        conn.close()


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """Stop an edge (if it still runs); its exit code and its stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a small tmpfs for a full disk: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for a full disk: {done.stderr.strip()}")


def _fill(path: Path) -> None:
    """Take every byte left on the file system of ``path``."""
    with open(path, "wb", buffering=0) as f:
        try:
            for _ in range(1 << 16):  # far more than 2 MiB: bounded all the same
                f.write(b"\0" * 4096)
        except OSError:
            return
    raise AssertionError(f"{path} never filled its file system")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounts need root")
def test_a_stage_stopped_by_a_full_disk_starts_again_once_there_is_room(
    broker, topics, capture, tmp_path
):
    state = tmp_path / "state"
    _mount_tmpfs(state, "2m")
    try:
        url = f"mqtt://127.0.0.1:{broker.port}"
        cap = capture([topics.status(STAGE), topics.predictions()])
        edge = start_edge(url, topics, state)
        try:
            assert cap.wait(lambda: live_onlines(cap, topics) == 1)
            _fill(state / "filler")
            publish_reading(broker.url, topics, "d")  # its checkpoint does not fit
            code, err = edge.wait(30), edge.stderr.read()
        finally:
            finish(edge)
        assert code != 0 and "database or disk is full" in err, err
        # Its disconnect was clean (no will), so it said offline itself.
        offline = lambda: any(  # noqa: E731
            m.payload == b"offline" and not m.retain for m in cap.on(topics.status(STAGE))
        )
        assert cap.wait(offline, 10)
        (state / "filler").unlink()  # the disk is grown
        started = time.monotonic()
        edge = start_edge(url, topics, state)
        try:
            assert cap.wait(lambda: live_onlines(cap, topics) == 2, PROMPTLY), (
                f"not online within {PROMPTLY:g} s of its restart"
            )
            took = time.monotonic() - started
            publish_reading(broker.url, topics, "d2")
            assert cap.wait(lambda: bool(cap.on(topics.predictions("d2"))), 10)
        finally:
            code, err = finish(edge)
        assert code == 0, err
        assert took < PROMPTLY
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True, timeout=30)
