"""Foreign payloads, as each format's documentation shows them, mapped to readings.

Sources of the fixtures in tests/payloads/ (README.md there says the same):

* Zigbee2MQTT: https://www.zigbee2mqtt.io/guide/usage/mqtt_topics_and_messages.html
* Tasmota: https://tasmota.github.io/docs/Teleinfo/ (single phase), and
  https://github.com/NicolasBernaerts/tasmota teleinfo/README.md (three phases, arrays)
* Shelly Gen2: https://shelly-api-docs.shelly.cloud/gen2/General/Notifications
* OwnTracks: https://github.com/owntracks/android (androidTest ``locationResponse``),
  fields per https://owntracks.org/booklet/tech/json/
* The Things Stack: https://www.thethingsindustries.com/docs/integrations/data-formats/
* ESPHome: https://esphome.io/components/mqtt.html (state topics)
* Home Assistant: https://www.home-assistant.io/integrations/mqtt_statestream/
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from streampipe.ingest.base import Incoming, Source, Unmappable
from streampipe.ingest.mapping import build_source, load_mapping_text

PAYLOADS = Path(__file__).parent / "payloads"


def payload(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


def lines(name: str) -> list[tuple[str, bytes]]:
    out = []
    for line in (PAYLOADS / name).read_text().splitlines():
        topic, _, value = line.partition(" ")
        out.append((topic, value.encode()))
    return out


def one(text: str) -> Source:
    (source,) = load_mapping_text(text, "ingest.toml")
    return source


def reason(source: Source, message: Incoming) -> str:
    with pytest.raises(Unmappable) as e:
        source.map(message)
    return e.value.reason


# --- Zigbee2MQTT ---------------------------------------------------------------------


def test_zigbee2mqtt_every_numeric_field_by_default():
    src = build_source("zigbee2mqtt/{device}", target="$.temperature", device="z2m.{device}")
    (m,) = src.map(Incoming("zigbee2mqtt/0x00158d0001", payload("z2m_wsdcgq01lm.json")))
    assert (m.device, m.x, m.y, m.ts) == ("z2m.0x00158d0001", {"humidity": 44.72}, 27.34, None)


def test_zigbee2mqtt_text_only_when_mapped_and_bridge_excluded():
    src = one("""
[[source]]
name = "z2m"
topic = "zigbee2mqtt/{device}"
exclude = ["zigbee2mqtt/bridge/#"]
device = "z2m.{device}"
target = "$.brightness"
[source.features]
state = { path = "$.state", map = { ON = 1, OFF = 0 } }
color_temp = "$.color_temp"
""")
    (m,) = src.map(Incoming("zigbee2mqtt/bulb", payload("z2m_led1545g12.json")))
    assert (m.x, m.y) == ({"state": 1.0, "color_temp": 325.0}, 215.0)
    assert not src.claims("zigbee2mqtt/bridge/state")
    assert src.filters() == ["zigbee2mqtt/+"]


def test_zigbee2mqtt_auto_features_leave_text_out():
    src = build_source("zigbee2mqtt/{device}")
    (m,) = src.map(Incoming("zigbee2mqtt/bulb", payload("z2m_led1545g12.json")))
    assert m.x == {"brightness": 215.0, "color_temp": 325.0} and m.y is None


# --- Tasmota -------------------------------------------------------------------------

TASMOTA = """
[[source]]
name = "tasmota"
topic = "tele/{prefix}/SENSOR"
device = "tasmota.{prefix}"
target = "$.ENERGY.Power"
timestamp = { path = "$.Time", format = "iso8601", timezone = "Europe/Paris" }
[source.features]
current = "$.ENERGY.Current"
today = "$.ENERGY.Today"
"""


def test_tasmota_local_time_uses_the_source_timezone():
    src = one(TASMOTA)
    (m,) = src.map(Incoming("tele/denky_D6C0C0/SENSOR", payload("tasmota_teleinfo_sensor.json")))
    local = datetime(2021, 10, 26, 17, 28, 45, tzinfo=ZoneInfo("Europe/Paris"))
    assert m.ts == local.timestamp() == datetime(2021, 10, 26, 15, 28, 45, tzinfo=UTC).timestamp()
    assert (m.device, m.y, m.x) == (
        "tasmota.denky_D6C0C0",
        170.0,
        {"current": 1.0, "today": 2275.56},
    )


def test_tasmota_three_phases_arrays_become_indexed_features():
    src = one(
        TASMOTA.replace("tele/{prefix}/SENSOR", "compteur/tele/SENSOR")
        .replace('device = "tasmota.{prefix}"', 'device = "tasmota.compteur"')
        .replace("$.ENERGY.Power", "$.ENERGY.Total")
        + 'power = "$.ENERGY.Power"\n'
    )
    (m,) = src.map(Incoming("compteur/tele/SENSOR", payload("tasmota_three_phase.json")))
    assert m.y == 5321.567
    assert m.x == {
        "current_0": 2.13, "current_1": 0.0, "current_2": 0.0,
        "power_0": 490.0, "power_1": 0.0, "power_2": 0.0,
        "today": 3775.768,
    }  # fmt: skip


def test_tasmota_wildcard_takes_every_numeric_field_under_a_path():
    src = one("""
