"""``streampipe demo`` as a new user meets it: what it says, and Ctrl-C."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from streampipe.cli import main
from streampipe.learn import DEFAULT_MODEL_SPEC

#: A terminal is 80 columns wide; no line the demo prints may wrap there.
COLUMNS = 80


class Demo:
    """``python -m streampipe demo ARGS`` in a session of its own, as a terminal runs it;
    its stdout lines are read as they come."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streampipe", "demo", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, which Ctrl-C signals whole
        )
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self._new.put(line.rstrip("\n"))
        self._new.put(None)

    def wait_for(self, found: Callable[[str], bool], timeout: float = 30.0) -> bool:
        """Read stdout lines until one is ``found``; False at the end of output or timeout."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._new.get(timeout=left)
            except queue.Empty:
                return False
            if line is None:
                return False
            self.lines.append(line)
            if found(line):
                return True
        return False

    def ctrl_c(self) -> None:
        """What Ctrl-C in a terminal does: SIGINT to every process of the foreground group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        for t in self._readers:
            t.join(5)
        self.wait_for(lambda line: False, timeout=0.1)  # collect what is left
        return rc

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextmanager
def demo(*args: str) -> Iterator[Demo]:
    d = Demo(*args)
    try:
        yield d
    finally:
        d.kill()


def is_prediction(line: str) -> bool:
    return line.startswith("sensor-") and " predicted " in line and line.endswith(" W")


def is_metrics(line: str) -> bool:
    return line.startswith("edge demo-edge: ") and " MAE " in line


def fits(lines: list[str]) -> list[str]:
    """The lines that would wrap in a terminal (none, then)."""
    return [line for line in lines if len(line) > COLUMNS]


def quiet(stderr: str) -> bool:
    return not any(word in stderr for word in ("reconnecting", "Traceback", "WARNING", "ERROR"))


def stops_at_once_and_quietly(d: Demo, what: str) -> None:
    """Ctrl-C, as a terminal sends it, stops the running demo ``d`` within 3 s, with
    nothing on stderr, its summary last and every line within 80 columns."""
    start = time.monotonic()
    d.ctrl_c()
    rc = d.wait(timeout=10)
    took = time.monotonic() - start
    print(f"Ctrl-C stopped {what} in {took:.2f} s")
    assert rc in (0, 130), d.stderr
    assert took < 3, f"Ctrl-C took {took:.1f} s to stop {what}"
    assert quiet(d.stderr), d.stderr
    assert d.lines[-1].startswith("demo stopped: "), d.lines
    assert not fits(d.lines)


def test_ctrl_c_stops_the_demo_at_once_and_quietly():
    """Ctrl-C reaches the demo's own Mosquitto too (it is in the terminal's process
    group): the demo must not lose its broker before its clients are done with it."""
    with demo("--devices", "3") as d:
        assert d.wait_for(is_prediction), (d.lines, d.stderr)
        assert d.wait_for(is_metrics), (d.lines, d.stderr)
        stops_at_once_and_quietly(d, "the demo")
    assert int(d.lines[-1].split()[2].replace(",", "")) > 0
    # Before the first prediction: what is learned from what, and where to watch it.
    header = "\n".join(d.lines[: d.lines.index(next(filter(is_prediction, d.lines)))])
    assert "learns:   power (W)" in header
    assert all(f in header for f in ("temperature", "humidity", "pressure", "vibration"))
    assert "current (A)" in header
    assert "model:    preprocessing.StandardScaler | linear_model.LinearRegression" in header
    assert "mosquitto_sub -h 127.0.0.1 -p " in header and "'streampipe/predictions/+'" in header
    assert "/metrics (Prometheus)" in header and "Ctrl-C" in header


@pytest.mark.parametrize(
    ("fmt", "devices"),
    [
        ("z2m", "Zigbee2MQTT devices on zigbee2mqtt/<device>"),
        # Its device ids (streampipe.sensors.sensor-000) are longer than a line allows.
        ("sparkplug", "Sparkplug B devices on spBv1.0/streampipe/DDATA/sensors/<device>"),
    ],
)
def test_the_demo_shows_ingest_and_ctrl_c_still_stops_it_quietly(fmt, devices):
    """--format: the sensors publish as those devices do, an ingest gateway with the
    shipped mapping maps them to readings, and the edge predicts them."""

    def mapped(line: str) -> bool:
        return "sensor-" in line.split(" ", 1)[0] and " predicted " in line

    with demo("--devices", "3", "--format", fmt) as d:
        assert d.wait_for(mapped), (d.lines, d.stderr)
        assert d.wait_for(is_metrics), (d.lines, d.stderr)
        stops_at_once_and_quietly(d, f"the demo --format {fmt}")
    header = " ".join(" ".join(d.lines[: d.lines.index(next(filter(mapped, d.lines)))]).split())
    assert f"ingest: sensors publish as {devices}; streampipe ingest maps them" in header
    assert f"(examples/ingest/{fmt}.toml)" in header
    assert "rejected" not in "\n".join(filter(is_metrics, d.lines))


def test_demo_runs_for_its_duration_and_stops_by_itself(broker):
    with demo(
        "--broker",
        f"mqtt://127.0.0.1:{broker.port}",
        "--duration",
        "2",
        "--devices",
        "3",
        "--topic-root",
        "demo-test",
    ) as d:
        rc = d.wait(timeout=30)
    assert rc == 0, d.stderr
    assert quiet(d.stderr), d.stderr
    assert any(map(is_prediction, d.lines)), d.lines
    assert not fits(d.lines)
    received = int(d.lines[-1].split("demo stopped: ", 1)[1].split()[0].replace(",", ""))
    assert received > 0


def test_demo_help_says_what_it_does_and_every_default():
    result = subprocess.run(
        [sys.executable, "-m", "streampipe", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": str(COLUMNS)},
    )
    assert result.returncode == 0, result.stderr
    assert "predicts each reading's power (W)" in " ".join(result.stdout.split())
    for option, default in (
        ("--devices", "5"),
        ("--rate", "20"),
        ("--duration", "run until Ctrl-C"),
        ("--model", DEFAULT_MODEL_SPEC),
        ("--metrics-port", "0"),
        ("--broker", "$STREAMPIPE_BROKER or a private Mosquitto"),
    ):
        text = " ".join(result.stdout.split(f"  {option} ", 1)[1].split("\n  -", 1)[0].split())
        assert f"(default: {default})" in text, (option, text)


def test_demo_without_mosquitto_says_how_to_install_it(monkeypatch, capsys):
    import streampipe.broker as broker_module

    monkeypatch.setattr(broker_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(broker_module.os.path, "exists", lambda path: False)
    assert main(["demo", "--duration", "1"]) == 2
    err = capsys.readouterr().err
    assert "apt-get install -y mosquitto" in err and "Traceback" not in err
