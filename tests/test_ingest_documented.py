"""The vendors' documented payloads through a real Mosquitto into ``ingest`` → edge, with
the mapping docs/ingest.md gives for each format (issue 20, "How we will know").

Each format's documented payload (tests/payloads/, sources in tests/payloads/README.md
and tests/test_ingest_formats.py) is sent 30 times with its numbers varied
deterministically — the document's structure kept, the target and a feature varied so
a model learns something, counters and timestamps increasing — and every reading must
arrive at the edge once (seq 0..n-1 per device), under the device id the mapping
builds, with the features, target and timestamp that were sent (read back from the
gateway's ``--record`` CSV), and the edge's predictions must equal River's
``StandardScaler | LinearRegression`` predict-then-learn over the recorded rows.

Sparkplug B payloads are built as the Sparkplug 3.0 specification lays them out
(eclipse-sparkplug/sparkplug, chapters 4 Topics and 6 Payloads: NBIRTH at seq 0 with
``bdSeq`` and ``Node Control/Rebirth``, tck-id-topics-dbirth-metric-reqs "every metric
the Edge Node will ever report on", tck-id-topics-ddata-payload "the metrics that have
changed", seq +1 per message of the node).

Then redelivery and restart (a Sparkplug rebirth, a lost DDATA, a repeated seq; The
Things Stack's ``f_cnt`` skipped, repeated and reset by a rejoin), and one dead letter
per reason, each followed by a message that is still mapped and predicted.
"""

from __future__ import annotations

import csv
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from faults import predicted, predictions_by_device, quiet_edge, started
from river import linear_model, preprocessing

from streampipe.edge import EdgeService
from streampipe.ingest.gateway import Gateway, GatewayConfig
from streampipe.ingest.mapping import load_mapping_text
from streampipe.ingest.sparkplug import encode_birth, encode_data, encode_death, topic
from streampipe.transport import Connection

ROOT = Path(__file__).resolve().parent.parent
PAYLOADS = Path(__file__).parent / "payloads"
N = 30  # messages of each documented payload
GW = "gw"

#: docs/ingest.md's mapping of each format, by its source name.
DOCS = {
    re.search(r'name = "(\w+)"', block)[1]: block
    for block in re.findall(r"```toml\n(.*?)```", (ROOT / "docs" / "ingest.md").read_text(), re.S)
}


def doc(name: str) -> Any:
    return json.loads((PAYLOADS / name).read_text())


@dataclass
class Sent:
    """What a format's devices publish, and the readings the mapping must make of it."""

    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)  # topic, body, retain
    #: device -> [(x in the order the edge learns it, y, ts or None for arrival time)]
    readings: dict[str, list[tuple[dict[str, float], float | None, float | None]]] = field(
        default_factory=dict
    )
    #: dead letters the documented payloads make on purpose: [(topic, reason)]
    dead: list[tuple[str, str]] = field(default_factory=list)

    def send(self, topic: str, body: Any, retain: bool = False) -> None:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.messages.append((topic, payload, retain))

    def expect(self, device: str, x: dict[str, float], y: float | None, ts: float | None) -> None:
        self.readings.setdefault(device, []).append((x, y, ts))


def tag() -> str:
    return uuid.uuid4().hex[:6]


# --- each format's documented payloads, varied ---------------------------------------


def z2m_temperature() -> tuple[str, Sent]:
    """Xiaomi WSDCGQ01LM. The documented mapping's target is ``$.power``, which neither
    documented Zigbee2MQTT device reports: this one learns its temperature."""
    mapping = DOCS["z2m"].replace('target = "$.power"', 'target = "$.temperature"')
    sent, name = Sent(), f"0x00158d0001-{tag()}"
    base = doc("z2m_wsdcgq01lm.json")
    for i in range(N):
        body = {**base, "temperature": base["temperature"] + 0.25 * i, "humidity": 40.0 + i % 7}
        sent.send(f"zigbee2mqtt/{name}", body, retain=True)  # Zigbee2MQTT retains state
        sent.expect(f"z2m.{name}", {"humidity": body["humidity"]}, body["temperature"], None)
    return mapping, sent


