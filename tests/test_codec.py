"""The wire codec: lossless round-trips, a decoder that only ever raises CodecError,
bombs that cost no memory, and the schema registry."""

from __future__ import annotations

import math
import pickle
import struct
import tracemalloc

import numpy as np
import pytest
import zstandard as zstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streampipe.codec import (
    CONTENT_TYPE,
    DEFAULT_LIMITS,
    REASONS,
    CodecError,
    Limits,
    Schema,
    SchemaRegistry,
    columns,
    decode,
    encode,
    encode_reading,
    schema_frame,
)
from streampipe.codec.columns import uvarint
from streampipe.readings import Batch, Reading

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ strategies

bit_floats = st.integers(0, 2**64 - 1).map(lambda b: struct.unpack("<d", struct.pack("<Q", b))[0])
decimals = st.builds(lambda m, e: m / 10**e, st.integers(-(10**9), 10**9), st.integers(0, 6))
special = st.sampled_from(
    [0.0, -0.0, math.nan, math.inf, -math.inf, 5e-324, -5e-324, 2.2250738585072014e-308,
     1.7976931348623157e308, 1e-300, 1e300, 2.0**53, 2.0**53 + 2, -(2.0**63)]
)  # fmt: skip
any_float = st.one_of(st.floats(), decimals, special, bit_floats)


def smooth(n: int) -> st.SearchStrategy[np.ndarray]:
    """A slowly wandering decimal signal: compresses, so it takes the zstd paths."""
    return st.builds(
        lambda start, steps, e: (start + np.cumsum(steps)) / 10**e,
        st.integers(-(10**6), 10**6),
        st.lists(st.integers(-3, 3), min_size=n, max_size=n).map(np.array),
        st.integers(0, 4),
    )


def column(n: int, elements: st.SearchStrategy[float]) -> st.SearchStrategy[np.ndarray]:
    """A column that is all one kind (decimal, special, smooth...), or a mix."""
    kind = st.sampled_from([any_float, decimals, elements])
    mixed = kind.flatmap(lambda k: st.lists(k, min_size=n, max_size=n)).map(
        lambda xs: np.array(xs, dtype=np.float64)
    )
    return st.one_of(mixed, smooth(n))


@st.composite
def batches(draw: st.DrawFn, max_n: int = 30, max_f: int = 6) -> Batch:
    n = draw(st.one_of(st.integers(0, max_n), st.just(max_n * 8)))
    f = draw(st.integers(0, max_f))
    names = draw(st.lists(st.text(min_size=1, max_size=12), min_size=f, max_size=f, unique=True))
    device = draw(st.text(max_size=30))
    epoch = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        first = draw(st.integers(-(2**63), 2**63 - 1 - n))
        seq = np.arange(first, first + n, dtype=np.int64)
    else:
        seq = np.array(draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=n, max_size=n)))
    seq = seq.astype(np.int64)
    ts = draw(column(n, st.floats(1.7e9, 1.9e9).map(lambda t: round(t, 3))))
    values = np.column_stack([draw(column(n, any_float)) for _ in range(f)]) if f else None
    values = values if values is not None else np.zeros((n, 0))
    present = None
    if draw(st.booleans()):
        present = np.array(draw(st.lists(st.booleans(), min_size=n * f, max_size=n * f)))
        present = present.reshape(n, f).astype(bool)
    target = target_present = None
    if draw(st.booleans()):
        target = draw(column(n, any_float))
        if draw(st.booleans()):
            target_present = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
            target_present = target_present.astype(bool)
    return Batch(device, epoch, seq, ts, tuple(names), values, present, target, target_present)


# ------------------------------------------------------------------ round trips


def check_same(a: Batch, b: Batch) -> None:
    assert b.same_as(a)
    assert b.seq.dtype == np.int64 and b.ts.dtype == np.float64
    assert b.values.dtype == np.float64 and b.values.shape == (len(a), len(a.features))
    for m in (b.present, b.target_present):
        assert m is None or m.dtype == bool
    assert b.target is None or b.target.dtype == np.float64


@FAST
@given(batches(), st.booleans())
def test_round_trip_is_bit_identical(batch: Batch, by_id: bool) -> None:
    registry = SchemaRegistry()
    registry.add_frame(schema_frame(batch)[1])
    check_same(batch, decode(encode(batch, schema_id=by_id), registry))