[[source]]
name = "tasmota"
topic = "tele/{device}/SENSOR"
target = "$.ENERGY.Power"
[source.features]
"*" = "$.ENERGY"
""")
    (m,) = src.map(Incoming("tele/plug/SENSOR", payload("tasmota_teleinfo_sensor.json")))
    assert m.y == 170.0
    assert m.x == {
        "Total": 9098.245, "Yesterday": 6822.685, "Today": 2275.56,
        "Period": 9.0, "Current": 1.0, "Load": 6.0,
    }  # fmt: skip  # Power is the target; TotalStartTime is text


# --- Shelly Gen2 ---------------------------------------------------------------------

SHELLY = """
[[source]]
name = "shelly"
topic = "{device}/events/rpc"
device = "shelly.{device}"
target = '$.params["switch:0"].apower'
timestamp = { path = "$.params.ts", format = "unix" }
match = { path = "$.method", equals = "NotifyStatus" }
merge = "last"
[source.features]
output = '$.params["switch:0"].output'
voltage = '$.params["switch:0"].voltage'
"""


def test_shelly_partial_updates_merge_and_other_methods_are_ignored():
    src = one(SHELLY)
    topic = "shellypro4pm-f008d1d8b8b8/events/rpc"
    (m,) = src.map(Incoming(topic, payload("shelly_notify_switch.json")))
    assert (m.device, m.x, m.y, m.ts) == (
        "shelly.shellypro4pm-f008d1d8b8b8",
        {"output": 1.0},
        None,
        1631186545.04,
    )
    update = (
        b'{"method":"NotifyStatus","params":{"ts":1631186546.0,'
        b'"switch:0":{"apower":8.5,"voltage":230.2}}}'
    )
    (m,) = src.map(Incoming(topic, update))
    assert (m.x, m.y) == ({"output": 1.0, "voltage": 230.2}, 8.5)  # output kept from before
    # A NotifyStatus touching none of the mapped fields, and a NotifyEvent: no reading,
    # no dead letter; counted.
    assert src.map(Incoming(topic, payload("shelly_notify_cloud.json"))) == []
    assert src.map(Incoming(topic, b'{"method":"NotifyEvent","params":{"ts":1}}')) == []
    assert src.counts == {"not_matched": 1, "nothing_new": 1}


def test_shelly_merged_values_survive_a_restart():
    src = one(SHELLY)
    topic = "shellyplus1pm-1/events/rpc"
    src.map(Incoming(topic, payload("shelly_notify_switch.json")))
    again = one(SHELLY)
    again.restore(src.state())
    update = b'{"method":"NotifyStatus","params":{"ts":2,"switch:0":{"apower":3}}}'
    (m,) = again.map(Incoming(topic, update))
    assert (m.x, m.y) == ({"output": 1.0}, 3.0)


# --- OwnTracks -----------------------------------------------------------------------


def test_owntracks_location():
    src = one("""
