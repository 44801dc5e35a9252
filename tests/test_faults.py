"""Faults, against real Mosquitto processes: no reading lost or learned twice.

Each test replays seeded Friedman readings and checks the predictions that arrive over
MQTT against River's own offline predict-then-learn on the same data, seq by seq.
"""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import Capture
from faults import TcpProxy, friedman_csv, friedman_rows, run_in_thread
from replaying import predict_then_learn, write_csv
from replaying import start_replay as replay_in_background

from streampipe import codec
from streampipe.broker import PrivateMosquitto
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.readings import Batch, Reading
from streampipe.state import CheckpointStore
from streampipe.topics import Topics
from streampipe.transport import BrokerURL, Connection, Message

STREAMPIPE = [sys.executable, "-m", "streampipe"]


class PersistentCapture(Capture):
    """A capture whose session the broker keeps across its own restarts."""

    def __init__(self, url: BrokerURL, filters: list[str]) -> None:
        self.messages = []
        self._cond = threading.Condition()
        self.conn = Connection(
            url,
            f"capture-{uuid.uuid4().hex[:8]}",
            clean_start=False,
            session_expiry=600,
            on_message=self._on,
        )
        self.conn.connect()
        self.conn.subscribe(filters, qos=1)


def predictions(cap: Capture, topics: Topics) -> list[dict]:
    return [p for body in cap.json(topics.predictions()) for p in body["predictions"]]


def seqs(cap: Capture, topics: Topics) -> set[int]:
    return {p["seq"] for p in predictions(cap, topics)}


def onlines(cap: Capture, topics: Topics) -> int:
    return sum(m.payload == b"online" for m in cap.on(topics.status()))