@FAST
@given(batches(max_n=1), st.booleans())
def test_single_readings_round_trip(batch: Batch, by_id: bool) -> None:
    registry = SchemaRegistry()
    registry.add(Schema.of(batch))
    check_same(batch, decode(encode(batch, schema_id=by_id), registry))


@FAST
@given(st.integers(1, columns.FEW).flatmap(lambda n: column(n, any_float)))
def test_a_few_floats_encode_as_the_numpy_path_does(v: np.ndarray) -> None:
    code, ints = columns._float_code_few(v.tolist())
    np_code, np_ints = columns._float_code_numpy(v)
    assert (code, ints) == (np_code, np_ints.tolist())
    assert columns._encode_ints(ints, code) == columns._encode_ints(np_ints, np_code)


@FAST
@given(
    st.tuples(st.integers(1, 40), st.integers(1, 5)).flatmap(
        lambda nc: st.lists(column(nc[0], any_float), min_size=nc[1], max_size=nc[1])
    )
)
def test_columns_encoded_together_are_the_bytes_of_each_alone(cols: list[np.ndarray]) -> None:
    matrix = np.column_stack(cols)
    assert columns.encode_float_columns(matrix) == [columns.encode_float_column(c) for c in cols]


@FAST
@given(
    st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=columns.FEW),
    st.sampled_from([0, 3, columns.RAW]),
)
def test_a_few_ints_encode_as_the_numpy_path_does(xs: list[int], code: int) -> None:
    few = columns._encode_ints(xs, code)
    assert few == columns._encode_ints(np.array(xs, dtype=np.int64), code)


@FAST
@given(
    st.text(min_size=1, max_size=20),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(0, 2**64 - 1),
    any_float,
    st.dictionaries(
        st.text(min_size=1, max_size=12),
        any_float | st.integers(-(2**53), 2**53),
        min_size=1,
        max_size=12,
    ),
    st.none() | any_float,
    st.booleans(),
)
def test_one_reading_encodes_as_a_batch_of_it_does(
    device: str, seq: int, epoch: int, ts: float, x: dict, y: float | None, by_id: bool
) -> None:
    r = Reading(device, seq, ts, x, y, epoch=epoch)
    assert encode_reading(r, schema_id=by_id) == encode(Batch.from_readings([r]), schema_id=by_id)


def test_a_reading_the_codec_cannot_carry_is_a_codec_error() -> None:
    with pytest.raises(CodecError) as err:
        encode_reading(Reading("d", 2**63, 0.0, {"t": 1.0}))
    assert err.value.reason == "malformed"
    with pytest.raises(CodecError) as err:
        encode_reading(Reading("d", 0, 0.0, {"t" * 200: 1.0}))
    assert err.value.reason == "string_too_long"


def test_from_readings_round_trip() -> None:
    rs = [
        Reading("boiler-1", 0, 10.0, {"temp": 21.5, "rh": 40.0}, 3.0, epoch=2),
        Reading("boiler-1", 1, 11.0, {"temp": -0.0}, None, epoch=2),
        Reading("boiler-1", 2, 12.5, {"rh": math.nan, "temp": 1e-310}, math.inf, epoch=2),
    ]
    b = Batch.from_readings(rs)
    assert list(decode(encode(b)).readings())[:2] == rs[:2]
    assert decode(encode(b)).same_as(b)


def test_large_batch_round_trips() -> None:
    rng = np.random.default_rng(1)
    n = 5000
    b = Batch(
        "d",
        0,
        np.arange(n),
        1.7e9 + np.arange(n) * 0.1,
        ("a", "b"),
        np.column_stack([np.round(rng.normal(20, 1, n), 2), rng.normal(size=n)]),
        target=rng.normal(size=n),
    )
    assert decode(encode(b)).same_as(b)


# ------------------------------------------------------------------ hostile input


def decodes_or_rejects(data: bytes, registry: SchemaRegistry | None = None) -> None:
    try:
        batch = decode(data, registry)
    except CodecError as err:
        assert err.reason in REASONS
        assert str(err)
    else:
        assert isinstance(batch, Batch)


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_codec_error(data: bytes) -> None:
    decodes_or_rejects(data)