def z2m_bulb() -> tuple[str, Sent]:
    """IKEA LED1545G12, with ``state`` mapped as docs/ingest.md says under the block."""
    mapping = (
        DOCS["z2m"].replace('target = "$.power"', 'target = "$.brightness"')
        + '[source.features]\nstate = { path = "$.state", map = { ON = 1, OFF = 0 } }\n'
        + 'color_temp = "$.color_temp"\n'
    )
    sent, name = Sent(), f"bulb-{tag()}"
    base = doc("z2m_led1545g12.json")
    for i in range(N):
        on = i % 4 != 3
        body = {"state": "ON" if on else "OFF", "brightness": 215 - 5 * i, "color_temp": 325 + i}
        assert list(body) == list(base)
        sent.send(f"zigbee2mqtt/{name}", body, retain=True)
        x = {"state": 1.0 if on else 0.0, "color_temp": float(body["color_temp"])}
        sent.expect(f"z2m.{name}", x, float(body["brightness"]), None)
    return mapping, sent


def tasmota(file: str, local: datetime, utc: datetime, three_phase: bool) -> tuple[str, Sent]:
    """``Time`` is Berlin time without an offset (the mapping's time zone)."""
    mapping = DOCS["tasmota"]
    if three_phase:
        # The documented target, "$.ENERGY.Power", is an array on three phases (a
        # not_numeric dead letter): phase 1's power, the others stay features.
        mapping = mapping.replace('target = "$.ENERGY.Power"', 'target = "$.ENERGY.Power[0]"')
    sent, name = Sent(), f"denky_D6C0C0-{tag()}"
    base = doc(file)
    for i in range(N):
        body = json.loads(json.dumps(base))
        energy = body["ENERGY"]
        body["Time"] = (local + timedelta(seconds=10 * i)).isoformat()
        energy["Total"] = round(energy["Total"] + 0.01 * i, 3)  # a meter: only increases
        energy["Today"] = round(energy["Today"] + 0.01 * i, 3)
        if three_phase:
            energy["Current"] = [round(2.13 + 0.1 * i, 3), 0.0, round(0.05 * (i % 3), 3)]
            energy["Power"] = [490 + 23 * i, 0, 11 * (i % 3)]
        else:
            energy["Current"] = round(1.0 + 0.1 * i, 3)
            energy["Power"] = 170 + 23 * i
        sent.send(f"tele/{name}/SENSOR", body)
        # Every number under ENERGY in the payload's order, arrays split; text left out,
        # and the target.
        x = {}
        for k, v in energy.items():
            for phase, value in enumerate(v) if isinstance(v, list) else [(None, v)]:
                key = k if phase is None else f"{k}_{phase}"
                if isinstance(value, int | float) and key not in ("Power", "Power_0"):
                    x[key] = float(value)
        y = float(energy["Power"][0] if three_phase else energy["Power"])
        ts = (utc + timedelta(seconds=10 * i)).timestamp()
        sent.expect(f"tasmota.{name}", x, y, ts)
    return mapping, sent


def tasmota_single() -> tuple[str, Sent]:
    # 17:28:45 in Berlin on 26 October 2021 is summer time, UTC+2.
    return tasmota(
        "tasmota_teleinfo_sensor.json",
        datetime(2021, 10, 26, 17, 28, 45),
        datetime(2021, 10, 26, 15, 28, 45, tzinfo=UTC),
        three_phase=False,
    )


def tasmota_three_phase() -> tuple[str, Sent]:
    return tasmota(
        "tasmota_three_phase.json",
        datetime(2020, 8, 7, 19, 49, 49),
        datetime(2020, 8, 7, 17, 49, 49, tzinfo=UTC),
        three_phase=True,
    )


