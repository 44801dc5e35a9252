"""The mapping file and the one-flag form: templates, and one-line start-up errors."""

from __future__ import annotations

import pytest

from streampipe.ingest.base import Incoming, Source
from streampipe.ingest.mapping import MappingError, build_source, load_mapping, load_mapping_text
from streampipe.ingest.topic import TemplateError, TopicTemplate, topic_matches

GOOD = """
[[source]]
name = "tasmota"
topic = "tele/{device}/SENSOR"
device = "tasmota.{device}"
target = "$.ENERGY.Power"
"""


@pytest.mark.parametrize(
    ("template", "topic", "names"),
    [
        ("zigbee2mqtt/{device}", "zigbee2mqtt/kitchen", {"device": "kitchen"}),
        ("zigbee2mqtt/{device}", "zigbee2mqtt/kitchen/set", None),
        ("{node}/sensor/{field}/state", "n1/sensor/t/state", {"node": "n1", "field": "t"}),
        ("shellies/+/{device}", "shellies/x/y", {"device": "y"}),
        ("z/{rest:#}", "z/a/b/c", {"rest": "a/b/c"}),
        ("z/#", "z", {}),
        ("{device}/events/rpc", "$SYS/events/rpc", None),  # wildcards never match $ topics
    ],
)
def test_templates_match_like_mqtt_filters(template, topic, names):
    assert TopicTemplate(template).match(topic) == names


def test_template_filter_and_exclude():
    t = TopicTemplate("zigbee2mqtt/{device:#}", exclude=["zigbee2mqtt/bridge/#", "+/+/set"])
    assert t.filter == "zigbee2mqtt/#"
    assert t.match("zigbee2mqtt/bridge/devices") is None
    assert t.match("zigbee2mqtt/lamp/set") is None
    assert t.match("zigbee2mqtt/kitchen/lamp") == {"device": "kitchen/lamp"}
    assert topic_matches("a/+/c", "a/b/c") and not topic_matches("a/+", "a/b/c")


@pytest.mark.parametrize(
    "template",
    ["", "a/{x:#}/b", "a/#/b", "a/x{device}", "a/{d}/{d}", "a/b+"],
)
def test_bad_templates_are_refused(template):
    with pytest.raises(TemplateError):
        TopicTemplate(template)


def test_load_mapping_reads_a_file(tmp_path):
    path = tmp_path / "ingest.toml"
    path.write_text(GOOD)
    (src,) = load_mapping(path)
    assert isinstance(src, Source) and src.name == "tasmota"
    assert src.filters() == ["tele/+/SENSOR"]
    (m,) = src.map(Incoming("tele/plug/SENSOR", b'{"ENERGY":{"Power":5,"Voltage":230}}'))
    assert (m.device, m.x, m.y) == ("tasmota.plug", {"ENERGY.Voltage": 230.0}, 5.0)


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(MappingError, match=r"^.*nope\.toml: cannot read it"):
        load_mapping(tmp_path / "nope.toml")


