"""``encode`` and ``decode``: a :class:`~streampipe.readings.Batch` to one frame and back.

See the package docstring for the layout. Decoding treats its input as hostile: every
length is checked against :class:`~streampipe.codec.errors.Limits` before anything of
that size is allocated, and only :class:`CodecError` escapes.
"""

from __future__ import annotations

import functools
import struct
from math import copysign

import msgpack
import numpy as np

from streampipe.codec import header as h
from streampipe.codec.blocks import compress
from streampipe.codec.columns import (
    _EXACT,
    Reader,
    decode_float_column,
    decode_int_column,
    encode_float_column,
    encode_float_columns,
    encode_int_column,
    uvarint,
    zigzag,
)
from streampipe.codec.errors import DEFAULT_LIMITS, CodecError, Limits
from streampipe.codec.schema import Schema, SchemaRegistry, unpack_names
from streampipe.readings import Batch, Reading

__all__ = ["decode", "encode", "encode_reading"]

_SINGLE_RAW = 7  # 3-bit code in single-reading frames: float64 bits, not a decimal
_POW10 = [10.0**e for e in range(_SINGLE_RAW)]  # the decimal exponents they use
_DOUBLE = struct.Struct("<d")
#: Frames of this many readings, every value present, encode their columns together
#: (:func:`~streampipe.codec.columns.encode_float_columns`): the same bytes, 2-4x
#: faster; two readings are cheaper a column at a time, and so are thousands.
MATRIX_READINGS = (3, 256)


# ---------------------------------------------------------------------------- encode


def encode(batch: Batch, *, schema_id: bool = False) -> bytes:
    """One frame holding ``batch``, losslessly.

    With ``schema_id=True`` the frame names its fields by a 4-byte schema id instead
    of inline; the receiver needs the matching schema frame (see
    :func:`~streampipe.codec.schema_frame`). Raises :class:`CodecError` for a batch
    that :data:`DEFAULT_LIMITS` would not let a receiver decode.

    >>> from streampipe.readings import Reading
    >>> b = Batch.from_readings([Reading("boiler-1", 7, 1795732390.1, {"temp": 21.53})])
    >>> frame = encode(b)
    >>> len(frame), decode(frame).same_as(b)
    (28, True)
    """
    n = len(batch)
    seq = np.asarray(batch.seq, dtype=np.int64)
    ts = np.asarray(batch.ts, dtype=np.float64)
    values = np.asarray(batch.values, dtype=np.float64)
    present = _mask(batch.present, (n, len(batch.features)))
    target = None if batch.target is None else np.asarray(batch.target, dtype=np.float64)
    tpresent = None if target is None else _mask(batch.target_present, (n,))
    flags, parts = _head(
        batch.device, batch.epoch, n, tuple(batch.features), target is not None, schema_id
    )

    body = []
    if present is not None:
        flags |= h.MASK
        body.append(_bitmap(present, n > 1))
    if target is not None:
        flags |= h.TARGET
        if tpresent is not None:
            flags |= h.TARGET_MASK
            body.append(_bitmap(tpresent, n > 1))

    if n == 1:  # one value per column: plain Python floats, None where absent
        row = values[0].tolist()
        if present is not None:
            row = [v if p else None for v, p in zip(row, present[0].tolist())]
        cells = [ts.item(), *row]
        if target is not None:
            cells.append(target.item() if tpresent is None or tpresent[0] else None)
        single, negative = _encode_single(int(seq[0]), cells)
        if negative:
            flags |= h.SIGNS
        payload = b"".join(body) + single
    elif present is None and tpresent is None and MATRIX_READINGS[0] <= n <= MATRIX_READINGS[1]:
        matrix = [ts[:, None], values] if target is None else [ts[:, None], values, target[:, None]]
        body.append(encode_int_column(seq))
        body += encode_float_columns(np.concatenate(matrix, axis=1))
        payload = b"".join(body)
    else:
        columns = [ts] + [
            values[:, j] if present is None else values[present[:, j], j]
            for j in range(len(batch.features))
        ]
        if target is not None:
            columns.append(target if tpresent is None else target[tpresent])
        body.append(encode_int_column(seq))
        body += [encode_float_column(c) for c in columns]
        payload = b"".join(body)
    return h.make_header(flags) + b"".join(parts) + payload