[[source]]
name = "owntracks"
topic = "owntracks/{user}/{phone}"
device = "owntracks.{user}.{phone}"
target = "$.batt"
timestamp = { path = "$.tst", format = "unix" }
match = { path = "$._type", equals = "location" }
[source.features]
lat = "$.lat"
lon = "$.lon"
acc = "$.acc"
vel = "$.vel"
""")
    (m,) = src.map(Incoming("owntracks/jane/pixel", payload("owntracks_location.json")))
    assert (m.device, m.y, m.ts) == ("owntracks.jane.pixel", 100.0, 1610799026.0)
    assert m.x == {"lat": 51.2, "lon": -4.0, "acc": 20.0, "vel": 7.0}
    assert src.map(Incoming("owntracks/jane/pixel", b'{"_type":"lwt","tst":1}')) == []


# --- The Things Stack ----------------------------------------------------------------

TTS = """
[[source]]
name = "ttn"
topic = "v3/{app}/devices/{device}/up"
device = "ttn.{app}.{device}"
target = "$.uplink_message.decoded_payload.temperature"
timestamp = { path = "$.received_at", format = "iso8601" }
counter = "$.uplink_message.f_cnt"
[source.features]
"*" = "$.uplink_message.decoded_payload"
rssi = "$.uplink_message.rx_metadata[0].rssi"
"""


def test_the_things_stack_uplink_with_frame_counter():
    src = one(TTS)
    (m,) = src.map(Incoming("v3/app1@ttn/devices/dev1/up", payload("tts_uplink.json")))
    assert m.device == "ttn.app1@ttn.dev1"
    assert (m.x, m.y) == ({"luminosity": 0.64, "rssi": -35.0}, 1.0)
    assert (m.counter, m.counter_modulo) == (1, 2**32)
    assert m.ts == pytest.approx(datetime(2020, 2, 12, 15, 15, 46, 14773, tzinfo=UTC).timestamp())


def test_the_things_stack_counter_wraps_at_32_bits():
    src = one(TTS)
    doc = payload("tts_uplink.json").replace(b'"f_cnt" : 1,', b'"f_cnt" : 4294967297,')
    (m,) = src.map(Incoming("v3/app1/devices/dev1/up", doc))
    assert m.counter == 1


# --- ESPHome and Home Assistant (one value per topic) --------------------------------

ESPHOME = """
[[source]]
name = "esphome"
format = "value"
topic = "{device}/+/{field}/state"
device = "esphome.{device}"
target = "power"
max_wait = 30
[source.features]
voltage = "voltage"
current = "current"
motion = { field = "motion", map = { ON = 1, OFF = 0 } }
"""


def test_esphome_values_assemble_into_one_reading_when_the_target_arrives():
    src = one(ESPHOME)
    out = []
    for i, (topic, value) in enumerate(lines("esphome_states.txt")):
        out += src.map(Incoming(topic, value, arrived=100.0 + i))
    (m,) = out
    assert (m.device, m.y, m.ts) == ("esphome.livingroom", 11.9, 103.0)
    assert m.x == {"voltage": 230.4, "current": 0.052, "motion": 1.0}


def test_esphome_partial_reading_is_emitted_without_target_after_max_wait_and_restored():
    src = one(ESPHOME)
    src.map(Incoming("livingroom/sensor/voltage/state", b"230.4", arrived=100.0))
    again = one(ESPHOME)
    again.restore(src.state())  # a restart keeps what was waiting
    assert again.due(129.0) == []
    (m,) = again.due(130.0)
    assert (m.device, m.x, m.y, m.ts) == ("esphome.livingroom", {"voltage": 230.4}, None, 100.0)
    assert again.counts["partial"] == 1 and again.due(1000.0) == []


def test_home_assistant_statestream_json_encoded_values():
    src = one("""