def start_edge(url: str, topics: Topics, state_dir: Path | None, *options: str) -> subprocess.Popen:
    """``streampipe edge`` (stage ``faults``), checkpointing in ``state_dir`` if given."""
    durable = ["--state-dir", str(state_dir), "--checkpoint-interval", "0.2"] if state_dir else []
    return subprocess.Popen(
        [*STREAMPIPE, "edge", "--broker", url, "--stage-id", "faults", "--topic-root",
         topics.root, *durable, "--metrics-port", "-1", *options],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def start_replay(
    url: str, topics: Topics, path: Path, rate: int, batch: int = 100
) -> subprocess.Popen:
    return replay_in_background(
        url, topics, path, "--rate", str(rate), "--batch", str(batch), "--linger", "20"
    )


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return err


def assert_exact(cap: Capture, topics: Topics, expected: list[float]) -> None:
    """Every seq has a prediction, and every prediction (repeats included) is River's."""
    got = predictions(cap, topics)
    assert {p["seq"] for p in got} == set(range(len(expected)))
    wrong = [p["seq"] for p in got if p["y_pred"] != expected[p["seq"]]]
    assert not wrong, f"{len(wrong)} predictions differ from River's, first at seq {wrong[0]}"


def test_edge_killed_mid_replay_resumes_from_its_checkpoint_exactly(
    broker, topics, capture, tmp_path
):
    n = 50_000
    expected = friedman_csv(tmp_path / "f.csv", n)
    cap = capture([topics.predictions(), topics.status()])
    url = f"mqtt://127.0.0.1:{broker.port}"
    edge = start_edge(url, topics, tmp_path / "state")
    replay = None
    try:
        assert cap.wait(lambda: onlines(cap, topics) == 1)
        replay = start_replay(url, topics, tmp_path / "f.csv", rate=20_000)
        assert cap.wait(lambda: len(seqs(cap, topics)) >= 10_000)
        edge.kill()  # SIGKILL: no clean shutdown, no final checkpoint
        edge.wait(10)
        killed_at = len(seqs(cap, topics))
        edge = start_edge(url, topics, tmp_path / "state")
        assert cap.wait(lambda: onlines(cap, topics) == 2)
        assert replay.wait(120) == 0, replay.stderr.read()
        assert cap.wait(lambda: len(seqs(cap, topics)) == n, timeout=120)
    finally:
        if replay is not None and replay.poll() is None:
            replay.kill()
    stop(edge)
    assert killed_at < n  # the kill really came mid-stream
    assert_exact(cap, topics, expected)


def test_broker_stopped_for_two_seconds_mid_replay_loses_nothing(tmp_path):
    n = 20_000
    expected = friedman_csv(tmp_path / "f.csv", n)
    topics = Topics(f"t{uuid.uuid4().hex[:6]}")
    with PrivateMosquitto(persistence=True) as broker:
        url = f"mqtt://127.0.0.1:{broker.port}"
        cap = PersistentCapture(broker.url, [topics.predictions(), topics.status()])
        edge = start_edge(url, topics, tmp_path / "state")
        replay = None
        try:
            assert cap.wait(lambda: onlines(cap, topics) >= 1)
            replay = start_replay(url, topics, tmp_path / "f.csv", rate=5_000)
            assert cap.wait(lambda: len(seqs(cap, topics)) >= 2_000)
            broker.stop(signal.SIGTERM)  # saves its database: sessions and queued messages
            time.sleep(2)  # the outage itself: nothing to wait for but time
            broker.start()
            assert replay.wait(120) == 0, replay.stderr.read()
            assert cap.wait(lambda: len(seqs(cap, topics)) == n, timeout=120)
        finally:
            if replay is not None and replay.poll() is None:
                replay.kill()
            stop(edge)
            cap.close()
    assert_exact(cap, topics, expected)


def test_broker_killed_loses_only_what_it_had_not_saved_and_counts_it_as_gaps(tmp_path):
    n = 20_000
    friedman_csv(tmp_path / "f.csv", n)
    topics = Topics(f"t{uuid.uuid4().hex[:6]}")
    with PrivateMosquitto(persistence=True) as broker:
        url = f"mqtt://127.0.0.1:{broker.port}"
        cap = PersistentCapture(
            broker.url, [topics.predictions(), topics.status(), topics.metrics()]
        )
        edge = start_edge(url, topics, tmp_path / "state")
        try:
            assert cap.wait(lambda: onlines(cap, topics) >= 1)
            replay = start_replay(url, topics, tmp_path / "f.csv", rate=5_000)
            assert cap.wait(lambda: len(seqs(cap, topics)) >= 3_000)
            broker.stop(signal.SIGKILL)  # whatever it had not saved is gone
            broker.start()
            assert replay.wait(120) == 0, replay.stderr.read()
        finally:
            stop(edge)  # publishes its final metrics
        assert cap.wait(lambda: any(b["readings"] for b in cap.json(topics.metrics())))
        final = cap.json(topics.metrics())[-1]
        cap.close()
    store = CheckpointStore(tmp_path / "state", "faults")
    meta, devices = store.load()
    store.close()
    device = devices["f"]
    assert device.seq >= n - 100  # the stream went on after the kill
    # Every seq up to the last one learned was learned exactly once, or counted missing.
    assert device.learned + final["sequence_gaps"] == device.seq + 1
    assert final["predictions"] == device.learned == meta["metrics"].as_dict()["count"]


def test_readings_the_broker_drops_for_a_stalled_edge_are_counted_as_gaps(tmp_path):
    # A broker that queues 4 messages for a client, as a stock Mosquitto queues 1,000:
    # what a publisher sends beyond that while the edge cannot take it is dropped.
    n, batch = 6_000, 10
    rows = friedman_rows(n)
    write_csv(tmp_path / "f.csv", rows)
    topics = Topics(f"t{uuid.uuid4().hex[:6]}")
    with PrivateMosquitto(extra_config="max_queued_messages 4\nlog_type notice\n") as broker:
        url = f"mqtt://127.0.0.1:{broker.port}"
        frames = topics.readings("f")  # the replay's, as the broker passes them on
        cap = Capture(broker.url, [topics.predictions(), topics.status(), topics.metrics(), frames])
        edge = start_edge(url, topics, None, "--queue-size", "4")
        replay = None
        try:
            assert cap.wait(lambda: onlines(cap, topics) == 1)
            replay = start_replay(url, topics, tmp_path / "f.csv", rate=2_000, batch=batch)
            assert cap.wait(lambda: len(seqs(cap, topics)) >= 1_000)
            edge.send_signal(signal.SIGSTOP)  # connected, but takes nothing
            stalled_at = len(cap.on(frames))
            # 100 frames published meanwhile: the broker holds a few of them for the edge
            # (4 in flight, 4 queued), and drops the rest
            assert cap.wait(lambda: len(cap.on(frames)) >= stalled_at + 100)
            edge.send_signal(signal.SIGCONT)
            assert replay.wait(60) == 0, replay.stderr.read()
            assert cap.wait(lambda: n - 1 in seqs(cap, topics))  # the stream went on
        finally:
            if replay is not None and replay.poll() is None:
                replay.kill()
            edge.send_signal(signal.SIGCONT)
        stop(edge)  # publishes its final metrics
        assert cap.wait(lambda: any(b["readings"] for b in cap.json(topics.metrics())))
        final = cap.json(topics.metrics())[-1]
        cap.close()
        dropped = "Outgoing messages are being dropped for client" in broker.log.read_text()
    got = predictions(cap, topics)
    learned = [p["seq"] for p in got]
    assert dropped
    assert len(learned) == len(set(learned)) == final["predictions"]  # none learned twice
    assert final["sequence_gaps"] >= 50 * batch
    # Every reading was learned or counted missing, and what was learned, River's way.
    assert len(learned) + final["sequence_gaps"] == n
    assert [p["y_pred"] for p in got] == predict_then_learn([rows[s] for s in learned])


def raw_publish(port: int, topic: str, payload: bytes, dup_count: int) -> None:
    """Publish one QoS 1 message, then the same packet again with the DUP flag, as a
    client that resends after a lost acknowledgement does (MQTT v5, raw packets)."""

    def packet(kind: int, body: bytes) -> bytes:
        n, length = len(body), b""
        while True:
            n, byte = divmod(n, 128)
            length += bytes([byte | (0x80 if n else 0)])
            if not n:
                return bytes([kind]) + length + body

    def utf8(s: str) -> bytes:
        return struct.pack("!H", len(s.encode())) + s.encode()

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        connect = utf8("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 30) + b"\x00"
        s.sendall(packet(0x10, connect + utf8(f"dup-{uuid.uuid4().hex[:6]}")))
        assert s.recv(4)[0] == 0x20  # CONNACK
        body = utf8(topic) + struct.pack("!H", 7) + b"\x00" + payload
        for i in range(1 + dup_count):
            s.sendall(packet(0x32 | (0x08 if i else 0), body))  # QoS 1, DUP after the first
        acks = b""
        while len(acks) < 4 * (1 + dup_count):
            acks += s.recv(64)


def run_service(
    broker: PrivateMosquitto, topics: Topics, **kwargs
) -> tuple[EdgeService, threading.Thread]:
    service = EdgeService(EdgeConfig(broker.url, "svc", topic_root=topics.root, **kwargs)).start()
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    return service, thread


def test_a_batch_delivered_three_times_is_learned_once(broker, topics, capture):
    cap = capture([topics.predictions(), topics.deadletter()])
    readings = [Reading("dev", s, float(s), {"a": float(s % 5)}, float(s)) for s in range(20)]
    frame = codec.encode(Batch.from_readings(readings))
    service, thread = run_service(broker, topics)
    try:
        raw_publish(broker.port, topics.readings("dev"), frame, dup_count=2)
        # Mosquitto sometimes forwards a QoS 1 resend with DUP only once, not twice. All
        # three were acknowledged, so they are routed: a reading published after them
        # is processed after every copy the stage gets.
        marker = codec.encode(Batch.from_readings([Reading("marker", 0, 1.0, {"a": 1.0})]))
        conn = Connection(broker.url, f"marker-{topics.root[-6:]}").connect()
        conn.publish(topics.readings("marker"), marker).wait_for_publish(10)
        conn.close()
        assert cap.wait(lambda: cap.on(topics.predictions("marker")))
    finally:
        service.stop()
        thread.join(30)
    copies = service.stats.messages - 1  # the marker's message aside
    assert copies >= 2, "no copy was delivered again: nothing was tested"
    assert len(cap.on(topics.predictions("dev"))) == 1
    assert len(cap.on(topics.deadletter())) == copies - 1
    assert service.stage.learner.devices["dev"].learned == 20
    assert service.stats.rejected == {"duplicate": 20 * (copies - 1)}


def test_a_rebooted_sensor_starting_again_at_seq_zero_is_accepted(broker, topics, capture):
    cap = capture([topics.predictions()])
    service, thread = run_service(broker, topics)
    pub = Connection(broker.url, f"reboot-{uuid.uuid4().hex[:6]}").connect()
    try:
        for epoch, count in ((1, 10), (2, 5)):  # the second boot starts at seq 0 again
            rs = [Reading("dev", s, float(s), {"a": 1.0}, 2.0, epoch) for s in range(count)]
            pub.publish(topics.readings("dev"), codec.encode(Batch.from_readings(rs)))
        assert cap.wait(lambda: len(predictions(cap, topics)) == 15)
    finally:
        pub.close()
        service.stop()
        thread.join(30)
    assert [p["seq"] for p in predictions(cap, topics)] == [*range(10), *range(5)]
    assert service.stats.rejected == {}


def test_network_cut_between_edge_and_broker_loses_nothing(broker, topics, capture, tmp_path):
    n = 20_000
    expected = friedman_csv(tmp_path / "f.csv", n)
    cap = capture([topics.predictions()])
    proxy = TcpProxy(broker.port)
    service = EdgeService(
        EdgeConfig(
            BrokerURL("127.0.0.1", proxy.port),
            "cut",
            topic_root=topics.root,
            state_dir=str(tmp_path / "state"),
            checkpoint_interval=0.2,
        )
    ).start()
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    url = f"mqtt://127.0.0.1:{broker.port}"
    replay = start_replay(url, topics, tmp_path / "f.csv", rate=5_000)
    try:
        assert cap.wait(lambda: len(seqs(cap, topics)) >= 2_000)
        proxy.cut()
        time.sleep(2)  # the cut itself
        restored = time.monotonic()
        proxy.restore()
        # paho retries with a delay that doubles from 1 s up to 30 s
        assert proxy.wait_accepted(2, timeout=31)
        reconnected_after = time.monotonic() - restored
        assert replay.wait(120) == 0, replay.stderr.read()
        assert cap.wait(lambda: len(seqs(cap, topics)) == n, timeout=120)
    finally:
        if replay.poll() is None:
            replay.kill()
        service.stop()
        thread.join(30)
        proxy.close()
    assert reconnected_after < 31
    assert service.conn.connects == 2 and service.conn.sessions_lost == 0
    assert_exact(cap, topics, expected)


def test_a_model_slower_than_the_keepalive_does_not_disconnect(broker, topics, capture):
    cap = capture([topics.predictions(), topics.status()])
    service = EdgeService(EdgeConfig(broker.url, "slow", topic_root=topics.root, keepalive=1))
    handle = service.stage.handle_message
    slow_calls = []

    def slow_handle(topic: str, payload: bytes, token: object, **kwargs: bool):
        slow_calls.append(topic)
        time.sleep(3.5)  # longer than 1.5 keepalives: the broker would drop a silent client
        return handle(topic, payload, token, **kwargs)

    service.stage.handle_message = slow_handle  # type: ignore[method-assign]
    service.start()
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    pub = Connection(broker.url, f"slow-{uuid.uuid4().hex[:6]}").connect()
    try:
        for s in range(2):
            rs = [Reading("dev", s, float(s), {"a": 1.0}, 2.0)]
            pub.publish(topics.readings("dev"), codec.encode(Batch.from_readings(rs)))
        assert cap.wait(lambda: len(predictions(cap, topics)) == 2, timeout=30)
    finally:
        pub.close()
        service.stop()
        thread.join(30)
    assert len(slow_calls) == 2  # the stage really was that slow
    assert service.conn.connects == 1  # never reconnected
    statuses = lambda: [m.payload for m in cap.on(topics.status())]  # noqa: E731
    assert cap.wait(lambda: len(statuses()) >= 2, timeout=10)  # "offline" is on its way
    got = statuses()
    assert got[0] == b"online" and b"online" not in got[1:]  # one start, no reconnect
    # Its own "offline", and once in a suite run (under load) the same again: the will,
    # when the clean disconnect was not written before the connection closed.
    assert got[1] == b"offline" and set(got[1:]) == {b"offline"} and len(got) <= 3


def test_the_input_thread_waits_for_room_briefly_and_only_while_the_worker_runs():
    """A broker that sends more than Receive Maximum (Mosquitto 2.0.11 sends a whole
    Receive Maximum more after every acknowledgement) meets an input thread that waits
    for room, so TCP holds the rest at the broker; for a bounded time (it sends the
    keepalives), and not before the worker runs (the edge starting waits on that thread
    for its subscriptions). QoS 0 beyond the capacity is dropped, and counted."""
    service = EdgeService(EdgeConfig(BrokerURL("127.0.0.1", 1), "full", queue_size=2, keepalive=3))
    msgs = [Message(mid, b"r/d") for mid in (1, 2, 3, 4)]
    for msg in msgs:
        msg.qos = 1
    for msg in msgs[:3]:  # not running yet: taken at once
        service._enqueue(msg)
    assert service.inbox.qsize() == 3
    service.inbox.open()  # what run() does first
    assert service.inbox.get(0) is not None
    fourth = threading.Thread(target=service._enqueue, args=(msgs[3],))
    fourth.start()
    fourth.join(0.3)
    assert fourth.is_alive() and service.inbox.qsize() == 2  # waits for room
    assert service.inbox.get(0) is not None  # the worker takes one: room
    fourth.join(5)
    assert not fourth.is_alive() and service.inbox.qsize() == 2

    started = time.monotonic()
    service._enqueue(Message(5, b"r/d"))  # QoS 0, full: dropped at once
    assert time.monotonic() - started < 0.5
    assert service.inbox.qsize() == 2 and service.stats.rejected == {"queue_full": 1}

    late = Message(6, b"r/d")
    late.qos = 1
    started = time.monotonic()
    service._enqueue(late)  # nobody makes room: taken after a bounded wait (keepalive / 3)
    assert 0.9 < time.monotonic() - started < 3 and service.inbox.qsize() == 3
    service.inbox.close()  # what shutting down does first: no more waiting
    started = time.monotonic()
    service._enqueue(msgs[0])
    assert time.monotonic() - started < 0.5 and service.inbox.qsize() == 4


def test_copies_from_before_a_reconnect_are_left_to_the_broker_to_resend():
    """After a reconnect that resumed the session, the broker resends what was not
    acknowledged, with the same packet ids: the copies still queued from the earlier
    connection are dropped, not processed twice (nor acknowledged twice)."""
    service = EdgeService(EdgeConfig(BrokerURL("127.0.0.1", 1), "resend"))
    processed: list[tuple[int, int]] = []
    service._process = lambda connection, msg: processed.append((connection, msg.mid))
    for mid in (1, 2):
        msg = Message(mid, b"r/d")
        msg.qos = 1
        service.inbox.put(msg, qos=1, connection=1)
    service.conn.connects, service.conn._resumed = 2, {1: False, 2: True}
    resent = Message(1, b"r/d")
    service.inbox.put(resent, qos=1, connection=2)
    service._drain(10)
    assert processed == [(2, 1)] and service.inbox.qsize() == 0

    # With the session lost nothing is resent: the older copy is all there is.
    service.inbox.put(Message(3, b"r/d"), qos=1, connection=2)
    service.conn.connects, service.conn._resumed[3] = 3, False
    service._drain(10)
    assert processed == [(2, 1), (2, 3)]


def test_a_live_publisher_keeps_a_bounded_backlog_while_the_broker_is_away(tmp_path):
    from streampipe.publish import ReadingPublisher

    topics = Topics(f"t{uuid.uuid4().hex[:6]}")
    with PrivateMosquitto(persistence=True) as broker:
        cap = PersistentCapture(broker.url, [topics.readings_filter()[0]])
        conn = Connection(broker.url, f"live-{uuid.uuid4().hex[:6]}").connect()
        pub = ReadingPublisher(conn, topics, batch_size=1, overflow="drop_oldest", max_backlog=20)
        try:
            broker.stop()
            assert conn.wait_connected(0) is False
            for s in range(50):  # one frame each, made while the broker is away
                pub.add(Reading("dev", s, float(s), {"a": 1.0}, 2.0))
            broker.start()
            assert pub.wait_acked(30)
            assert cap.wait(lambda: len(cap.messages) == 20)
        finally:
            conn.close()
            cap.close()
    assert pub.stats.dropped_readings == 30
    schemas = codec.SchemaRegistry()
    sid, frame = codec.schema_frame(Batch.from_readings([Reading("dev", 0, 0.0, {"a": 1.0}, 2.0)]))
    schemas.add_frame(frame, schema_id=sid)
    got = [codec.decode(m.payload, schemas).seq.tolist()[0] for m in cap.messages]
    assert got == list(range(30, 50))  # the newest kept, in order; the oldest dropped


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_soak_steady_load_with_a_broker_restart_every_thirty_seconds(tmp_path):
    """90 s of 20 sensors at 10 readings/s each; the broker restarts at 30 s and 60 s."""
    topics = Topics(f"t{uuid.uuid4().hex[:6]}")
    with PrivateMosquitto(persistence=True) as broker:
        url = f"mqtt://127.0.0.1:{broker.port}"
        cap = PersistentCapture(
            broker.url, [topics.predictions(), topics.status(), topics.metrics()]
        )
        edge = start_edge(url, topics, tmp_path / "state")
        try:
            assert cap.wait(lambda: onlines(cap, topics) >= 1)
            sensors = subprocess.Popen(
                [*STREAMPIPE, "sensors", "--broker", url, "--topic-root", topics.root,
                 "--devices", "20", "--rate", "10", "--duration", "90", "--batch", "5",
                 "--linger", "200", "--no-faults"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            started = time.monotonic()
            rss = []
            for restart_at in (30, 60):
                time.sleep(max(0.0, started + restart_at - time.monotonic()))  # the schedule
                rss.append(rss_kb(edge.pid))
                broker.stop(signal.SIGTERM)
                broker.start()
            out, err = sensors.communicate(timeout=180)
            assert sensors.returncode == 0, err
            published = int(out.split()[1].replace(",", ""))
            assert cap.wait(lambda: len(predictions(cap, topics)) >= published, timeout=120)
            rss.append(rss_kb(edge.pid))
        finally:
            stop(edge)
        assert cap.wait(lambda: len(cap.json(topics.metrics())) > 0)
        final = cap.json(topics.metrics())[-1]
        cap.close()
    by_device: dict[str, set[int]] = {}
    for body in cap.json(topics.predictions()):
        by_device.setdefault(body["device"], set()).update(p["seq"] for p in body["predictions"])
    assert len(by_device) == 20
    for device, got in by_device.items():
        assert got == set(range(len(got))), f"{device} is missing readings"
    assert sum(len(s) for s in by_device.values()) == published  # nothing lost
    assert final["predictions"] == published  # nothing learned twice
    assert final["sequence_gaps"] == 0
    assert max(m["queue_depth"] for m in cap.json(topics.metrics())) <= 1000
    assert rss[-1] - rss[0] < 20_000, f"edge RSS grew from {rss[0]} kB to {rss[-1]} kB"


def test_a_second_edge_with_the_same_stage_id_is_refused(broker, topics):
    from streampipe.edge import AlreadyRunning

    config = EdgeConfig(broker.url, "twin", topic_root=topics.root, keepalive=2)
    first = EdgeService(config).start()
    try:
        with pytest.raises(AlreadyRunning, match="stage 'twin' is already running"):
            EdgeService(config).start()  # the first answers its probe: refused at once
        assert first.conn.connected and first.conn.connects == 1
    finally:
        first.stop()
        first.run()


def test_an_edge_whose_session_is_taken_over_stops_instead_of_fighting_for_it(broker, topics):
    from streampipe.edge import TakenOver

    config = EdgeConfig(broker.url, "twin", topic_root=topics.root)
    first = EdgeService(config).start()
    thread, failure = run_in_thread(first)
    second = EdgeService(config)
    second._claim_stage = lambda: None  # type: ignore[method-assign]  # as if it raced
    second.start()
    try:
        thread.join(30)
        assert not thread.is_alive()
        assert failure and isinstance(failure[0], TakenOver)
        assert "another process connected as stage 'twin'" in str(failure[0])
        assert second.conn.wait_connected(10)
        connects = second.conn.connects
        # The first one's reconnect took the session back once; it then saw the second's
        # claim and stopped, so the second is not kicked again.
        assert not second.conn.taken_over.wait(3) and second.conn.connects == connects
    finally:
        second.stop()
        second.run()


def test_frames_waiting_for_their_schema_leave_the_schema_a_place_in_the_window(
    broker, topics, capture
):
    """Held frames are not acknowledged, so they hold places in the broker's window of
    Receive Maximum (the queue's size). If they could fill it, the schema they wait for
    could not be delivered before they expire: the hold is half the window."""
    cap = capture([topics.predictions(), topics.deadletter()])
    service = EdgeService(EdgeConfig(broker.url, "window", topic_root=topics.root, queue_size=4))
    service.start()
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    sender = Connection(broker.url, f"window-{uuid.uuid4().hex[:6]}").connect()
    try:
        frames = [
            Batch.from_readings([Reading("d1", s, float(s), {"a": float(s)}, 1.0)])
            for s in range(4)
        ]
        sid, schema = codec.schema_frame(frames[0])
        for batch in frames:
            sender.publish(topics.readings("d1"), codec.encode(batch, schema_id=True))
        # The two the hold keeps wait; the others are dead-lettered at once.
        assert cap.wait(lambda: len(cap.on(topics.deadletter())) == 2, timeout=5)
        sender.publish(topics.schemas(sid), schema).wait_for_publish(5)
        assert cap.wait(lambda: len(cap.on(topics.predictions())) == 2, timeout=5)
    finally:
        sender.close()
        service.stop()
        thread.join(30)
    seqs = [p["seq"] for body in cap.json(topics.predictions()) for p in body["predictions"]]
    assert seqs == [0, 1]