def _error(text: str) -> str:
    with pytest.raises(MappingError) as e:
        load_mapping_text(text, "ingest.toml")
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ('target = "$.ENERGY.Power"', 'timestamp = { path = "$.Time", format = "epoch" }'),
            "ingest.toml: source 'tasmota': timestamp.format must be one of unix, unix_ms, "
            "iso8601, not 'epoch'",
        ),
        (
            ('target = "$.ENERGY.Power"', 'targt = "$.ENERGY.Power"'),
            "ingest.toml: source 'tasmota': unknown key targt (expected one of ",
        ),
        (
            ('target = "$.ENERGY.Power"', 'target = "ENERGY.Power"'),
            "ingest.toml: source 'tasmota': target is not a JSONPath (RFC 9535): 'ENERGY.Power'",
        ),
        (
            ('device = "tasmota.{device}"', 'device = "tasmota.{node}"'),
            "ingest.toml: source 'tasmota': device uses {node}, which topic "
            "'tele/{device}/SENSOR' does not name",
        ),
        (
            ('topic = "tele/{device}/SENSOR"', 'topic = "tele/{device:#}/SENSOR"'),
            "ingest.toml: source 'tasmota': topic 'tele/{device:#}/SENSOR': {device:#} must be "
            "the last level",
        ),
        (
            ('target = "$.ENERGY.Power"', 'format = "csv"'),
            "ingest.toml: source 'tasmota': "
            "format must be one of json, value, sparkplug, not 'csv'",
        ),
        (
            ('target = "$.ENERGY.Power"', 'merge = "first"'),
            "ingest.toml: source 'tasmota': merge must be one of none, last, not 'first'",
        ),
        (
            (
                'target = "$.ENERGY.Power"',
                'timestamp = { path = "$.Time", format = "iso8601", timezone = "Mars/Olympus" }',
            ),
            "ingest.toml: source 'tasmota': timestamp.timezone must be an IANA time zone",
        ),
        (
            ('target = "$.ENERGY.Power"', 'match = { path = "$.method" }'),
            "ingest.toml: source 'tasmota': match.equals is missing",
        ),
        (
            ('target = "$.ENERGY.Power"', 'counter = { path = "$.f_cnt", modulo = 1 }'),
            "ingest.toml: source 'tasmota': counter.modulo must be an integer",
        ),
        (
            ('target = "$.ENERGY.Power"', 'features = { state = { path = "$.s", map = "on" } }'),
            "ingest.toml: source 'tasmota': features.state.map must be a table",
        ),
        (
            ('target = "$.ENERGY.Power"', 'features = { v = { path = "$.v", type = "int" } }'),
            "ingest.toml: source 'tasmota': features.v.type must be one of float, not 'int'",
        ),
        (
            ('name = "tasmota"\n', ""),
            "ingest.toml: source #1: name must be a non-empty string (missing)",
        ),
    ],
)
def test_mistakes_are_one_line_naming_source_key_and_expectation(change, expected):
    old, new = change
    assert old in GOOD
    assert _error(GOOD.replace(old, new, 1)).startswith(expected)


def test_file_level_mistakes():
    assert _error("") == "ingest.toml: no [[source]] (at least one is needed)"
    assert _error("[[sources]]\nname='x'").startswith("ingest.toml: unknown key 'sources'")
    assert _error("[[source]\n").startswith("ingest.toml: not TOML (")
    assert _error(GOOD + GOOD) == (
        "ingest.toml: source 'tasmota': name is used by an earlier source"
    )


def test_value_format_mistakes():
    value = GOOD.replace('target = "$.ENERGY.Power"', 'format = "value"\ntarget = "power"')
    assert _error(value) == (
        "ingest.toml: source 'tasmota': topic 'tele/{device}/SENSOR' needs a {field} level "
        'for format = "value"'
    )
    value = value.replace("tele/{device}/SENSOR", "tele/{device}/{field}")
    assert load_mapping_text(value)[0].filters() == ["tele/+/+"]
    assert _error(value + "emit_after = 90\n") == (
        "ingest.toml: source 'tasmota': emit_after (90) must not exceed max_wait (60)"
    )
    assert _error(value + "timestamp = '$.t'\n").startswith(
        "ingest.toml: source 'tasmota': unknown key timestamp"
    )


def test_build_source_one_flag_form():
    src = build_source(
        topic="zigbee2mqtt/{device}",
        target="$.power",
        exclude=["zigbee2mqtt/bridge/#"],
        features=["$.voltage", "amps=$.current"],
    )
    assert src.claims("zigbee2mqtt/plug") and not src.claims("zigbee2mqtt/bridge/info")
    (m,) = src.map(Incoming("zigbee2mqtt/plug", b'{"power":3,"voltage":230,"current":0.1}'))
    assert (m.device, m.x, m.y) == ("plug", {"voltage": 230.0, "amps": 0.1}, 3.0)
    assert (
        build_source("z2m/{device}", device="z2m.{device}")
        .map(Incoming("z2m/a", b'{"t":1}'))[0]
        .device
        == "z2m.a"
    )


def test_build_source_mistakes_are_one_line():
    with pytest.raises(MappingError, match=r"^ingest: device is needed: topic 'tele/\+/x'"):
        build_source("tele/+/x")
    with pytest.raises(MappingError, match=r"^ingest: feature '\$\.a\[0\]' needs a name"):
        build_source("z/{device}", features=["$.a[0]"])
    with pytest.raises(MappingError, match=r"^ingest: target is not a JSONPath"):
        build_source("z/{device}", target="$..[")