def shelly() -> tuple[str, Sent]:
    """NotifyStatus carries only what changed; ``merge = "last"`` completes it."""
    sent, name = Sent(), f"shellypro4pm-f008d1d8b8b8-{tag()}"
    topic_, device = f"{name}/events/rpc", f"shelly.{name}"
    switch, cloud = doc("shelly_notify_switch.json"), doc("shelly_notify_cloud.json")
    t0 = switch["params"]["ts"]
    sent.send(topic_, switch)  # the documented example 1: output on, nothing else
    sent.expect(device, {"output": 1.0}, None, t0)
    cloud["params"]["ts"] = t0 + 0.5
    sent.send(topic_, cloud)  # example 2: no switch at all, no reading
    output, voltage = 1.0, None
    for i in range(N):
        change: dict[str, Any] = {"id": 0}
        ts = round(t0 + 1 + i, 2)
        if i % 5 != 4:
            change["apower"] = round(8.5 + 1.5 * i, 2)
        if i % 3 != 2:
            voltage = change["voltage"] = round(229.0 + 0.3 * (i % 7), 1)
        if i % 10 == 9:
            output = float(not output)
            change["output"] = bool(output)
        msg = {**switch, "params": {"ts": ts, "switch:0": change}}
        sent.send(topic_, msg)
        if change == {"id": 0}:
            continue  # nothing mapped changed: no reading (counted as nothing_new)
        x = {"output": output} if voltage is None else {"output": output, "voltage": voltage}
        sent.expect(device, x, change.get("apower"), ts)
    return DOCS["shelly"], sent


def owntracks() -> tuple[str, Sent]:
    sent, user = Sent(), f"jane-{tag()}"
    base = doc("owntracks_location.json")
    for i in range(N):
        body = {
            **base,
            "batt": 100 - i,
            "lat": round(51.2 + 0.001 * i, 4),
            "vel": 7 + i % 5,
            "tst": base["tst"] + 60 * i,
        }
        sent.send(f"owntracks/{user}/pixel", body, retain=True)  # OwnTracks retains too
        x = {k: float(body[k]) for k in ("lat", "lon", "acc", "vel")}
        sent.expect(f"owntracks.{user}.pixel", x, float(body["batt"]), float(body["tst"]))
    return DOCS["owntracks"], sent


def tts_uplink(
    base: dict[str, Any], app: str, dev: str, f_cnt: int, i: int
) -> tuple[str, dict[str, Any], tuple[dict[str, float], float, float]]:
    """The documented uplink with frame counter ``f_cnt``, its numbers varied by ``i``."""
    body = json.loads(json.dumps(base))
    received = datetime(2020, 2, 12, 15, 15, 46, 14773, tzinfo=UTC) + timedelta(seconds=60 * i)
    body["end_device_ids"]["device_id"] = dev
    body["end_device_ids"]["application_ids"]["application_id"] = app
    body["received_at"] = received.strftime("%Y-%m-%dT%H:%M:%S.%f") + "143Z"  # ns, as TTS
    up = body["uplink_message"]
    up["f_cnt"] = f_cnt
    up["decoded_payload"] = {"temperature": 1.0 + 0.5 * i, "luminosity": round(0.64 + 0.02 * i, 2)}
    up["rx_metadata"][0]["rssi"] = -35 - i % 9
    x = {"luminosity": up["decoded_payload"]["luminosity"], "rssi": float(-35 - i % 9)}
    return (
        f"v3/{app}/devices/{dev}/up",
        body,
        (x, up["decoded_payload"]["temperature"], received.timestamp()),
    )


def tts() -> tuple[str, Sent]:
    sent, app, dev = Sent(), f"app1-{tag()}", "dev1"
    base = doc("tts_uplink.json")
    for i in range(N):
        t, body, (x, y, ts) = tts_uplink(base, app, dev, f_cnt=1 + i, i=i)
        sent.send(t, body)
        sent.expect(f"ttn.{app}.{dev}", x, y, ts)
    return DOCS["ttn"], sent


