"""The command line as a user meets it: clear errors, the demo, Prometheus metrics."""

from __future__ import annotations

import gc
import logging
import math
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streampipe import codec
from streampipe.cli import main
from streampipe.cli import sensors as sensors_command
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.readings import Batch, Reading
from streampipe.transport import Connection

#: An edge without its HTTP server: tests that are not about it must not need port 9108.
NO_METRICS = ("--metrics-port", "-1")


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streampipe", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["edge", "--stage-id", "e", "--model", "os.system('x')"], "model spec"),
        (["edge", "--stage-id", "e", "--model", "linear_model.LinearRegression(nope=1)"], "nope"),
        (["edge", "--stage-id", "a/b", "--broker", "mqtt://127.0.0.1:1"], "stage id"),
        (["edge", "--stage-id", "e", "--broker", "http://x"], "mqtt://"),
        (["edge", "--stage-id", "e", "--broker", "mqtt://127.0.0.1:1"], "cannot reach broker"),
        (["replay", "/nonexistent.csv", "--target", "y"], "no such file"),
        (["edge", "--stage-id", "e", "--promote-if-better", "10"], "needs a --challenger"),
        (["edge", "--stage-id", "e", "--anomaly-threshold", "0.9"], "for anomaly detectors"),
        (
            ["edge", "--stage-id", "e", "--challenger", "linear_model.LogisticRegression"],
            "challenger must be a regressor",
        ),
        (["promote", "--stage-id", "a/b", "--broker", "mqtt://127.0.0.1:1"], "stage id"),
        (["sensors", "--linger", "-1"], "0 or more"),
        (["replay", "x.csv", "--target", "y", "--linger", "soon"], "not a number"),
    ],
)
def test_user_errors_are_one_clear_line_not_a_traceback(args, message):
    if args[0] == "edge":  # another edge on this machine may hold the default metrics port
        args = [*args, *NO_METRICS]
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_the_edge_freezes_what_it_started_with_before_it_streams(monkeypatch):
    """The cyclic GC's full collections skip River, pandas and the service (they live
    as long as the process): one cost ~100 ms in a 0.6 s mini-batch benchmark run."""
    frozen = []
    monkeypatch.setattr(EdgeService, "start", lambda self: self)
    monkeypatch.setattr(EdgeService, "run", lambda self: frozen.append(gc.get_freeze_count()))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:  # main() installs its own signal handlers: put pytest's back
        assert main(["edge", "--stage-id", "e", "--metrics-port", "-1"]) == 0
    finally:
        gc.unfreeze()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert frozen and frozen[0] > 10_000


def test_broker_password_is_never_printed():
    result = run("edge", "--stage-id", "e", "--broker", "mqtt://u:hunter2@127.0.0.1:1", *NO_METRICS)
    assert result.returncode == 2 and "hunter2" not in result.stderr
    assert "u:***@127.0.0.1" in result.stderr


def test_a_second_edge_is_told_its_metrics_port_is_taken_and_which_flag_to_change():
    with socket.create_server(("127.0.0.1", 0)) as taken:  # as the first edge's server is
        port = taken.getsockname()[1]
        result = run("edge", "--stage-id", "e", "--metrics-port", str(port))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"streampipe edge: error: metrics port {port} on 127.0.0.1 is in use (another edge?): "
        "choose another with --metrics-port, or 0 for a free one, -1 for none"
    ]


def test_sensors_publish_what_the_edge_learns(broker, topics, capture):
    cap = capture([topics.predictions(), topics.status()])
    edge = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streampipe",
            "edge",
            "--broker",
            f"mqtt://127.0.0.1:{broker.port}",
            "--stage-id",
            "cli",
            "--topic-root",
            topics.root,
            "--metrics-port",
            "-1",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert cap.wait(lambda: any(m.payload == b"online" for m in cap.on(topics.status())))
        assert (
            main(
                [
                    "sensors",
                    "--broker",
                    f"mqtt://127.0.0.1:{broker.port}",
                    "--devices",
                    "4",
                    "--rate",
                    "50",
                    "--duration",
                    "1",
                    "--topic-root",
                    topics.root,
                    "--batch",
                    "5",
                    "--linger",
                    "50",
                    "--seed",
                    "7",
                ]
            )
            == 0
        )

        def seqs() -> dict[str, set[int]]:
            out: dict[str, set[int]] = {}
            for body in cap.json(topics.predictions()):
                out.setdefault(body["device"], set()).update(p["seq"] for p in body["predictions"])
            return out

        assert cap.wait(lambda: len(seqs()) == 4 and all(len(s) >= 40 for s in seqs().values()))
    finally:
        edge.send_signal(signal.SIGINT)
        _, err = edge.communicate(timeout=30)
    assert edge.returncode == 0, err
    for device, got in seqs().items():
        assert got == set(range(len(got))), f"{device}: a reading was lost"
    assert cap.on(topics.status())[-1].payload == b"offline"


