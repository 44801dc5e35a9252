"""Simulated devices in each vendor's format → Mosquitto → ``streampipe ingest`` with the
shipped mapping (examples/ingest/<format>.toml) → an edge: every reading is learned once,
under the right device id, and the edge's predictions equal River's predict-then-learn
over what the gateway recorded. Also the commands as a user runs them: ``streampipe
sensors --format z2m`` and ``streampipe ingest`` as processes, stopped with Ctrl-C, and
an ingest process killed mid-stream and restarted.
"""

from __future__ import annotations

import csv
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from faults import predicted, predictions_by_device, quiet_edge, started
from replaying import predict_then_learn, streampipe

from streampipe.ingest.gateway import Gateway, GatewayConfig
from streampipe.ingest.mapping import load_mapping
from streampipe.readings import Reading
from streampipe.sources.formats import FORMATS, Outgoing, Zigbee2MQTT, encoder
from streampipe.sources.simulate import FEATURES, SensorFleet
from streampipe.transport import Connection

EXAMPLES = Path(__file__).parent.parent / "examples" / "ingest"
DEVICES, READINGS = 3, 50

#: Each format's device id, from the simulated device's, as the shipped mapping makes it.
DEVICE_ID = {
    "z2m": "z2m.{}",
    "tasmota": "tasmota.{}",
    "shelly": "shelly.{}",
    "esphome": "esphome.{}",
    "sparkplug": "streampipe.sensors.{}",
}
#: The features the mapping yields, in the order the edge learns them in (a model's
#: sums depend on the order, and exact equality is asserted).
FEATURE_ORDER = {
    "z2m": [*FEATURES, "voltage", "linkquality"],
    "tasmota": ["Voltage", "Current", "temperature", "humidity", "pressure", "vibration"],
    "shelly": ["current", "temperature", "humidity", "pressure", "vibration"],
    "esphome": list(FEATURES),
    "sparkplug": [f.capitalize() for f in FEATURES],
}
#: The simulated feature each recorded column carries (the others are constants).
SIMULATED = {
    "tasmota": {"Current": "current"},
    "sparkplug": {f.capitalize(): f for f in FEATURES},
}


def fleet_readings(prefix: str, n: int = READINGS, start: float = 1.7e9) -> list[Reading]:
    """``n`` readings of each of DEVICES devices, interleaved, one second apart (no
    faults: a dropout reorders a batch's features, and equality is asserted exactly)."""
    fleet = SensorFleet(DEVICES, seed=11, prefix=prefix, faults=False)
    return [fleet.read(d, start + i) for i in range(n) for d in range(DEVICES)]


def publish(broker: Any, messages: list[Outgoing]) -> None:
    with Connection(broker.url, f"dev-{uuid.uuid4().hex[:8]}").connect() as conn:
        infos = [conn.publish(m.topic, m.payload, qos=1, retain=m.retain) for m in messages]
        for info in infos:
            info.wait_for_publish(10)


def clear_retained(broker: Any, topics: set[str]) -> None:
    """Take away what the test left retained: the broker is shared by the session."""
    if topics:
        publish(broker, [Outgoing(t, b"", retain=True) for t in sorted(topics)])