def encode_reading(reading: Reading, *, schema_id: bool = False) -> bytes:
    """The frame :func:`encode` makes of a batch of just ``reading``, built from its
    plain floats without a :class:`Batch` or numpy: what a sensor that sends each
    reading as it comes needs, at a fraction of the cost.

    >>> from streampipe.readings import Reading
    >>> r = Reading("boiler-1", 7, 1795732390.1, {"temp": 21.53})
    >>> encode_reading(r) == encode(Batch.from_readings([r]))
    True
    """
    features = tuple(reading.x)
    if not all(isinstance(name, str) for name in features):
        raise CodecError("malformed", "field names must be strings")
    has_target = reading.y is not None
    seq = int(reading.seq)
    if not -(1 << 63) <= seq < 1 << 63:
        raise CodecError("malformed", f"sequence number {seq} is not a 64-bit integer")
    flags, parts = _head(reading.device, reading.epoch, 1, features, has_target, schema_id)
    cells = [float(reading.ts), *map(float, reading.x.values())]
    if has_target:
        flags |= h.TARGET
        cells.append(float(reading.y))  # type: ignore[arg-type]
    single, negative = _encode_single(seq, cells)
    if negative:
        flags |= h.SIGNS
    return h.make_header(flags) + b"".join(parts) + single


def _head(
    device: str,
    epoch: int,
    n: int,
    features: tuple[str, ...],
    has_target: bool,
    schema_id: bool,
) -> tuple[int, list[bytes]]:
    """The flags and the leading fields of a frame (device, epoch, count, field names
    or schema id), after checking the batch against the limits a receiver applies."""
    limits = DEFAULT_LIMITS
    f = len(features)
    device_part = _device_part(device)
    names_part = _names_part(features, has_target, schema_id)
    if n > limits.max_readings:
        raise CodecError("too_many_readings", f"{n} readings exceed {limits.max_readings}")
    if f > limits.max_fields:
        raise CodecError("too_many_fields", f"{f} fields exceed {limits.max_fields}")
    if n * f > limits.max_values:
        raise CodecError("too_many_values", f"{n}x{f} values exceed {limits.max_values}")
    epoch = int(epoch)
    if not 0 <= epoch < 1 << 64:
        raise CodecError("malformed", f"epoch {epoch} is not in 0..2**64-1")
    flags = 0
    parts = [device_part, uvarint(epoch)]
    if n == 1:
        flags |= h.SINGLE
    else:
        parts.append(uvarint(n))
    if schema_id:
        flags |= h.SCHEMA_ID
    parts.append(names_part)
    return flags, parts


# A sender repeats its device ids and field names in every frame: what they encode to
# is worked out (and checked against the limits) once.
@functools.lru_cache(maxsize=1 << 16)
def _device_part(device: str) -> bytes:
    raw = device.encode("utf-8")
    if len(raw) > DEFAULT_LIMITS.max_string_bytes:
        raise CodecError("string_too_long", "device id or a field name is over 128 bytes")
    return uvarint(len(raw)) + raw


@functools.lru_cache(maxsize=4096)
def _names_part(features: tuple[str, ...], has_target: bool, schema_id: bool) -> bytes:
    if any(len(name.encode("utf-8")) > DEFAULT_LIMITS.max_string_bytes for name in features):
        raise CodecError("string_too_long", "device id or a field name is over 128 bytes")
    if schema_id:
        return Schema(features, has_target).raw_id
    packed = msgpack.packb(list(features), use_bin_type=True)
    return uvarint(len(packed)) + packed