[[source]]
name = "ha"
format = "value"
topic = "homeassistant/{domain}/{device}/{field}"
exclude = ["homeassistant/+/+/last_changed", "homeassistant/+/+/last_updated"]
device = "ha.{domain}.{device}"
target = "brightness"
[source.features]
on = { field = "state", map = { on = 1, off = 0 } }
""")
    out = []
    for topic, value in lines("ha_statestream.txt"):
        if src.claims(topic):
            out += src.map(Incoming(topic, value, arrived=5.0))
    (m,) = out
    assert (m.device, m.x, m.y) == ("ha.light.master_bedroom_dimmer", {"on": 1.0}, 128.0)


def test_value_text_on_an_unmapped_field_is_counted_not_a_dead_letter():
    src = one("""
[[source]]
name = "ha"
format = "value"
topic = "homeassistant/sensor/{device}/{field}"
target = "state"
emit_after = 5
""")
    assert src.map(Incoming("homeassistant/sensor/t/unit_of_measurement", b'"\\u00b0C"')) == []
    assert src.counts["text"] == 1
    assert reason(src, Incoming("homeassistant/sensor/t/state", b'"unavailable"')) == "not_numeric"


def test_value_emit_after_without_a_target():
    src = one("""
[[source]]
name = "esphome"
format = "value"
topic = "{device}/sensor/{field}/state"
emit_after = 2
""")
    src.map(Incoming("node/sensor/a/state", b"1", arrived=10.0))
    src.map(Incoming("node/sensor/b/state", b"2", arrived=11.0))
    assert src.due(11.9) == []
    (m,) = src.due(12.0)
    assert (m.device, m.x, m.y) == ("node", {"a": 1.0, "b": 2.0}, None)
    assert src.counts["partial"] == 0  # no target was expected: not a partial reading


# --- dead letters --------------------------------------------------------------------


def test_every_dead_letter_reason():
    src = one(TTS)
    up = "v3/app1/devices/dev1/up"
    assert reason(src, Incoming(up, b"\x00not json")) == "not_json"
    assert reason(src, Incoming(up, b'{"received_at":"2020-02-12T15:15:46Z"}')) == "path_missing"
    bad_target = (
        b'{"received_at":"2020-02-12T15:15:46Z",'
        b'"uplink_message":{"decoded_payload":{"temperature":"warm"}}}'
    )
    assert reason(src, Incoming(up, bad_target)) == "not_numeric"
    assert reason(src, Incoming(up, b'{"received_at":"yesterday"}')) == "bad_timestamp"
    assert reason(src, Incoming(up, b'{"uplink_message":{}}')) == "bad_timestamp"  # no time
    rest = build_source("tele/{device:#}")  # the rest of a topic has '/' in it
    assert reason(rest, Incoming("tele/a/b", b'{"v":1}')) == "invalid_device"
    assert reason(build_source("z/{device}"), Incoming("z/$x", b"{}")) == "invalid_device"
    z2m = build_source("zigbee2mqtt/{device}", features=["state=$.state"])
    assert reason(z2m, Incoming("zigbee2mqtt/x", b'{"state":"ON"}')) == "not_numeric"
    assert reason(z2m, Incoming("other/x", b"{}")) == "no_rule"  # the gateway's, normally
    esphome = one(ESPHOME)
    assert reason(esphome, Incoming("n/sensor/power/state", b"NaN?")) == "not_numeric"
    assert reason(esphome, Incoming("n/sensor/motion/state", b"MAYBE")) == "not_numeric"


def test_iso8601_without_offset_and_without_timezone_is_a_bad_timestamp():
    src = one("""
[[source]]
name = "tasmota"
topic = "tele/{device}/SENSOR"
target = "$.ENERGY.Power"
timestamp = { path = "$.Time", format = "iso8601" }
""")
    msg = Incoming("tele/plug/SENSOR", payload("tasmota_teleinfo_sensor.json"))
    assert reason(src, msg) == "bad_timestamp"


def test_unix_ms_timestamps():
    src = build_source("a/{device}", target="$.v")
    assert src.map(Incoming("a/d", b'{"v":1}'))[0].ts is None  # arrival
    ms = one("""
[[source]]
name = "ms"
topic = "a/{device}"
target = "$.v"
timestamp = { path = "$.t", format = "unix_ms" }
""")
    assert ms.map(Incoming("a/d", b'{"v":1,"t":1700000000123}'))[0].ts == 1700000000.123
