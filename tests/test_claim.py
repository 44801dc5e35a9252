"""A stage's claim dies with the process that made it (issue 17 §6).

A crashed stage (a power cut that takes the broker down with it, a full disk) must start
again at once under its supervisor, while a second live process for one stage is still
refused: a live stage answers a liveness probe, a dead one cannot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import Capture
from faults import run_in_thread
from test_faults import start_edge

from streampipe import codec
from streampipe.broker import PrivateMosquitto
from streampipe.edge import PROBE_TIMEOUT, AlreadyRunning, EdgeConfig, EdgeService
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


def serves_promptly(
    cap: Capture,
    broker: PrivateMosquitto,
    topics: Topics,
    started: float,
    onlines: int,
    device: str,
) -> float:
    """Wait for a restarted edge's ``onlines``-th live ``online`` (within PROMPTLY of
    ``started``) and for it to predict a reading of ``device``; how long it took."""
    assert cap.wait(lambda: live_onlines(cap, topics) == onlines, PROMPTLY), (
        f"not online within {PROMPTLY:g} s of its restart"
    )
    took = time.monotonic() - started
    publish_reading(broker.url, topics, device)
    assert cap.wait(lambda: bool(cap.on(topics.predictions(device))), 10)
    return took


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


def wait_saved(broker: PrivateMosquitto, after_ns: int, timeout: float = 10.0) -> bool:
    """Wait for the broker to write its database (it does every second) after a time."""
    db = broker.dir / "mosquitto.db"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if db.stat().st_mtime_ns > after_ns:
                return True
        time.sleep(0.05)
    return False


def test_a_stage_killed_together_with_its_broker_starts_again_at_once(tmp_path):
    """A power cut: the broker restores the retained ``online`` and never sends the
    edge's will; the restarted edge finds its claim's process gone and starts."""
    topics = Topics(f"t{uuid.uuid4().hex[:6]}")
    with PrivateMosquitto(persistence=True) as broker:
        url = f"mqtt://127.0.0.1:{broker.port}"
        cap = Capture(broker.url, [topics.status(STAGE)])
        edge = start_edge(url, topics, tmp_path / "state")
        try:
            assert cap.wait(lambda: live_onlines(cap, topics) == 1)
            assert wait_saved(broker, time.time_ns()), "the broker saved nothing"
            cap.close()
            edge.kill()  # the power cut: both at once, nothing said
            broker.stop(signal.SIGKILL)
            edge.wait(10)
            broker.start()
            cap = Capture(broker.url, [topics.status(STAGE), topics.predictions()])
            # What the cut left: the dead edge's online, retained.
            assert cap.wait(lambda: any(m.retain for m in cap.on(topics.status(STAGE))), 10)
            assert [m.payload for m in cap.on(topics.status(STAGE))] == [b"online"]
            started = time.monotonic()
            edge = start_edge(url, topics, tmp_path / "state")
            took = serves_promptly(cap, broker, topics, started, 1, "after-the-cut")
        finally:
            code, err = finish(edge)
            cap.close()
    assert code == 0, err
    assert took < PROMPTLY
    # Decided at once: the claim names a process of this machine that no longer exists.
    assert "stale" in err and "no longer exists" in err, err


def test_a_claim_that_no_process_answers_for_is_stale(broker, topics, caplog):
    """A claim from another machine cannot be checked locally: unanswered, it is stale."""
    pub = Connection(broker.url, f"claim-{uuid.uuid4().hex[:6]}").connect()
    try:
        claim = {"instance": "0" * 32, "host": "elsewhere", "pid": 4242, "since": 0}
        pub.publish(topics.instance("gone"), json.dumps(claim), retain=True).wait_for_publish(10)
        pub.publish(topics.status("gone"), b"online", retain=True).wait_for_publish(10)
    finally:
        pub.close()
    caplog.set_level(logging.INFO, logger="streampipe.edge")
    config = EdgeConfig(broker.url, "gone", topic_root=topics.root, keepalive=10)
    started = time.monotonic()
    service = EdgeService(config).start()
    took = time.monotonic() - started
    try:
        assert service.conn.connected
    finally:
        service.stop()
        service.run()
    assert took < PROBE_TIMEOUT + 3
    stale = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert len(stale) == 1 and "elsewhere" in stale[0] and "4242" in stale[0], stale


@pytest.mark.parametrize("state_dirs", ["none", "separate", "shared"])
def test_a_second_live_process_for_a_stage_is_refused_at_once(
    broker, topics, capture, tmp_path, state_dirs
):
    """Without a shared state dir its lock cannot tell; the running edge's answer does."""
    first_dir, second_dir = {
        "none": (None, None),
        "separate": (tmp_path / "a", tmp_path / "b"),
        "shared": (tmp_path / "s", tmp_path / "s"),
    }[state_dirs]
    url = f"mqtt://127.0.0.1:{broker.port}"
    cap = capture([topics.status(STAGE)])
    first = start_edge(url, topics, first_dir)
    try:
        assert cap.wait(lambda: live_onlines(cap, topics) == 1)
        started = time.monotonic()
        second = start_edge(url, topics, second_dir)
        try:
            _, err = second.communicate(timeout=60)
        finally:
            code, _ = finish(second)
        took = time.monotonic() - started
        assert first.poll() is None, "the running edge stopped"
    finally:
        first_code, first_err = finish(first)
    assert code != 0
    if state_dirs == "shared":  # the state dir's lock refuses it before it asks the broker
        assert "is using stage id faults" in err, err
    else:
        assert f"stage '{STAGE}' is already running" in err, err
        assert str(first.pid) in err, err  # it says which process
    assert took < PROMPTLY
    assert first_code == 0, first_err