@FAST
@given(st.binary(max_size=200))
def test_arbitrary_bodies_behind_a_valid_header(data: bytes) -> None:
    for flags in (0x00, 0x04, 0x0A, 0x3C, 0x7E):
        decodes_or_rejects(bytes((0xB1, flags)) + data)


def sensor_batch(n: int, missing: bool = False) -> Batch:
    """Readings like a real sensor's: short decimals, steady clock; compresses well."""
    rng = np.random.default_rng(n)
    i = np.arange(n)
    values = np.column_stack(
        [np.round(21.5 + rng.normal(0, 0.03, n), 2), np.round(1013 + rng.normal(0, 1, n), 1)]
    )
    present = rng.random((n, 2)) > 0.2 if missing else None
    target = np.round(rng.normal(100, 5, n), 1)
    tp = rng.random(n) > 0.5 if missing else None
    ts = np.round(1.7e9 + i / 10, 3)
    return Batch("sensor", 3, i + 10, ts, ("t", "p"), values, present, target, tp)


VALID = [sensor_batch(n, missing) for n in (1, 2, 50, 400) for missing in (False, True)]


@FAST
@given(st.one_of(batches(max_n=20, max_f=4), st.sampled_from(VALID)), st.booleans(), st.data())
def test_mutated_frames_raise_only_codec_error(batch: Batch, by_id: bool, data) -> None:
    registry = SchemaRegistry()
    registry.add(Schema.of(batch))
    frame = bytearray(encode(batch, schema_id=by_id))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        i = data.draw(st.integers(0, max(len(frame) - 1, 0)))
        if op == "flip" and frame:
            frame[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and frame:
            frame[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del frame[i:]
        elif op == "insert":
            frame[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif frame:
            del frame[i]
    decodes_or_rejects(bytes(frame), registry)


@pytest.mark.parametrize("batch", VALID)
def test_every_truncation_is_rejected(batch: Batch) -> None:
    frame = encode(batch)
    assert decode(frame).same_as(batch)
    for end in range(len(frame)):
        with pytest.raises(CodecError):
            decode(frame[:end])


def _header(n: int, f: int, flags: int = 0x00) -> bytes:
    """A frame header with ``n`` readings and fields named a, b, c..."""
    if f < 16:
        names = bytes((0x90 | f,)) + b"".join(bytes((0xA1, 97 + j)) for j in range(f))
    else:  # only the array header: too many names to bother spelling out
        names = b"\xdd" + f.to_bytes(4, "big")
    head = bytes((0xB1, flags)) + uvarint(1) + b"d" + uvarint(0) + uvarint(n)
    return head + uvarint(len(names)) + names


def _zstd_bomb(size: int) -> bytes:
    """A magicless zstd frame of ``size`` zero bytes, built without holding them."""
    params = zstd.ZstdCompressionParameters.from_level(
        19, format=zstd.FORMAT_ZSTD1_MAGICLESS, write_content_size=False
    )
    cobj = zstd.ZstdCompressor(compression_params=params).compressobj()
    chunk = bytes(1 << 20)
    out = [cobj.compress(chunk) for _ in range(size >> 20)]
    return b"".join(out) + cobj.flush()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return _zstd_bomb(512 << 20)


def peak_while(fn) -> tuple[int, CodecError]:
    tracemalloc.start()
    try:
        with pytest.raises(CodecError) as info:
            fn()
        return tracemalloc.get_traced_memory()[1], info.value
    finally:
        tracemalloc.stop()


def _column(packed: bytes, width: int = 8) -> bytes:
    """A column header saying: zstd-compressed planes of ``width`` bytes a value."""
    return bytes((0x40, width)) + uvarint(0) + uvarint(len(packed)) + packed


@pytest.mark.parametrize("n", [1000, 100_000])
def test_zstd_bomb_in_a_column_is_cut_off(bomb: bytes, n: int) -> None:
    assert len(bomb) < 20_000  # 16 KB that would inflate to 512 MiB
    frame = _header(n, 0, flags=0x00) + _column(bomb)
    peak, err = peak_while(lambda: decode(frame))
    assert err.reason == "decompressed_too_large"
    assert peak < 8 * n + (1 << 20)  # at most what the column may legitimately hold


def test_zstd_bomb_in_a_mask_is_cut_off(bomb: bytes) -> None:
    frame = _header(1000, 6, flags=0x08) + uvarint(len(bomb)) + bomb
    peak, err = peak_while(lambda: decode(frame))
    assert err.reason == "decompressed_too_large"
    assert peak < 1 << 20


def test_inflated_total_is_limited() -> None:
    b = Batch("d", 0, np.arange(1000) * 7919 % 65536, np.zeros(1000), (), np.zeros((1000, 0)))
    frame = encode(b)
    assert decode(frame).same_as(b)
    with pytest.raises(CodecError) as info:
        decode(frame, limits=Limits(max_decompressed_bytes=1000))
    assert info.value.reason == "decompressed_too_large"


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (_header(1 << 32, 6), "too_many_readings"),  # 4 Gi readings
        (_header(1000, 0) + bytes((0x40, 8)) + uvarint(0) + uvarint(4 << 30), "malformed"),
        (_header(1000, 1 << 20), "too_many_fields"),
    ],
)
def test_header_claiming_4_gib_is_rejected_without_allocating(frame: bytes, reason: str) -> None:
    peak, err = peak_while(lambda: decode(frame))
    assert err.reason == reason
    assert peak < 1 << 20


def test_huge_counts_are_rejected_before_allocating() -> None:
    # 100k readings of 10 fields, whose columns could take almost no bytes at all.
    frame = _header(100_000, 10, flags=0x00)
    peak, err = peak_while(lambda: decode(frame, limits=Limits(max_values=999_999)))
    assert err.reason == "too_many_values"
    assert peak < 1 << 20


def test_oversized_frame_is_rejected_first() -> None:
    with pytest.raises(CodecError) as info:
        decode(b"\xb1\x00" + bytes(DEFAULT_LIMITS.max_frame_bytes))
    assert info.value.reason == "too_large"


def test_limits_apply() -> None:
    b = Batch.from_readings([Reading("a-long-device", i, i, {"x": 1.0}) for i in range(10)])
    frame = encode(b)
    for limits, reason in [
        (Limits(max_readings=9), "too_many_readings"),
        (Limits(max_string_bytes=5), "string_too_long"),
        (Limits(max_fields=0), "too_many_fields"),
        (Limits(max_values=9), "too_many_values"),
        (Limits(max_frame_bytes=len(frame) - 1), "too_large"),
    ]:
        with pytest.raises(CodecError) as info:
            decode(frame, limits=limits)
        assert info.value.reason == reason


def test_encode_refuses_what_decode_would_reject() -> None:
    long = "x" * 129
    for b in (
        Batch.from_readings([Reading(long, 0, 0.0, {})]),
        Batch.from_readings([Reading("d", 0, 0.0, {long: 1.0})]),
    ):
        with pytest.raises(CodecError) as info:
            encode(b)
        assert info.value.reason == "string_too_long"


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"", "bad_magic"),
        (b"\x00\x00", "bad_magic"),
        (b'{"device": "d"}', "bad_magic"),
        (b"\xb2\x00", "unsupported_version"),
        (b"\xbf\x00anything", "unsupported_version"),
        (b"\xb1", "bad_magic"),
    ],
)
def test_magic_and_version(frame: bytes, reason: str) -> None:
    with pytest.raises(CodecError) as info:
        decode(frame)
    assert info.value.reason == reason


