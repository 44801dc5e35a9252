"""Sparkplug B source: real payloads built with the protobuf runtime.

Payloads follow Eclipse Tahu's Python examples (``python/core/sparkplug_b.py``:
``getNodeBirthPayload`` puts ``bdSeq`` and ``Node Control/Rebirth = false`` in the
NBIRTH with seq 0, ``addMetric(payload, name, alias, type, value)`` names and aliases
metrics in a BIRTH; ``python/examples/example.py`` sends DDATA by alias only) and the
Sparkplug 3.0 specification (eclipse-sparkplug/sparkplug, chapter 6 Payloads and 5
Operational Behavior): tck-id-payloads-alias-uniqueness (an alias is unique across the
edge node), tck-id-payloads-alias-data-cmd-requirement (DATA carries only the alias),
tck-id-payloads-sequence-num-zero-nbirth / -incrementing (seq 0 in NBIRTH, then +1 per
message of the node, 255 wraps to 0), tck-id-payloads-ndeath-seq (NDEATH has no seq),
tck-id-operational-behavior-host-reordering-rebirth and section "Host Application"
(an NCMD ``Node Control/Rebirth`` on a seq gap, or a DATA before its BIRTH).
"""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streampipe.ingest import Incoming, Source, Unmappable
from streampipe.ingest._sparkplug_proto import DataType, Payload
from streampipe.ingest.sparkplug import (
    SparkplugSource,
    encode_birth,
    encode_data,
    encode_death,
    topic,
)

G, N = "plant", "line1"
ALIASES = {"Power": 10, "Volts": 11, "Amps": 12, "Label": 13}


def nbirth(seq: int = 0, bdseq: int = 0, **values: float) -> Incoming:
    return Incoming(topic(G, "NBIRTH", N), encode_birth(values, seq=seq, bdseq=bdseq, ts=100.0))


def dbirth(seq: int = 1, device: str = "meter", aliases=ALIASES, **values: float) -> Incoming:
    values = values or {"Power": 50.0, "Volts": 230.0, "Amps": 0.2}
    payload = encode_birth(values, seq=seq, aliases=aliases, ts=101.0)
    return Incoming(topic(G, "DBIRTH", N, device), payload)


def ddata(
    seq: int, device: str = "meter", ts: float = 102.0, aliases=ALIASES, **values: float
) -> Incoming:
    payload = encode_data(values, seq=seq, aliases=aliases, ts=ts)
    return Incoming(topic(G, "DDATA", N, device), payload, arrived=ts)


def reason(source: SparkplugSource, message: Incoming) -> str:
    with pytest.raises(Unmappable) as e:
        source.map(message)
    return e.value.reason


@pytest.fixture
def src() -> SparkplugSource:
    return SparkplugSource(target="Power")


def born(source: SparkplugSource) -> SparkplugSource:
    assert source.map(nbirth()) == []  # the node's only metrics are controls
    [m] = source.map(dbirth())
    assert m.new_epoch and m.meta["type"] == "DBIRTH"
    return source


def test_is_a_source_with_specific_filters(src):
    assert isinstance(src, Source)
    assert "spBv1.0/+/DDATA/+/+" in src.filters() and "spBv1.0/+/NBIRTH/+" in src.filters()
    assert not any("CMD" in f for f in src.filters())  # never our own rebirth requests
    assert SparkplugSource(group="plant").filters()[0] == "spBv1.0/plant/NBIRTH/+"
    assert src.claims("spBv1.0/x/DDATA/n/d") and not src.claims("zigbee2mqtt/x")
    assert not SparkplugSource(group="plant").claims("spBv1.0/other/DDATA/n/d")


def test_birth_then_data_by_alias_only_gives_named_readings_merged_with_last(src):
    born(src)
    [m] = src.map(ddata(2, Volts=231.0))  # report by exception: only Volts changed
    assert m.device == "plant.line1.meter"
    assert m.x == {"Volts": 231.0, "Amps": 0.2} and m.y == 50.0
    assert m.ts == 102.0 and not m.new_epoch and m.counter is None
    assert m.meta == {"type": "DDATA", "seq": 2}
    [m] = src.map(ddata(3, Power=55.0, ts=103.0))
    assert m.x == {"Volts": 231.0, "Amps": 0.2} and m.y == 55.0 and m.ts == 103.0


def test_metric_timestamp_wins_over_payload_timestamp(src):
    born(src)
    p = Payload(timestamp=200_000, seq=2)
    p.metrics.add(alias=11, timestamp=199_500, double_value=229.0)
    [m] = src.map(Incoming(topic(G, "DDATA", N, "meter"), p.SerializeToString()))
    assert m.ts == 199.5


def test_data_before_birth_is_unknown_alias(src):
    assert reason(src, ddata(5, Volts=1.0)) == "unknown_alias"  # no NBIRTH
    src.map(nbirth())
    assert reason(src, ddata(1, Volts=1.0)) == "unknown_alias"  # no DBIRTH