def test_a_stage_busy_with_a_backlog_still_answers_at_once(broker, topics):
    """The probe is answered on the network thread, not behind the queued readings."""
    config = EdgeConfig(broker.url, "busy", topic_root=topics.root)
    first = EdgeService(config)
    handle = first.stage.handle_message
    busy, release = threading.Event(), threading.Event()

    def stuck_handle(topic: str, payload: bytes, token: object, **kwargs: bool):
        busy.set()
        release.wait(60)  # a model far slower than the readings come
        return handle(topic, payload, token, **kwargs)

    first.stage.handle_message = stuck_handle  # type: ignore[method-assign]
    first.start()
    thread = threading.Thread(target=first.run, daemon=True)
    thread.start()
    try:
        for device in range(50):
            publish_reading(broker.url, topics, f"d{device}")
        assert busy.wait(10)
        assert first.inbox.qsize() > 0  # a backlog waits behind the reading in hand
        started = time.monotonic()
        with pytest.raises(AlreadyRunning, match="stage 'busy' is already running"):
            EdgeService(config).start()
        took = time.monotonic() - started
        assert first.conn.connected and first.conn.connects == 1
    finally:
        release.set()
        first.stop()
        thread.join(60)
    assert took < PROBE_TIMEOUT


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
            took = serves_promptly(cap, broker, topics, started, 2, "d2")
        finally:
            code, err = finish(edge)
        assert code == 0, err
        assert took < PROMPTLY
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True, timeout=30)


def test_a_claim_from_a_client_that_did_not_take_the_session_does_not_stop_a_stage(
    broker, topics, capture
):
    """Issue 18 §7: a 24-byte publish on ROOT/status/<stage>/instance made a running edge
    exit. A process that starts as this stage takes its session over, which closes the
    stage's connection first; a claim arriving on the connection the stage claimed on
    is from someone else, and the stage claims the stage again."""
    stage = f"victim-{uuid.uuid4().hex[:6]}"
    service = EdgeService(EdgeConfig(broker.url, stage, topic_root=topics.root)).start()
    thread, failure = run_in_thread(service)
    topic = topics.instance(stage)
    cap = capture([topic])
    forger = Connection(broker.url, f"forger-{uuid.uuid4().hex[:6]}").connect()
    try:
        forged = json.dumps({"instance": "f" * 22}).encode()  # 24 bytes, as in the issue
        forger.publish(topic, forged, qos=1, retain=True).wait_for_publish(10)

        def reclaimed() -> bool:
            claims = [json.loads(m.payload).get("instance") for m in cap.on(topic) if m.payload]
            return "f" * 22 in claims and claims[-1] == service.instance

        assert cap.wait(reclaimed, PROMPTLY)
        assert service.stats.rejected.get("foreign_claim") == 1
        assert not service.conn.taken_over.is_set() and thread.is_alive() and not failure
    finally:
        forger.close()
        service.stop()
        thread.join(30)
    assert not thread.is_alive() and not failure