def value_lines(name: str) -> list[tuple[str, str]]:
    return [tuple(line.split(" ", 1)) for line in (PAYLOADS / name).read_text().splitlines()]


def esphome() -> tuple[str, Sent]:
    """One value per topic; a reading when ``power`` (the target) arrives, at its time."""
    sent, node = Sent(), f"livingroom-{tag()}"
    lines = value_lines("esphome_states.txt")
    assert [t.split("/", 1)[1] for t, _ in lines] == [
        "sensor/voltage/state", "sensor/current/state", "binary_sensor/motion/state",
        "sensor/power/state",
    ]  # fmt: skip
    for i in range(N):
        voltage, current = round(230.4 + 0.1 * (i % 7), 1), round(0.052 + 0.01 * i, 3)
        motion = "ON" if i % 2 == 0 else "OFF"
        power = round(voltage * current * 0.95, 3)
        values = {"voltage": voltage, "current": current, "motion": motion, "power": power}
        for t, _ in lines:
            field_ = t.split("/")[2]
            sent.send(f"{node}/{t.split('/', 1)[1]}", str(values[field_]).encode(), retain=True)
        x = {"voltage": voltage, "current": current, "motion": 1.0 if motion == "ON" else 0.0}
        sent.expect(f"esphome.{node}", x, power, None)
    return DOCS["esphome"], sent


def home_assistant() -> tuple[str, Sent]:
    """Statestream: ``state`` and ``brightness`` make a reading; ``last_changed`` is
    excluded by the mapping: counted, not a dead letter."""
    sent, entity = Sent(), f"master_bedroom_dimmer_{tag()}"
    lines = value_lines("ha_statestream.txt")
    for i in range(N):
        on = i % 3 != 2
        changed = datetime(2017, 10, 1, 23, 20, 30, 920969, tzinfo=UTC) + timedelta(seconds=i)
        values = {
            "state": json.dumps("on" if on else "off"),
            "brightness": json.dumps(128 + 3 * i),
            "last_changed": json.dumps(changed.isoformat()),
        }
        for t, _ in lines:
            t = t.replace("master_bedroom_dimmer", entity)
            sent.send(t, values[t.rsplit("/", 1)[1]].encode())
        sent.expect(f"ha.light.{entity}", {"on": 1.0 if on else 0.0}, float(128 + 3 * i), None)
    return DOCS["ha"], sent


#: A Sparkplug device's metrics, in its DBIRTH's order, and their aliases ("Inputs/A"
#: is the specification's own example name; a Boolean is a feature as 0/1).
METRICS = {"Power": 1, "Volts": 2, "Amps": 3, "Inputs/A": 4}


def sparkplug_values(i: int) -> dict[str, Any]:
    return {
        "Power": 50.0 + 2.5 * i,
        "Volts": 230.0 + 0.2 * (i % 5),
        "Amps": 0.2 + 0.01 * i,
        "Inputs/A": i % 4 == 0,
    }


def sparkplug() -> tuple[str, Sent]:
    """NBIRTH (node controls only: no reading), DBIRTH (every metric: a reading), then
    DDATA by alias, only what changed; each reading holds every metric last reported."""
    sent, node, dev = Sent(), f"line1-{tag()}", "meter"
    device = f"plant.{node}.{dev}"
    t0 = 1_700_000_000.0
    sent.send(topic("plant", "NBIRTH", node), encode_birth({}, seq=0, bdseq=0, ts=t0))
    last = sparkplug_values(0)
    birth = encode_birth(last, seq=1, aliases=METRICS, ts=t0 + 1)
    sent.send(topic("plant", "DBIRTH", node, dev), birth)
    features = ("Volts", "Amps", "Inputs/A")
    sent.expect(device, {k: float(last[k]) for k in features}, last["Power"], t0 + 1)
    for i in range(1, N):
        now = sparkplug_values(i)
        changed = {k: v for k, v in now.items() if v != last[k] and (k != "Amps" or i % 3 == 0)}
        last |= changed
        ts = t0 + 1 + i
        sent.send(
            topic("plant", "DDATA", node, dev),
            encode_data(changed, seq=1 + i, aliases=METRICS, ts=ts),
        )
        sent.expect(device, {k: float(last[k]) for k in features}, last["Power"], ts)
    return DOCS["plant"], sent