def _bitmap(mask: np.ndarray, as_block: bool) -> bytes:
    """A presence mask: bare bits in single-reading frames, else a block."""
    bits = np.packbits(mask, axis=None).tobytes()
    if not as_block:
        return bits
    packed = compress(bits)
    return b"\x00" + bits if packed is None else uvarint(len(packed)) + packed


def _mask(m: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if m is None:
        return None
    m = np.asarray(m, dtype=bool)
    return None if m.all() else m


def _encode_single(seq: int, cells: list[float | None]) -> tuple[bytes, bool]:
    """Compact layout of one reading: 3-bit codes, optional sign bits, varints.

    Each value is coded as :func:`~streampipe.codec.columns.scalar_exponent` says
    (inlined here, with the varints: this runs for every reading a sensor sends alone).
    """
    k = len(cells)
    codes = 0
    signs = 0
    data = bytearray(uvarint(zigzag(seq)))
    for i, x in enumerate(cells):
        if x is None:
            continue  # absent: its code stays 0 and nothing is written
        e = _SINGLE_RAW
        ax = abs(x)
        if ax < _EXACT and (x != 0.0 or copysign(1.0, x) > 0):  # not NaN, inf, huge or -0.0
            for p, scale in enumerate(_POW10):
                if ax * scale >= _EXACT:
                    break
                if round(x * scale) / scale == x:
                    e = p
                    break
        if e == _SINGLE_RAW:
            codes |= _SINGLE_RAW << (3 * i)
            data += _DOUBLE.pack(x)
            continue
        v = round(x * _POW10[e])
        codes |= e << (3 * i)
        if v < 0:
            signs |= 1 << i
            v = -v
        while v >= 0x80:
            data.append((v & 0x7F) | 0x80)
            v >>= 7
        data.append(v)
    out = codes.to_bytes((3 * k + 7) // 8, "little")
    if signs:
        out += signs.to_bytes((k + 7) // 8, "little")
    return out + data, bool(signs)


# ---------------------------------------------------------------------------- decode


def decode(
    frame: bytes | bytearray | memoryview,
    schemas: SchemaRegistry | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Batch:
    """The :class:`Batch` in ``frame``; raises only :class:`CodecError`, whatever the bytes.

    >>> decode(b"{}")
    Traceback (most recent call last):
    ...
    streampipe.codec.errors.CodecError: not a streampipe frame (bad magic byte)
    """
    try:
        return _decode(memoryview(frame).cast("B"), schemas, limits)
    except CodecError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, OverflowError) as exc:
        # A safety net: every case we know of is checked explicitly above it.
        raise CodecError("malformed", f"undecodable frame: {exc}") from None


def _decode(frame: memoryview, schemas: SchemaRegistry | None, limits: Limits) -> Batch:
    flags = h.read_header(frame, limits)
    if flags & h.SCHEMA_FRAME:
        raise CodecError("malformed", "a schema frame, not a batch: use SchemaRegistry.add_frame")
    single = bool(flags & h.SINGLE)
    if (flags & h.SIGNS and not single) or flags & h.RESERVED:
        raise CodecError("malformed", f"inconsistent flags {flags:#04x}")
    if flags & h.TARGET_MASK and not flags & h.TARGET:
        raise CodecError("malformed", "a target mask without a target")

    r = Reader(frame, 2)
    length = r.uvarint()
    if length > limits.max_string_bytes:
        raise CodecError("string_too_long", f"device id of {length} bytes")
    try:
        device = bytes(r.take(length)).decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError("malformed", "device id is not UTF-8") from None
    epoch = r.uvarint()
    n = 1 if single else r.uvarint()
    if n > limits.max_readings:
        raise CodecError("too_many_readings", f"{n} readings exceed {limits.max_readings}")

    has_target = bool(flags & h.TARGET)
    if flags & h.SCHEMA_ID:
        sid = bytes(r.take(4)).hex()
        schema = schemas.get(sid) if schemas is not None else None
        if schema is None:
            raise CodecError(
                "unknown_schema", f"schema {sid} is unknown: no schema frame seen", schema_id=sid
            )
        if schema.has_target != has_target:
            raise CodecError("malformed", f"frame and schema {sid} disagree about the target")
        features = schema.features
        if len(features) > limits.max_fields:
            raise CodecError("too_many_fields", f"{len(features)} fields")
    else:
        size = r.uvarint()
        if size > limits.max_fields * (limits.max_string_bytes + 5) + 5:
            raise CodecError("too_many_fields", "the field-name list is too long")
        features = unpack_names(bytes(r.take(size)), limits)
    f = len(features)
    if n * f > limits.max_values:
        raise CodecError("too_many_values", f"{n}x{f} values exceed {limits.max_values}")

    r.budget = limits.max_decompressed_bytes
    present = None
    if flags & h.MASK:
        present = _read_bitmap(r, n * f, single).reshape(n, f)
    tpresent = None
    if flags & h.TARGET_MASK:
        tpresent = _read_bitmap(r, n, single)

    counts = [n] * (1 + f) if present is None else [n, *present.sum(axis=0).tolist()]
    if has_target:
        counts.append(n if tpresent is None else int(tpresent.sum()))

    if single:
        seq_value, row = _decode_single(r, flags, counts)
        _check_end(r)
        columns = np.array(row, dtype=np.float64)  # one array; the columns are views of it
        return Batch.built(
            device,
            epoch,
            np.array([seq_value], dtype=np.int64),
            columns[:1],
            features,
            columns[1 : 1 + f].reshape(1, f),
            present,
            columns[1 + f :] if has_target else None,
            tpresent,
        )

    code, seq = decode_int_column(r, n)
    if code:
        raise CodecError("malformed", "sequence numbers must be integers")
    cols = [decode_float_column(r, c) for c in counts]
    _check_end(r)
    ts = cols[0]
    if present is None:
        values = np.column_stack(cols[1 : 1 + f]) if f else np.zeros((n, 0))
    else:
        values = np.zeros((n, f))
        for j in range(f):
            values[present[:, j], j] = cols[1 + j]
    target = None
    if has_target:
        if tpresent is None:
            target = cols[-1]
        else:
            target = np.zeros(n)
            target[tpresent] = cols[-1]
    return Batch(
        device=device,
        epoch=epoch,
        seq=seq,
        ts=ts,
        features=features,
        values=values,
        present=present,
        target=target,
        target_present=tpresent,
    )


def _read_bitmap(r: Reader, count: int, single: bool) -> np.ndarray:
    size = (count + 7) // 8
    packed_len = None if single else r.uvarint() or None
    bits = np.frombuffer(r.block(size, packed_len), dtype=np.uint8)
    return np.unpackbits(bits, count=count).view(bool)


def _check_end(r: Reader) -> None:
    if r.rest():
        raise CodecError("malformed", f"{r.rest()} bytes after the last column")


def _decode_single(r: Reader, flags: int, counts: list[int]) -> tuple[int, list[float]]:
    """seq and [ts, *features, target] of a single-reading frame; 0.0 where absent.

    Plain Python: for one value each, numpy's per-call cost would dominate. The
    division is the same IEEE operation the encoder checked, so bits match.
    """
    k = len(counts)
    codes = int.from_bytes(r.take((3 * k + 7) // 8), "little")
    signs = int.from_bytes(r.take((k + 7) // 8), "little") if flags & h.SIGNS else 0
    seq = r.svarint()
    row = []
    for i, count in enumerate(counts):
        code = (codes >> (3 * i)) & 7
        if count == 0:
            row.append(0.0)
        elif code == _SINGLE_RAW:
            row.append(struct.unpack("<d", r.take(8))[0])
        else:
            m = r.uvarint()
            if m >= 1 << 63:
                raise CodecError("malformed", "a decimal is out of range")
            row.append((-m if signs >> i & 1 else m) / _POW10[code])
    return seq, row
