"""Predictions for Home Assistant and Node-RED: ``edge --ha-discovery`` and ``--last-value``,
through a real Mosquitto; and that without them nothing extra is published."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import jinja2
import pytest
from faults import running

from streampipe import codec
from streampipe.demo import _Watcher
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.readings import Batch, Reading
from streampipe.stage import EdgeStage
from streampipe.transport import Connection

STAGE = "ha-edge"
#: Two devices, one of whose ids Home Assistant would not take as an object id.
DEVICES = ("boiler-1", "küche.2")
#: What Home Assistant's MQTT sensor requires (state_topic), and what a config from
#: streampipe always carries besides (see streampipe.homeassistant).
KEYS = {
    "state_topic", "name", "unique_id", "default_entity_id", "value_template", "availability",
    "device", "origin", "state_class", "qos",
}  # fmt: skip


def batches(device: str, start: int, n: int, size: int = 4) -> Iterator[bytes]:
    data = [
        Reading(device, i, 1000.0 + i, {"x": float(i % 7), "z": i / 3}, 2.0 * (i % 7) + 1)
        for i in range(start, start + n)
    ]
    for i in range(0, n, size):
        yield codec.encode(Batch.from_readings(data[i : i + size]))


@contextmanager
def edge(broker, topics, **flags) -> Iterator[EdgeService]:
    service = EdgeService(
        EdgeConfig(broker.url, STAGE, topic_root=topics.root, metrics_port=None, **flags)
    ).start()
    with running(service):
        yield service


def send(broker, topics, start: int, n: int) -> None:
    conn = Connection(broker.url, f"pub-{topics.root[-6:]}").connect()
    try:
        for device in DEVICES:
            for frame in batches(device, start, n):
                conn.publish(topics.readings(device), frame).wait_for_publish(10)
    finally:
        conn.close()


def newest(cap, topics, device: str) -> dict:
    """The newest prediction of ``device`` on its JSON predictions topic."""
    return cap.json(topics.predictions(device))[-1]["predictions"][-1]


def predicted(cap, topics) -> int:
    return sum(len(b["predictions"]) for b in cap.json(topics.predictions()))


def test_ha_discovery_announces_each_device_once_with_a_config_home_assistant_reads(
    broker, topics, capture
):
    prefix = f"{topics.root}-ha"  # not the shared broker's homeassistant/: one per test
    cap = capture([f"{prefix}/#", topics.predictions(), topics.last_value(), topics.status()])
    with edge(broker, topics, ha_discovery=True, ha_discovery_prefix=prefix):
        send(broker, topics, 0, 12)
        assert cap.wait(lambda: predicted(cap, topics) == 12 * len(DEVICES))
        assert cap.wait(lambda: len(cap.on(topics.last_value())) == 3 * len(DEVICES))
        configs = {m.topic: json.loads(m.payload) for m in cap.on(f"{prefix}/#")}
        assert len(cap.on(f"{prefix}/#")) == len(DEVICES)  # once per device
        status = cap.on(topics.status(STAGE))
        assert status and status[-1].payload == b"online"

    by_device = {c["device"]["name"]: (topic, c) for topic, c in configs.items()}
    assert set(by_device) == set(DEVICES)
    for device, (topic, cfg) in by_device.items():
        assert not KEYS - set(cfg), KEYS - set(cfg)
        level = topic.split("/")
        assert level[:3] == [prefix, "sensor", STAGE] and level[4] == "config"
        assert len(level) == 5  # the node id level is the stage's: its ACL names it
        assert all(c.isascii() and (c.isalnum() or c in "_-") for c in level[3]), level[3]
        assert level[3] == cfg["unique_id"]
        assert cfg["default_entity_id"] == "sensor." + cfg["unique_id"].lower().replace("-", "_")
        assert cfg["state_topic"] == topics.last_value(device)
        assert cfg["availability"] == [
            {"topic": topics.status(STAGE), "payload_available": "online",
             "payload_not_available": "offline"}
        ]  # fmt: skip
        assert cfg["device"]["model"] == "streampipe" and cfg["device"]["identifiers"]
        assert cfg["origin"]["name"] == "streampipe" and cfg["origin"]["sw_version"]
        assert cfg["state_class"] == "measurement"
        # Home Assistant renders value_template (Jinja2) with the state topic's payload
        # as `value`: the entity's state is the device's newest prediction.
        state = cap.on(cfg["state_topic"])[-1].payload.decode()
        rendered = jinja2.Template(cfg["value_template"]).render(value=state)
        assert float(rendered) == newest(cap, topics, device)["y_pred"]
    assert len({c["unique_id"] for _, c in by_device.values()}) == len(DEVICES)

    # A restart announces again (retained, so idempotent), with the same unique ids.
    again = capture([f"{prefix}/#"])
    assert again.wait(lambda: len(again.on(f"{prefix}/#")) == len(DEVICES), 10)  # retained
    with edge(broker, topics, ha_discovery=True, ha_discovery_prefix=prefix):
        send(broker, topics, 12, 4)
        assert again.wait(lambda: len(again.on(f"{prefix}/#")) == 2 * len(DEVICES))
    assert {m.topic: json.loads(m.payload) for m in again.on(f"{prefix}/#")} == configs
    assert all(m.retain for m in again.on(f"{prefix}/#")[: len(DEVICES)])


def test_last_value_is_retained_with_the_readings_ts_and_seq(broker, topics, capture):
    cap = capture([topics.predictions(), topics.last_value(), "homeassistant/#"])
    with edge(broker, topics, last_value=True):
        send(broker, topics, 0, 10)
        assert cap.wait(lambda: predicted(cap, topics) == 10 * len(DEVICES))
        assert cap.wait(lambda: len(cap.on(topics.last_value())) == 3 * len(DEVICES))
    assert not [m for m in cap.on("homeassistant/#") if topics.root in m.payload.decode()]

    late = capture([topics.last_value()])  # after the edge stopped: the retained values
    assert late.wait(lambda: len(late.on(topics.last_value())) == len(DEVICES), 10)
    for device in DEVICES:
        (msg,) = late.on(topics.last_value(device))
        assert msg.retain and msg.qos == 1
        want = newest(cap, topics, device)
        assert float(msg.payload) == want["y_pred"]
        assert msg.payload == json.dumps(want["y_pred"]).encode()  # plain, shortest repr
        props = dict(msg.properties.UserProperty)
        assert float(props["ts"]) == want["ts"] and int(props["seq"]) == want["seq"] == 9
        assert msg.properties.ContentType == "text/plain"


def test_without_the_flags_nothing_extra_is_published(broker, topics, capture):
    cap = capture([topics.predictions(), f"{topics.root}/predictions/+/last", "homeassistant/#"])
    with edge(broker, topics):
        send(broker, topics, 0, 8)
        assert cap.wait(lambda: predicted(cap, topics) == 8 * len(DEVICES))
    assert cap.on(topics.last_value()) == []
    assert not [m for m in cap.on("homeassistant/#") if topics.root in m.payload.decode()]


@pytest.mark.parametrize("flags", [{"last_value": True}, {"ha_discovery": True}])
def test_the_extra_outputs_leave_predictions_as_they_were(flags):
    from streampipe.homeassistant import Discovery

    plain = EdgeStage("e")
    extra = EdgeStage(
        "e",
        last_value=flags.get("last_value", False),
        ha_discovery=Discovery(plain.topics, "e") if "ha_discovery" in flags else None,
    )
    for frame in batches("d", 0, 40):
        got = extra.handle(extra.topics.readings("d"), frame)
        want = plain.handle(plain.topics.readings("d"), frame)
        assert [m for m in got if not m.retain] == want  # the extras are all retained
        assert got[-1].topic == extra.topics.last_value("d")  # after the predictions


def test_the_demo_watcher_ignores_plain_last_values():
    lines = []
    watcher = _Watcher(SimpleNamespace(write=lines.append, flush=lambda: None))
    watcher.on_message(SimpleNamespace(topic="streampipe/predictions/d/last", payload=b"512.3"))
    assert watcher.predictions == 0 and lines == []