def test_corrupt_zstd_payload() -> None:
    frame = _header(3, 0) + _column(b"\xff" * 40)
    with pytest.raises(CodecError) as info:
        decode(frame)
    assert info.value.reason == "decompression_failed"


# ------------------------------------------------------------------ schemas


def one_reading(**x: float) -> Batch:
    return Batch.from_readings([Reading("boiler-1", 864_000, 1795732390.123, x, 1202.9)])


def test_unknown_schema_is_a_clear_rejection() -> None:
    b = one_reading(temp=21.53)
    frame = encode(b, schema_id=True)
    for registry in (None, SchemaRegistry()):
        with pytest.raises(CodecError) as info:
            decode(frame, registry)
        assert info.value.reason == "unknown_schema"
        assert Schema.of(b).id in str(info.value)


def test_schema_frames_teach_the_registry() -> None:
    b = one_reading(temp=21.53, rh=45.3)
    sid, sframe = schema_frame(b)
    registry = SchemaRegistry()
    assert registry.add_frame(sframe, schema_id=sid) == sid
    assert sid in registry and len(registry) == 1 and registry.get(sid) == Schema.of(b)
    assert decode(encode(b, schema_id=True), registry).same_as(b)
    with pytest.raises(CodecError):
        registry.add_frame(sframe, schema_id="00000000")
    with pytest.raises(CodecError):
        decode(sframe)  # a schema frame is not a batch