def test_alias_not_in_birth_or_of_another_device_is_unknown(src):
    born(src)
    assert reason(src, ddata(2, Label=1.0)) == "unknown_alias"
    src.map(dbirth(3, device="other", Label=1.0))
    assert reason(src, ddata(4, Label=2.0)) == "unknown_alias"  # Label's alias is other's


def test_nbirth_clears_aliases_and_starts_a_new_epoch(src):
    born(src)
    src.map(ddata(2, Volts=231.0))
    assert src.map(nbirth(seq=0, bdseq=1)) == []
    assert reason(src, ddata(1, Volts=232.0)) == "unknown_alias"
    [m] = src.map(dbirth(seq=2))
    assert m.new_epoch and m.x["Volts"] == 230.0  # the last value before is gone


def test_ndeath_clears_the_node_only_for_its_own_bdseq(src):
    born(src)
    late_will = Incoming(topic(G, "NDEATH", N), encode_death(bdseq=7))
    assert src.map(late_will) == []  # an earlier session's will: ignored
    assert src.map(ddata(2, Volts=1.0))
    assert src.map(Incoming(topic(G, "NDEATH", N), encode_death(bdseq=0))) == []
    assert reason(src, ddata(3, Volts=1.0)) == "unknown_alias"


def test_ddeath_forgets_the_device_and_gives_no_reading(src):
    born(src)
    death = Incoming(topic(G, "DDEATH", N, "meter"), encode_data({}, seq=2, aliases={}))
    assert src.map(death) == []
    assert reason(src, ddata(3, Volts=1.0)) == "unknown_alias"  # until its next DBIRTH
    [m] = src.map(dbirth(seq=4))
    assert m.new_epoch


def test_seq_gap_duplicate_and_wrap(src):
    born(src)
    assert "seq_gap" not in src.map(ddata(2, Volts=1.0))[0].meta
    [m] = src.map(ddata(5, Volts=2.0))  # 3 and 4 lost (of any device of the node)
    assert m.meta["seq_gap"] == 2 and not m.new_epoch
    assert reason(src, ddata(5, Volts=3.0)) == "duplicate"
    for seq in [*range(6, 256), 0, 1]:  # 255 wraps to 0: no gap
        assert "seq_gap" not in src.map(ddata(seq, Volts=float(seq)))[0].meta
    # a reset to 0 without an NBIRTH is a gap, not a new epoch
    [m] = src.map(ddata(0, Volts=9.0))
    assert m.meta["seq_gap"] == 254 and not m.new_epoch


def test_node_seq_is_shared_by_its_devices(src):
    born(src)
    pump = {"Power": 20, "Volts": 21, "Amps": 22}  # aliases are unique across the node
    src.map(dbirth(2, device="pump", aliases=pump))
    a = src.map(ddata(3, device="meter", Volts=1.0))[0]
    b = src.map(ddata(4, device="pump", aliases=pump, Volts=2.0))[0]
    assert (a.x["Volts"], b.x["Volts"]) == (1.0, 2.0)
    assert reason(src, dbirth(5, device="valve")) == "malformed"  # reuses meter's aliases
    assert src.map(ddata(6, Volts=3.0))[0].x["Volts"] == 3.0  # the bad DBIRTH changed nothing
    assert "seq_gap" not in a.meta and "seq_gap" not in b.meta
    assert (a.device, b.device) == ("plant.line1.meter", "plant.line1.pump")


def test_not_protobuf_is_malformed(src):
    assert reason(src, Incoming(topic(G, "NBIRTH", N), b'{"Power": 1}')) == "malformed"


@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_unmappable(data):
    src = SparkplugSource(target="Power")
    for kind in ("NBIRTH", "DBIRTH", "DDATA", "NDEATH"):
        t = topic(G, kind, N, "meter" if kind[0] == "D" else None)
        with contextlib.suppress(Unmappable):
            src.map(Incoming(t, data))


def test_types_signed_boolean_and_non_numeric(src):
    src.map(nbirth())
    p = Payload(timestamp=1000, seq=1)
    p.metrics.add(name="Power", alias=1, datatype=DataType["Float"], float_value=1.5)
    p.metrics.add(name="t8", alias=2, datatype=DataType["Int8"], int_value=0xFF)
    p.metrics.add(name="t32", alias=3, datatype=DataType["Int32"], int_value=0xFFFFFFFE)
    p.metrics.add(name="t64", alias=4, datatype=DataType["Int64"], long_value=2**64 - 3)
    p.metrics.add(name="u16", alias=5, datatype=DataType["UInt16"], int_value=65535)
    p.metrics.add(name="on", alias=6, datatype=DataType["Boolean"], boolean_value=True)
    p.metrics.add(name="txt", alias=7, datatype=DataType["String"], string_value="x")
    p.metrics.add(name="gone", alias=8, datatype=DataType["Double"], is_null=True)
    [m] = src.map(Incoming(topic(G, "DBIRTH", N, "d"), p.SerializeToString()))
    assert m.y == 1.5
    assert m.x == {"t8": -1.0, "t32": -2.0, "t64": -3.0, "u16": 65535.0, "on": 1.0}