def recorded(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- every format, in process --------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_is_learned_once_and_equals_river_offline(
    fmt, broker, topics, capture, tmp_path
):
    prefix = f"s{uuid.uuid4().hex[:6]}"
    readings = fleet_readings(prefix)
    enc = encoder(fmt)
    messages = [m for r in readings for m in enc.encode(r)]
    ids = {f"{prefix}-{i:03d}": DEVICE_ID[fmt].format(f"{prefix}-{i:03d}") for i in range(3)}
    record = tmp_path / "record.csv"
    gw = Gateway(
        GatewayConfig(
            broker.url,
            "gw",
            load_mapping(EXAMPLES / f"{fmt}.toml"),
            topic_root=topics.root,
            batch=10,
            linger=0.05,
            record=str(record),
        )
    )
    cap = capture([topics.predictions(), topics.deadletter()])
    try:
        with started(quiet_edge(broker, topics, "e2e-edge")), started(gw):
            publish(broker, messages)
            assert gw.wait_handled(len(messages), 30)
            assert cap.wait(lambda: predicted(cap, topics) >= len(readings))
    finally:
        clear_retained(broker, {m.topic for m in messages if m.retain})
    assert cap.on(topics.deadletter()) == []
    assert gw.stats.readings == len(readings) and not gw.stats.rejected

    got = predictions_by_device(cap, topics)
    assert set(got) == set(ids.values())
    rows = recorded(record)
    assert list(rows[0]) == ["device", "time", *sorted(FEATURE_ORDER[fmt]), "target"]
    for sim_id, device in ids.items():
        # Each reading predicted once, in order, none missing.
        assert [seq for seq, _ in got[device]] == list(range(READINGS))
        mine = [r for r in rows if r["device"] == device]
        sent = [r for r in readings if r.device == sim_id]
        names = FEATURE_ORDER[fmt]
        # The gateway published what the devices measured, unchanged.
        simulated = SIMULATED.get(fmt, {n: n for n in FEATURES})
        assert [float(r["target"]) for r in mine] == [r.y for r in sent]
        for column, feature in simulated.items():
            assert [float(r[column]) for r in mine] == [r.x[feature] for r in sent]
        offline = [({n: float(r[n]) for n in names}, float(r["target"])) for r in mine]
        assert [y for _, y in got[device]] == predict_then_learn(offline)


# --- the commands, as a user runs them -----------------------------------------------


def ingest_process(broker: Any, topics: Any, *options: str) -> subprocess.Popen:
    return subprocess.Popen(
        streampipe(
            "ingest", "--broker", str(broker.url), "--topic-root", topics.root, *options
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def onlines(cap: Any, topics: Any, gateway_id: str) -> int:
    return sum(m.payload == b"online" for m in cap.on(topics.status(gateway_id)))


def wait_online(
    cap: Any, topics: Any, proc: subprocess.Popen, gateway_id: str = "ingest", seen: int = 0
) -> None:
    """Until the gateway says it is online (it has subscribed by then): the ``seen + 1``th
    'online' on its status topic."""
    assert cap.wait(
        lambda: onlines(cap, topics, gateway_id) > seen or proc.poll() is not None, 30
    ), "the gateway did not come online"
    assert proc.poll() is None, proc.communicate()


def test_sensors_in_z2m_format_through_the_ingest_command(broker, topics, capture, tmp_path):
    prefix = f"cli{uuid.uuid4().hex[:6]}"
    ids = {f"{prefix}-{i:03d}" for i in range(3)}
    cap = capture([topics.predictions(), topics.status("ingest")])
    ingest = ingest_process(
        broker, topics, "--topic", "zigbee2mqtt/{device}", "--target", "$.power",
        "--exclude", "zigbee2mqtt/bridge/#",
    )  # fmt: skip
    try:
        with started(quiet_edge(broker, topics, "e2e-edge")):
            wait_online(cap, topics, ingest)
            sensors = subprocess.run(
                streampipe(
                    "sensors", "--format", "z2m", "--broker", str(broker.url),
                    "--devices", "3", "--rate", "20", "--duration", "2", "--prefix", prefix,
                ),
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert sensors.returncode == 0, sensors.stderr
            published = int(re.search(r"published ([\d,]+) readings", sensors.stdout)[1])
            assert published >= 3 * 20
            assert cap.wait(lambda: predicted(cap, topics, ids) >= published)
            began = time.monotonic()
            ingest.send_signal(signal.SIGINT)
            out, err = ingest.communicate(timeout=10)
            took = time.monotonic() - began
    finally:
        if ingest.poll() is None:
            ingest.kill()
        clear_retained(broker, {f"zigbee2mqtt/{prefix}-{i:03d}" for i in range(3)})
    assert ingest.returncode == 0, err
    assert took < 3.0, f"ingest took {took:.1f} s to stop"
    (line,) = out.splitlines()
    m = re.fullmatch(
        r"ingest ingest: ([\d,]+) messages, ([\d,]+) readings published, 0 dead.*", line
    )
    assert m, line
    # Messages of other tests' devices may be retained on the shared broker: ours are all.
    assert int(m[2].replace(",", "")) >= published
    got = predictions_by_device(cap, topics)
    assert sum(len(got[d]) for d in ids) == published
    for d in ids:
        assert [seq for seq, _ in got[d]] == list(range(len(got[d])))


def test_an_ingest_process_killed_mid_stream_loses_nothing_and_learns_nothing_twice(
    broker, topics, capture, tmp_path
):
    base = f"{topics.root}-z2m"
    prefix = f"k{uuid.uuid4().hex[:6]}"
    n = 120
    readings = fleet_readings(prefix, n=n)
    enc = Zigbee2MQTT(base_topic=base)
    messages = [m for r in readings for m in enc.encode(r)]
    ids = {f"z2m.{prefix}-{i:03d}" for i in range(DEVICES)}
    options = (
        "--topic", f"{base}/{{device}}", "--target", "$.power", "--device", "z2m.{device}",
        "--state-dir", str(tmp_path / "state"), "--id", "killed",
    )  # fmt: skip
    cap = capture([topics.predictions(), topics.status("killed")])
    sent = threading.Event()

    def devices_publish() -> None:  # a steady stream, as devices send it
        with Connection(broker.url, f"dev-{uuid.uuid4().hex[:8]}").connect() as conn:
            infos = []
            for i, m in enumerate(messages):
                infos.append(conn.publish(m.topic, m.payload, qos=1, retain=m.retain))
                if i % DEVICES == DEVICES - 1:
                    time.sleep(0.02)  # pacing the devices, not synchronisation
            for info in infos:
                info.wait_for_publish(30)
        sent.set()

    first = ingest_process(broker, topics, *options)
    second = None
    try:
        with started(quiet_edge(broker, topics, "e2e-edge")):
            wait_online(cap, topics, first, "killed")
            devices = threading.Thread(target=devices_publish, daemon=True)
            devices.start()
            # Mid-stream: after the edge has learned some, well before the last is sent.
            assert cap.wait(lambda: predicted(cap, topics, ids) >= 60)
            assert not sent.is_set(), "the stream ended before the kill: slow the devices"
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            second = ingest_process(broker, topics, *options)
            wait_online(cap, topics, second, "killed", seen=1)
            devices.join(60)
            assert sent.is_set()
            assert cap.wait(lambda: predicted(cap, topics, ids) >= len(readings), 60)
            second.send_signal(signal.SIGINT)
            _, err = second.communicate(timeout=10)
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
        clear_retained(broker, {m.topic for m in messages})
    assert second.returncode == 0, err
    assert first.returncode == -signal.SIGKILL
    got = predictions_by_device(cap, topics)
    assert set(got) == ids
    for device in ids:
        seqs = sorted(seq for seq, _ in got[device])
        assert seqs == list(range(n)), f"{device}: lost or learned twice"


def test_encoders_keep_retained_topics_to_the_formats_that_retain():
    r = Reading("d", 0, 1.7e9, {"current": 1.0}, 2.0)
    retained = {f: {m.retain for m in encoder(f).encode(r)} for f in FORMATS}
    assert retained == {
        "z2m": {True}, "tasmota": {False}, "shelly": {False}, "esphome": {True},
        "sparkplug": {False},
    }  # fmt: skip