@pytest.mark.parametrize("names", [("a", "a"), ("", "b"), ("a", "b", "a")])
def test_repeated_or_empty_field_names_are_refused_inline_and_in_schemas(names) -> None:
    b = Batch("d", 0, np.arange(2), np.zeros(2), names, np.ones((2, len(names))))
    with pytest.raises(CodecError) as info:
        decode(encode(b))
    assert info.value.reason == "bad_field_names"
    registry = SchemaRegistry()
    with pytest.raises(CodecError) as info:
        registry.add_frame(schema_frame(b)[1])
    assert info.value.reason == "bad_field_names" and len(registry) == 0


def test_schema_ids_depend_on_names_and_target() -> None:
    ids = {
        Schema(("a", "b"), True).id,
        Schema(("a", "b"), False).id,
        Schema(("b", "a"), True).id,
        Schema(("ab",), True).id,
    }
    assert len(ids) == 4 and all(len(i) == 8 for i in ids)


def test_registry_is_bounded_and_forgets_what_no_frame_named_first() -> None:
    registry = SchemaRegistry(max_schemas=4)
    a, b, c, d, e = (Schema((name,), False) for name in "abcde")
    for schema in (a, b, c, d):
        registry.add(schema)
    registry.add(a)  # already known: fine
    assert registry.get(b.id) == b and registry.get(a.id) == a  # frames name b, then a
    registry.add(e)  # full: c, the oldest that no frame named, goes
    assert list(registry) == [d.id, e.id, b.id, a.id] and registry.evicted == 1
    assert registry.get(d.id) == d and registry.get(e.id) == e  # at most 3 count as named
    assert registry.used() == [a.id, d.id, e.id] and b.id in registry
    registry.add(c)  # b, named least recently, no longer counts: it goes first
    assert b.id not in registry and len(registry) == 4 and registry.evicted == 2


@FAST
@given(st.binary(max_size=200))
def test_schema_frames_from_the_wire_raise_only_codec_error(data: bytes) -> None:
    for frame in (data, b"\xb1\x80" + data):
        try:
            SchemaRegistry().add_frame(frame)
        except CodecError as err:
            assert err.reason in REASONS


def test_codec_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(CodecError("malformed", "bad")))
    assert (err.reason, str(err)) == ("malformed", "bad")


def test_content_type() -> None:
    assert CONTENT_TYPE.startswith("application/")


@FAST
@given(
    st.lists(
        st.dictionaries(st.sampled_from("abcd"), st.floats(allow_nan=False), min_size=4),
        min_size=1,
        max_size=6,
    ),
    st.lists(st.one_of(st.none(), st.floats(allow_nan=False)), min_size=6, max_size=6),
)
def test_readings_with_the_same_fields_batch_as_any_readings_do(
    xs: list[dict[str, float]], ys: list[float | None]
) -> None:
    """The shortcut for readings that all have the same fields (in any order) and a
    target gives the batch the general path gives."""
    readings = [Reading("d", i, 1.7e9 + i, x, y) for i, (x, y) in enumerate(zip(xs, ys))]
    fast = Batch.from_readings(readings)
    assert [r.x for r in fast.readings()] == [dict(r.x) for r in readings]
    assert [list(r.x) for r in fast.readings()] == [list(xs[0])] * len(xs)
    assert fast.targets() == [r.y for r in readings]
    assert fast.seq.tolist() == list(range(len(xs)))


@FAST
@given(any_float)
def test_a_single_reading_codes_each_value_as_scalar_exponent_says(x: float) -> None:
    """``_encode_single`` inlines :func:`columns.scalar_exponent` (it runs for every
    reading sent alone): the two must pick the same code for every value."""
    from streampipe.codec.frame import _SINGLE_RAW, _encode_single

    out, _ = _encode_single(0, [x])
    expected = columns.scalar_exponent(x, _SINGLE_RAW - 1)
    assert out[0] & 7 == (_SINGLE_RAW if expected is None else expected)