def test_features_list_and_device_templates():
    src = SparkplugSource(target="Power", features=["Amps"], device="{node}-{device}")
    src.map(nbirth())
    [m] = src.map(dbirth())
    assert m.device == "line1-meter" and m.x == {"Amps": 0.2}
    with pytest.raises(ValueError, match="only"):
        SparkplugSource(device="{site}.{device}")
    bad = SparkplugSource(device="{device}$")
    bad.map(nbirth())
    assert reason(bad, dbirth(device="$sys")) == "invalid_device"


def test_node_metrics_are_a_device_of_their_own():
    src = SparkplugSource(target="Power")
    [m] = src.map(nbirth(Temp=40.0))
    assert m.device == "plant.line1" and m.x == {"Temp": 40.0} and m.y is None
    assert "bdSeq" not in m.x and m.new_epoch
    p = Payload(timestamp=1000, seq=1)
    p.metrics.add(alias=1, double_value=41.0)  # encode_birth's default alias for Temp
    [m] = src.map(Incoming(topic(G, "NDATA", N), p.SerializeToString()))
    assert m.x == {"Temp": 41.0} and not m.new_epoch
    assert SparkplugSource(node_device="").map(nbirth(Temp=40.0)) == []


def test_repeated_metric_in_one_message_is_two_readings(src):
    born(src)
    p = Payload(timestamp=5000, seq=2)
    p.metrics.add(alias=10, timestamp=4000, double_value=1.0)
    p.metrics.add(alias=10, timestamp=4500, double_value=2.0)
    ms = src.map(Incoming(topic(G, "DDATA", N, "meter"), p.SerializeToString()))
    assert [(m.y, m.ts) for m in ms] == [(1.0, 4.0), (2.0, 4.5)]


def test_state_round_trips_through_msgpack(src):
    born(src)
    src.map(ddata(2, Volts=231.0))
    state = msgpack.unpackb(msgpack.packb(src.state()), strict_map_key=False)
    again = SparkplugSource(target="Power")
    again.restore(state)
    assert again.state() == src.state()
    [m] = again.map(ddata(3, Amps=0.3))  # aliases, last values and seq survived
    assert m.x == {"Volts": 231.0, "Amps": 0.3} and m.y == 50.0 and "seq_gap" not in m.meta
    assert reason(again, ddata(3, Amps=0.4)) == "duplicate"


def test_rebirth_command_once_per_node_when_enabled():
    src = SparkplugSource(target="Power", rebirth=True, rebirth_interval=30.0)
    for arrived in (1000.0, 1001.0, 1029.0):
        message = ddata(5, Volts=1.0, ts=arrived)
        assert reason(src, message) == "unknown_alias"
    [(t, payload)] = src.commands()
    assert t == "spBv1.0/plant/NCMD/line1"
    [metric] = Payload.FromString(payload).metrics
    assert (metric.name, metric.datatype, metric.boolean_value) == (
        "Node Control/Rebirth",
        DataType["Boolean"],
        True,
    )
    assert src.commands() == []  # handed over once
    reason(src, ddata(6, Volts=1.0, ts=1031.0))  # the interval has passed: ask again
    assert len(src.commands()) == 1


def test_rebirth_on_seq_gap_and_never_when_disabled():
    on = born(SparkplugSource(target="Power", rebirth=True))
    on.map(ddata(4, Volts=1.0))
    assert [t for t, _ in on.commands()] == ["spBv1.0/plant/NCMD/line1"]
    off = SparkplugSource(target="Power")
    reason(off, ddata(5, Volts=1.0))
    born(off).map(ddata(9, Volts=1.0))
    assert off.commands() == []


def test_state_topics_and_commands_are_not_readings(src):
    assert src.claims("spBv1.0/STATE/scada")
    assert src.map(Incoming("spBv1.0/STATE/scada", b'{"online": true}')) == []
    assert src.map(Incoming(topic(G, "NCMD", N), b"\x00")) == []


def test_descriptor_matches_protoc_output_of_tahus_proto(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    from pathlib import Path

    from google.protobuf import descriptor_pb2

    from streampipe.ingest import _sparkplug_proto

    here = Path(__file__).parent / "payloads" / "sparkplug"
    out = tmp_path / "fds.bin"
    args = ["protoc", f"-I{here}", f"--descriptor_set_out={out}", "sparkplug_b.proto"]
    assert protoc.main(args) == 0
    [made] = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    made.ClearField("options")
    assert made.SerializeToString() == _sparkplug_proto._SERIALIZED