FORMATS = {
    "z2m_wsdcgq01lm": z2m_temperature,
    "z2m_led1545g12": z2m_bulb,
    "tasmota": tasmota_single,
    "tasmota_three_phase": tasmota_three_phase,
    "shelly": shelly,
    "owntracks": owntracks,
    "the_things_stack": tts,
    "esphome": esphome,
    "ha_statestream": home_assistant,
    "sparkplug": sparkplug,
}


# --- the broker, the gateway, the edge -----------------------------------------------


def gateway(broker: Any, topics: Any, mapping: str, record: Path) -> Gateway:
    return Gateway(
        GatewayConfig(
            broker.url,
            GW,
            load_mapping_text(mapping, "docs/ingest.md"),
            topic_root=topics.root,
            batch=10,
            linger=0.05,
            record=str(record),
        )
    )


def publish(broker: Any, messages: list[tuple[str, bytes, bool]]) -> None:
    with Connection(broker.url, f"dev-{tag()}").connect() as conn:
        infos = [conn.publish(t, body, qos=1, retain=retain) for t, body, retain in messages]
        for info in infos:
            info.wait_for_publish(10)


def clear_retained(broker: Any, messages: list[tuple[str, bytes, bool]]) -> None:
    """Take away what the test left retained: the broker is shared by the session."""
    retained = sorted({t for t, _, retain in messages if retain})
    if retained:
        publish(broker, [(t, b"", True) for t in retained])


def recorded(path: Path, device: str) -> list[tuple[float, dict[str, float], float | None]]:
    """The gateway's ``--record``ed readings of ``device``: ``(time, x, y)``, x without
    the empty cells (features the reading did not carry)."""
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["device"] == device]
    return [
        (
            float(r.pop("time")),
            {k: float(v) for k, v in r.items() if k not in ("device", "target") and v != ""},
            float(r["target"]) if r["target"] != "" else None,
        )
        for r in rows
    ]


def river(rows: list[tuple[dict[str, float], float | None]]) -> list[Any]:
    """River's predict-then-learn, as the edge does it: a reading without a target is
    predicted, not learned."""
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    out = []
    for x, y in rows:
        out.append(model.predict_one(x))
        if y is not None:
            model.learn_one(x, y)
    return out


def offline(
    rows: list[tuple[float, dict[str, float], float | None]], order: list[dict[str, float]]
) -> list[Any]:
    """River over the recorded rows, each row's features in the order the edge learned
    them (a sum's last bit depends on the order, and equality is exact)."""
    return river([({k: x[k] for k in keys}, y) for (_, x, y), keys in zip(rows, order)])


def dead_letters(cap: Any, topics: Any, stage: str) -> list[dict[str, Any]]:
    return cap.json(topics.deadletter(stage))