def test_sensors_at_rate_max_do_not_wait_for_the_linger_between_rounds(broker, topics):
    from streampipe.cli.sensors import run_sensors

    n = run_sensors(
        broker.url, topics, devices=2, rate=math.inf, duration=0.5, seed=0, batch=10, linger=1.0
    )
    assert n >= 500  # one round of 2 per 1 s linger, 2 readings in all, before


@pytest.fixture
def signal_handlers():
    """main() installs its own SIGINT and SIGTERM handlers: put pytest's back after."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def test_sensors_log_their_progress_when_stderr_is_not_a_terminal(
    broker, topics, monkeypatch, caplog, capsys, signal_handlers
):
    monkeypatch.setattr(sensors_command, "LOG_EVERY", 0.2)  # 10 s in use
    caplog.set_level(logging.INFO, logger="streampipe")
    url = f"mqtt://127.0.0.1:{broker.port}"
    args = ["--devices", "3", "--rate", "40", "--duration", "2", "--linger", "50"]
    assert main(["sensors", "--broker", url, "--topic-root", topics.root, *args]) == 0
    line = re.compile(r"published ([\d,]+) readings from 3 sensors \(([\d,]+)/s\), 0 dropped")
    shown = [line.fullmatch(r.getMessage()) for r in caplog.records if r.levelno == logging.INFO]
    counts = [int(m[1].replace(",", "")) for m in shown if m]
    assert len(counts) >= 3, caplog.text  # some while it ran, and one at the end
    assert counts == sorted(counts) and 0 < counts[0] < counts[-1]
    out = capsys.readouterr().out
    assert out == f"published {counts[-1]:,} readings from 3 simulated sensors\n"


def test_prometheus_endpoint_follows_conventions(broker, topics):
    service = EdgeService(
        EdgeConfig(broker.url, "prom", topic_root=topics.root, metrics_port=0)
    ).start()
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
    finally:
        service.stop()
        thread.join(30)
    families = {f.name: f for f in text_string_to_metric_families(body)}
    for name in (
        "streampipe_readings_received",
        "streampipe_predictions",
        "streampipe_rejected",
        "streampipe_sequence_gaps",
    ):
        assert families[name].type == "counter"
        assert all(s.name == name + "_total" for s in families[name].samples)
    assert families["streampipe_prediction_latency_seconds"].type == "histogram"
    assert families["streampipe_model_info"].samples[0].labels["model"]
    assert families["streampipe_build_info"].samples[0].labels["version"]
    for f in families.values():
        if f.name.startswith("streampipe_"):
            assert not ({"device", "device_id"} & {k for s in f.samples for k in s.labels})


def test_edges_with_disjoint_partitions_split_the_devices(broker, topics, capture):
    from streampipe.topics import partition_of

    devices = [f"dev-{i}" for i in range(12)]
    low = tuple(range(32))
    cap = capture([topics.predictions()])
    services = [
        EdgeService(EdgeConfig(broker.url, name, topic_root=topics.root, partitions=parts)).start()
        for name, parts in (("low", low), ("high", tuple(range(32, 64))))
    ]
    threads = [threading.Thread(target=s.run, daemon=True) for s in services]
    for t in threads:
        t.start()
    pub = Connection(broker.url, f"split-{uuid.uuid4().hex[:6]}").connect()
    try:
        for d in devices:
            frame = codec.encode(Batch.from_readings([Reading(d, 0, 1.0, {"a": 1.0}, 2.0)]))
            pub.publish(topics.readings(d), frame).wait_for_publish(10)
        assert cap.wait(lambda: len(cap.on(topics.predictions())) == len(devices))
    finally:
        pub.close()
        for s, t in zip(services, threads):
            s.stop()
            t.join(30)
    served = [set(s.stage.learner.devices) for s in services]
    assert served[0] == {d for d in devices if partition_of(d) in low}
    assert served[1] == set(devices) - served[0] and served[0] and served[1]