# --- 1. every format ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_documented_payloads_are_learned_once_as_river_learns_the_recording(
    fmt, broker, topics, capture, tmp_path
):
    mapping, sent = FORMATS[fmt]()
    devices = set(sent.readings)
    n = sum(len(v) for v in sent.readings.values())
    record = tmp_path / "record.csv"
    cap = capture([topics.predictions(), topics.deadletter()])
    gw = gateway(broker, topics, mapping, record)
    try:
        with started(quiet_edge(broker, topics, "doc-edge")), started(gw):
            began = time.time()
            publish(broker, sent.messages)
            assert gw.wait_handled(len(sent.messages), 30)
            assert cap.wait(lambda: predicted(cap, topics, devices) >= n), (
                {d: [s for s, _ in p] for d, p in predictions_by_device(cap, topics).items()},
                [(b["stage"], b["reason"], b["detail"]) for b in dead_letters(cap, topics, "+")],
            )
            ended = time.time()
    finally:
        clear_retained(broker, sent.messages)
    mine = {t for t, _, _ in sent.messages}
    dead = [(b["topic"], b["reason"]) for b in dead_letters(cap, topics, GW) if b["topic"] in mine]
    assert dead == sent.dead
    assert dead_letters(cap, topics, "doc-edge") == []

    got = predictions_by_device(cap, topics)
    for device, expected in sent.readings.items():
        # Each reading predicted once, in order, none missing, under the mapped id.
        assert [seq for seq, _ in got.get(device, [])] == list(range(len(expected))), device
        rows = recorded(record, device)
        assert [(x, y) for _, x, y in rows] == [(x, y) for x, y, _ in expected]
        times = [t for t, _, _ in rows]
        if expected[0][2] is None:  # the time the message arrived
            assert all(began <= t <= ended for t in times) and times == sorted(times)
        else:
            assert times == [ts for _, _, ts in expected]
        assert [p for _, p in got[device]] == offline(rows, [x for x, _, _ in expected])


# --- 2. redelivery and restart --------------------------------------------------------


def learned(service: EdgeService, device: str) -> Any:
    return service.stage.learner.devices[device]


def test_sparkplug_rebirth_starts_an_epoch_a_lost_ddata_is_counted_a_repeat_refused(
    broker, topics, capture, tmp_path
):
    node, dev = f"line1-{tag()}", "meter"
    device = f"plant.{node}.{dev}"
    t0 = 1_700_000_000.0
    messages: list[tuple[str, bytes, bool]] = []

    def send(kind: str, payload: bytes, to: str | None = dev) -> None:
        messages.append((topic("plant", kind, node, to), payload, False))

    def session(bdseq: int, ddata_seqs: list[int], start: int) -> None:
        send("NBIRTH", encode_birth({}, seq=0, bdseq=bdseq, ts=t0 + start), None)
        send("DBIRTH", encode_birth(sparkplug_values(start), seq=1, aliases=METRICS, ts=t0 + start))
        for seq in ddata_seqs:
            i = start + seq
            values = {k: sparkplug_values(i)[k] for k in ("Power", "Volts")}
            send("DDATA", encode_data(values, seq=seq, aliases=METRICS, ts=t0 + i))

    # seq 2..14 but 10, which is lost; then seq 14 again (a duplicate).
    session(0, [s for s in range(2, 15) if s != 10] + [14], start=0)
    # The node reconnects: its will, then a rebirth with the next bdSeq, seq from 0.
    messages.append((topic("plant", "NDEATH", node), encode_death(0, ts=t0 + 50), False))
    session(1, list(range(2, 10)), start=100)
    first, second = 1 + 12, 1 + 8  # DBIRTH + DDATA readings of each session
    record = tmp_path / "record.csv"
    cap = capture([topics.predictions(), topics.deadletter()])
    with (
        started(quiet_edge(broker, topics, "doc-edge")) as e,
        started(gateway(broker, topics, DOCS["plant"], record)) as gw,
    ):
        publish(broker, messages)
        assert gw.wait_handled(len(messages), 30)
        assert cap.wait(lambda: predicted(cap, topics, {device}) >= first + second)
    seqs = [s for s, _ in predictions_by_device(cap, topics)[device]]
    assert seqs == list(range(first)) + list(range(second)), "learned twice, or lost"
    assert learned(e, device).epoch == gw.numbering.epoch + 1
    assert learned(e, device).learned == first + second
    # The lost DDATA: the node's seq says so, the gateway counts it (the edge cannot:
    # the gateway numbers a Sparkplug device's readings itself).
    assert gw.registry.get_sample_value("streampipe_ingest_source_sequence_gaps_total") == 1
    assert e.registry.get_sample_value("streampipe_sequence_gaps_total") == 0
    dead = dead_letters(cap, topics, GW)
    assert [(b["reason"], b["topic"]) for b in dead] == [
        ("duplicate", topic("plant", "DDATA", node, dev))
    ]
    assert dead_letters(cap, topics, "doc-edge") == []
    rows = recorded(record, device)
    assert len(rows) == first + second
    order = [dict.fromkeys(("Volts", "Amps", "Inputs/A"))] * len(rows)
    assert [p for _, p in predictions_by_device(cap, topics)[device]] == offline(rows, order)


def test_the_things_stack_f_cnt_skipped_repeated_and_reset(broker, topics, capture, tmp_path):
    app, dev = f"app1-{tag()}", "dev1"
    device = f"ttn.{app}.{dev}"
    base = doc("tts_uplink.json")
    # f_cnt 1..15 without 11; 15 again; then the device rejoins and counts from 0.
    f_cnts = [c for c in range(1, 16) if c != 11] + [15] + list(range(0, 6))
    messages = []
    for i, f_cnt in enumerate(f_cnts):
        t, body, _ = tts_uplink(base, app, dev, f_cnt=f_cnt, i=i)
        if i and f_cnt == f_cnts[i - 1]:  # the repeat is the same uplink again
            body = json.loads(messages[-1][1])
        messages.append((t, json.dumps(body).encode(), False))
    record = tmp_path / "record.csv"
    cap = capture([topics.predictions(), topics.deadletter()])
    with (
        started(quiet_edge(broker, topics, "doc-edge")) as e,
        started(gateway(broker, topics, DOCS["ttn"], record)) as gw,
    ):
        publish(broker, messages)
        assert gw.wait_handled(len(messages), 30)
        assert cap.wait(lambda: predicted(cap, topics, {device}) >= 14 + 6)
    got = predictions_by_device(cap, topics)[device]
    # f_cnt 1..15 are seq 0..14 (f_cnt 11, seq 10, missing); the rejoin is a new epoch.
    assert [s for s, _ in got] == [s for s in range(15) if s != 10] + list(range(6))
    assert e.registry.get_sample_value("streampipe_sequence_gaps_total") == 1
    assert learned(e, device).epoch == gw.numbering.epoch + 1
    assert learned(e, device).learned == 20  # the rejoined device's readings learned too
    dead = dead_letters(cap, topics, GW)
    assert [b["reason"] for b in dead] == ["duplicate"]
    assert gw.registry.get_sample_value("streampipe_rejected_total", {"reason": "duplicate"}) == 1
    assert dead_letters(cap, topics, "doc-edge") == []
    rows = recorded(record, device)
    assert [p for _, p in got] == offline(rows, [dict.fromkeys(("luminosity", "rssi"))] * 20)


# --- 3. bad input ---------------------------------------------------------------------


def test_every_dead_letter_reason_and_the_gateway_goes_on(broker, topics, capture, tmp_path):
    t = tag()
    plug, node, tele, app = f"plug-{t}", f"node-{t}", f"plug-{t}", f"app1-{t}"
    tasmota_doc = doc("tasmota_teleinfo_sensor.json")
    tts_doc = doc("tts_uplink.json")
    sp_node = f"line1-{t}"
    mapping = "".join(DOCS[s] for s in ("z2m", "tasmota", "ttn", "plant", "esphome"))

    def good_z2m(i: int) -> tuple[str, bytes]:
        body = {"power": 5.0 + i, "voltage": 230.0 - i}
        return f"zigbee2mqtt/{plug}", json.dumps(body).encode()

    stray = encode_data({"Power": 1.0}, seq=5, aliases=METRICS)
    uplinks = [tts_uplink(tts_doc, app, "dev1", f_cnt=c, i=c)[:2] for c in (1, 2)]

    bad_and_good: list[tuple[str, tuple[str, bytes], list[tuple[str, bytes]]]] = [
        ("not_json", (f"zigbee2mqtt/{plug}", b"ON"), [good_z2m(1)]),
        ("path_missing", (f"zigbee2mqtt/{plug}", b'{"state":"ON"}'), [good_z2m(2)]),
        (
            "not_numeric",  # ESPHome publishes "nan" for a sensor without a state
            (f"{node}/sensor/power/state", b"nan"),
            [(f"{node}/sensor/voltage/state", b"230.1"), (f"{node}/sensor/power/state", b"12.5")],
        ),
        (
            "bad_timestamp",
            (f"tele/{tele}/SENSOR", json.dumps({**tasmota_doc, "Time": "26/10/2021"}).encode()),
            [(f"tele/{tele}/SENSOR", json.dumps(tasmota_doc).encode())],
        ),
        ("invalid_device", (f"zigbee2mqtt/{'x' * 130}", b'{"power": 1.0}'), [good_z2m(3)]),
        (
            "unknown_alias",  # DATA of a node that has not been born
            (topic("plant", "DDATA", sp_node, "meter"), stray),
            [
                (topic("plant", "NBIRTH", sp_node), encode_birth({}, seq=0, bdseq=0)),
                (
                    topic("plant", "DBIRTH", sp_node, "meter"),
                    encode_birth(sparkplug_values(0), seq=1, aliases=METRICS),
                ),
            ],
        ),
        (
            "duplicate",  # the same f_cnt again
            (uplinks[0][0], json.dumps(uplinks[0][1]).encode()),
            [(uplinks[1][0], json.dumps(uplinks[1][1]).encode())],
        ),
    ]  # fmt: skip
    messages = [(uplinks[0][0], json.dumps(uplinks[0][1]).encode(), False)]  # f_cnt 1, first
    # The bridge's own state: the z2m mapping excludes it, so it is counted, not a dead
    # letter (every bridge restart would make one).
    messages += [("zigbee2mqtt/bridge", b'{"state":"online"}', False), (*good_z2m(0), False)]
    for _, bad, goods in bad_and_good:
        messages += [(bad[0], bad[1], False)] + [(g[0], g[1], False) for g in goods]
    per_device = {
        f"z2m.{plug}": 4,
        f"esphome.{node}": 1,
        f"tasmota.{tele}": 1,
        f"plant.{sp_node}.meter": 1,
        f"ttn.{app}.dev1": 2,
    }
    cap = capture([topics.predictions(), topics.deadletter()])
    record = tmp_path / "record.csv"
    with (
        started(quiet_edge(broker, topics, "doc-edge")),
        started(gateway(broker, topics, mapping, record)) as gw,
    ):
        publish(broker, messages)
        assert gw.wait_handled(len(messages), 30)
        assert cap.wait(lambda: predicted(cap, topics, per_device) >= sum(per_device.values()))
        assert cap.wait(lambda: len(dead_letters(cap, topics, GW)) >= len(bad_and_good))
    dead = dead_letters(cap, topics, GW)
    assert [(b["reason"], b["topic"]) for b in dead] == [
        (reason, bad[0]) for reason, bad, _ in bad_and_good
    ]
    assert {b["stage"] for b in dead} == {GW}
    assert gw.registry.get_sample_value("streampipe_ingest_excluded_total") == 1
    for reason, _, _ in bad_and_good:
        assert gw.registry.get_sample_value("streampipe_rejected_total", {"reason": reason}) == 1
    got = predictions_by_device(cap, topics)
    assert {d: [s for s, _ in got.get(d, [])] for d in per_device} == {
        d: list(range(k)) for d, k in per_device.items()
    }
    assert dead_letters(cap, topics, "doc-edge") == []
