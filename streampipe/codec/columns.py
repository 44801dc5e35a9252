"""Numeric columns to bytes and back, losslessly and without per-value Python loops.

A float column is stored as integers when it holds short decimals: the smallest
exponent ``e`` with ``float(m) / 10**e == v`` bit for bit for every value (the idea
of ALP, SIGMOD 2024) turns 21.53 into 2153. Other columns (NaN, inf, -0.0, long
fractions) keep their float64 bit patterns as integers. Integers are then either
delta-coded or taken as they are, whichever spans the smaller range, offset by their
minimum ("frame of reference"), cut to the fewest whole bytes that hold the largest,
and byte-shuffled: all low bytes, then all next bytes, which zstd packs tightly.

Arithmetic is modulo 2**64 throughout, so every int64 (and every float bit pattern)
round-trips, overflow included.
"""

from __future__ import annotations

import itertools
import math
import struct

import numpy as np

from streampipe.codec.blocks import compress, inflate
from streampipe.codec.errors import CodecError

__all__ = [
    "MAX_EXPONENT",
    "RAW",
    "Reader",
    "decimal_exponent",
    "decode_float_column",
    "decode_int_column",
    "encode_float_column",
    "encode_int_column",
    "scalar_exponent",
    "uvarint",
    "zigzag",
]

#: Largest decimal exponent tried; 10**22 is the largest power of ten float64 holds exactly.
MAX_EXPONENT = 22
#: Exponent code for "float64 bit patterns, not decimals".
RAW = 31
_DELTA = 0x20
_ZSTD = 0x40
_EXPONENT = 0x1F
_POW10 = [10.0**e for e in range(MAX_EXPONENT + 1)]
_EXACT = float(2**53)  # integers beyond this are not all exact in float64
_U64 = np.dtype("<u8")
_M64 = 0xFFFF_FFFF_FFFF_FFFF
_S64 = 1 << 63
#: Columns this short are encoded in plain Python: numpy's fixed cost per call (~1 µs,
#: a few dozen calls per column) is far above the work. Both paths give the same bytes.
FEW = 16


def zigzag(v: int) -> int:
    """Map a signed int64 to an unsigned one, small magnitudes to small numbers.

    >>> [zigzag(v) for v in (0, -1, 1, -2)]
    [0, 1, 2, 3]
    """
    return ((v << 1) ^ (v >> 63)) & 0xFFFF_FFFF_FFFF_FFFF


def _unzigzag(u: int) -> int:
    return (u >> 1) ^ -(u & 1)


def uvarint(v: int) -> bytes:
    """LEB128 bytes of an unsigned int below 2**64.

    >>> uvarint(300).hex()
    'ac02'
    """
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


class Reader:
    """A cursor over untrusted bytes; every overrun is a ``malformed`` CodecError."""

    __slots__ = ("budget", "buf", "pos")

    def __init__(self, buf: bytes | memoryview, pos: int = 0, budget: int = 0) -> None:
        self.buf = buf
        self.pos = pos
        self.budget = budget  # bytes that zstd blocks may still inflate to

    def block(self, size: int, packed_len: int | None = None) -> bytes | memoryview:
        """``size`` bytes, stored or (when ``packed_len`` is given) zstd-compressed."""
        if packed_len is None:
            return self.take(size)
        if size > self.budget:
            raise CodecError(
                "decompressed_too_large", "the frame's zstd blocks inflate past the limit"
            )
        self.budget -= size
        return inflate(self.take(packed_len), size)

    def take(self, k: int) -> bytes | memoryview:
        end = self.pos + k
        if k < 0 or end > len(self.buf):
            raise CodecError("malformed", "the frame ends early")
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise CodecError("malformed", "the frame ends early")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def uvarint(self) -> int:
        buf, start = self.buf, self.pos
        if start + 1 < len(buf):  # the common cases, one or two bytes, without the loop
            b = buf[start]
            if b < 0x80:
                self.pos = start + 1
                return b
            c = buf[start + 1]
            if c < 0x80:
                self.pos = start + 2
                return (b & 0x7F) | c << 7
        pos, end = start, min(start + 10, len(buf))
        v = shift = 0
        while pos < end:
            b = buf[pos]
            pos += 1
            v |= (b & 0x7F) << shift
            if b < 0x80:
                if v >> 64:
                    break
                self.pos = pos
                return v
            shift += 7
        if pos == len(buf) and pos - start < 10:
            raise CodecError("malformed", "the frame ends early")
        raise CodecError("malformed", "a varint is longer than 64 bits")

    def svarint(self) -> int:
        return _unzigzag(self.uvarint())

    def rest(self) -> int:
        return len(self.buf) - self.pos


def decimal_exponent(v: np.ndarray) -> tuple[int, np.ndarray] | None:
    """The smallest ``e`` and integers ``m`` with ``m / 10**e`` bit-identical to ``v``.

    >>> e, m = decimal_exponent(np.array([21.53, 21.5, -3.0]))
    >>> e, m.tolist()
    (2, [2153, 2150, -300])
    >>> decimal_exponent(np.array([0.1, float("nan")])) is None
    True
    """
    if v.size == 0:
        return 0, np.zeros(0, np.int64)
    # No column needs fewer digits than its first value: start there, saving passes.
    start = scalar_exponent(float(v[0]))
    if start is None:
        return None
    if v.size == 1:
        return start, np.array([round(float(v[0]) * _POW10[start])], dtype=np.int64)
    with np.errstate(invalid="ignore", over="ignore"):
        amax = float(np.max(np.abs(v)))
    if not amax < _EXACT:  # also false for NaN and inf
        return None
    bits = v.view(np.int64)
    for e in range(start, MAX_EXPONENT + 1):
        scale = _POW10[e]
        if amax * scale >= _EXACT:
            return None
        m = np.rint(v * scale).astype(np.int64)
        # The decoder computes exactly this division, so equal bits here mean equal bits there.
        if ((m.astype(np.float64) / scale).view(np.int64) == bits).all():
            return e, m
    return None


def scalar_exponent(x: float, max_exponent: int = MAX_EXPONENT) -> int | None:
    """:func:`decimal_exponent` of one value, in plain Python (fast for one value).

    >>> scalar_exponent(1013.2), scalar_exponent(-0.0), scalar_exponent(0.1 + 0.2)
    (1, None, None)
    """
    if not abs(x) < _EXACT or (x == 0.0 and math.copysign(1.0, x) < 0):
        return None  # NaN, inf, huge, or -0.0 (an integer zero cannot carry its sign)
    for e in range(max_exponent + 1):
        scale = _POW10[e]
        if abs(x) * scale >= _EXACT:
            return None
        if round(x * scale) / scale == x:
            return e
    return None


def encode_int_column(x: np.ndarray | list[int], code: int = 0) -> bytes:
    """Bytes of an int64 column: code, width, base, [first], shuffled planes.

    ``code``'s low five bits say how the decoder turns the integers back into
    values (a decimal exponent or :data:`RAW`); this function adds the delta bit.
    """
    if len(x) == 0:
        return b""
    if len(x) <= FEW:
        return _encode_ints(x.tolist() if isinstance(x, np.ndarray) else list(x), code)
    return _encode_ints(np.ascontiguousarray(x, dtype=np.int64), code)


def _encode_ints(s: list[int] | np.ndarray, code: int) -> bytes:
    """:func:`encode_int_column`: a list in plain Python, an int64 array with numpy (a
    few values cost numpy far more in calls than in work). Both give the same bytes."""
    few = isinstance(s, list)
    base, top = (min(s), max(s)) if few else (int(s.min()), int(s.max()))
    y = s
    if len(s) > 1:
        if few:
            d = [((b - a + _S64) & _M64) - _S64 for a, b in itertools.pairwise(s)]
            dlo, dhi = min(d), max(d)
        else:
            d = (s.view(np.uint64)[1:] - s.view(np.uint64)[:-1]).view(np.int64)
            dlo, dhi = int(d.min()), int(d.max())
        if dhi - dlo < top - base:  # deltas, modulo 2**64, span less
            code |= _DELTA
            y, base, top = d, dlo, dhi
    width = ((top - base).bit_length() + 7) // 8
    planes = b""
    if width:
        if few:
            offs = [(v - base) & _M64 for v in y]
            planes = bytes([(o >> (8 * j)) & 0xFF for j in range(width) for o in offs])
        else:
            off = y.view(np.uint64) - np.uint64(base & _M64)
            wide = off.astype(_U64, copy=False).view(np.uint8).reshape(len(off), 8)
            planes = wide[:, :width].T.tobytes()
    return _column(code, width, base, int(s[0]), planes)


def _column(code: int, width: int, base: int, first: int, planes: bytes) -> bytes:
    """A column's bytes from its integers' byte planes: the header (code, width, base,
    and the first value if delta-coded), then the planes, zstd-packed if that is
    smaller. ``code`` holds the exponent and the delta bit; the zstd bit is added."""
    packed = compress(planes) if width else None
    if packed is not None:
        code |= _ZSTD
    head = bytes((code, width)) + uvarint(zigzag(base))
    if code & _DELTA:
        head += uvarint(zigzag(first))
    return head + (planes if packed is None else uvarint(len(packed)) + packed)


def decode_int_column(r: Reader, n: int) -> tuple[int, np.ndarray]:
    """Read one column of ``n`` integers; returns its exponent code and int64 values."""
    if n == 0:
        return 0, np.zeros(0, np.int64)
    code = r.byte()
    width = r.byte()
    if code & 0x80 or width > 8 or (width == 0 and code & _ZSTD):
        raise CodecError("malformed", f"bad column header (code {code}, width {width})")
    base = _u64(r.svarint())[0]
    delta = bool(code & _DELTA)
    first = r.svarint() if delta else 0
    k = n - 1 if delta else n
    if width == 0:
        y = np.full(k, base, dtype=np.uint64)
    else:
        packed_len = r.uvarint() if code & _ZSTD else None
        raw = np.frombuffer(r.block(width * k, packed_len), dtype=np.uint8).reshape(width, k)
        wide = np.zeros((k, 8), dtype=np.uint8)
        wide[:, :width] = raw.T
        y = wide.view(_U64).reshape(k).astype(np.uint64, copy=False) + base
    if delta:
        y = np.concatenate((_u64(first), y))
        np.cumsum(y, out=y)
    return code & _EXPONENT, y.view(np.int64)


def _u64(v: int) -> np.ndarray:
    return np.array([v & 0xFFFF_FFFF_FFFF_FFFF], dtype=np.uint64)


def float_code(v: np.ndarray | list[float]) -> tuple[int, np.ndarray | list[int]]:
    """The exponent code and integers that store a float64 column losslessly."""
    if len(v) <= FEW:
        return _float_code_few(v.tolist() if isinstance(v, np.ndarray) else list(v))
    return _float_code_numpy(np.asarray(v, dtype=np.float64))


def _float_code_numpy(v: np.ndarray) -> tuple[int, np.ndarray]:
    found = decimal_exponent(v)
    if found is None:
        return RAW, np.ascontiguousarray(v, dtype=np.float64).view(np.int64)
    return found


def _float_code_few(v: list[float]) -> tuple[int, list[int]]:
    """:func:`float_code` of a few values, in plain Python."""
    if not v:
        return 0, []
    start = scalar_exponent(v[0])
    if start is not None and len(v) > 1:
        if any(x != x or (x == 0.0 and math.copysign(1.0, x) < 0) for x in v):
            start = None  # NaN or -0.0: no decimal holds it
        else:
            amax = max(abs(x) for x in v)
            if not amax < _EXACT:
                start = None
    if start is not None:
        if len(v) == 1:
            return start, [round(v[0] * _POW10[start])]
        for e in range(start, MAX_EXPONENT + 1):
            scale = _POW10[e]
            if amax * scale >= _EXACT:
                break
            m = [round(x * scale) for x in v]
            # -0.0 is excluded above, so == here is equality of bits
            if all(i / scale == x for i, x in zip(m, v)):
                return e, m
    raw = struct.unpack(f"<{len(v)}q", struct.pack(f"<{len(v)}d", *v))
    return RAW, list(raw)


def encode_float_column(v: np.ndarray | list[float]) -> bytes:
    """Bytes of a float64 column (see the module docstring).

    >>> r = Reader(encode_float_column(np.array([21.53, 21.55, float("nan")])))
    >>> decode_float_column(r, 3).tolist()[:2]
    [21.53, 21.55]
    """
    code, ints = float_code(v)
    return encode_int_column(ints, code)


def ints_to_floats(code: int, ints: np.ndarray) -> np.ndarray:
    if code == RAW:
        return ints.view(np.float64)
    if code > MAX_EXPONENT:
        raise CodecError("malformed", f"bad decimal exponent {code}")
    return ints.astype(np.float64) / _POW10[code]


def decode_float_column(r: Reader, n: int) -> np.ndarray:
    code, ints = decode_int_column(r, n)
    return ints_to_floats(code, ints)


#: Decimal exponents :func:`encode_float_columns` tries for all columns at once; a
#: column that needs more digits goes through :func:`float_code` on its own.
_MATRIX_EXPONENTS = 7
_MATRIX_POW10 = np.array(_POW10[:_MATRIX_EXPONENTS]).reshape(-1, 1, 1)


def encode_float_columns(m: np.ndarray) -> list[bytes]:
    """:func:`encode_float_column` of each column of ``m`` (n x c float64), the same
    bytes, in a fixed number of numpy calls for the whole matrix rather than dozens
    per column: what makes frames of a few readings cheap (~4x for 2-16 readings of
    11 columns).

    >>> m = np.array([[21.53, 1e300], [21.55, float("nan")]])
    >>> encode_float_columns(m) == [encode_float_column(m[:, j]) for j in range(2)]
    True
    """
    n, c = m.shape
    if n == 0 or c == 0:
        return [encode_float_column(m[:, j]) for j in range(c)]
    with np.errstate(invalid="ignore", over="ignore"):
        amax = np.abs(m).max(axis=0)  # NaN where a column holds one: never < _EXACT
        scaled = np.rint(m * _MATRIX_POW10)  # (exponents, n, c)
        back = (scaled + 0.0) / _MATRIX_POW10  # + 0.0: an integer zero has no sign
        exact = (back.view(np.int64) == m.view(np.int64)).all(axis=1)  # (exponents, c)
        fits = amax * _MATRIX_POW10.reshape(-1, 1) < _EXACT  # (exponents, c)
    # As float_code: the smallest exponent at which every value round-trips, unless
    # the integers outgrow 2**53 first (then, and for NaN, inf and -0.0, raw bits).
    good = exact & fits
    found = good.any(axis=0)
    first = good.argmax(axis=0)
    raw = ~found & ~fits[-1]
    codes = np.where(found, first, RAW).tolist()
    ints = np.where(found, scaled[first, :, np.arange(c)].T, 0.0).astype(np.int64)
    raw_bits = m.view(np.int64)
    ints[:, raw] = raw_bits[:, raw]
    out: list[bytes | None] = [None] * c
    for j in np.flatnonzero(~found & ~raw).tolist():  # more digits than tried here
        out[j] = encode_float_column(m[:, j])
    return _encode_int_matrix(ints, codes, out)


def _encode_int_matrix(y: np.ndarray, codes: list[int], out: list[bytes | None]) -> list[bytes]:
    """:func:`_encode_ints` of each column of ``y`` (n x c int64) with its code, except
    where ``out`` already holds a column's bytes."""
    n, c = y.shape
    y = np.ascontiguousarray(y)
    u = y.view(np.uint64)
    base, top = y.min(axis=0).tolist(), y.max(axis=0).tolist()
    if n > 1:
        d = (u[1:] - u[:-1]).view(np.int64)
        dlo, dhi = d.min(axis=0).tolist(), d.max(axis=0).tolist()
        doff = d.view(np.uint64) - np.array(dlo, dtype=np.int64).view(np.uint64)
        dplanes = doff.view(np.uint8).reshape(n - 1, c, 8).transpose(1, 2, 0).tobytes()
    plain = u - np.array(base, dtype=np.int64).view(np.uint64)
    planes = plain.view(np.uint8).reshape(n, c, 8).transpose(1, 2, 0).tobytes()
    firsts = y[0].tolist()
    result: list[bytes] = []
    for j in range(c):
        done = out[j]
        if done is not None:
            result.append(done)
            continue
        code, lo, hi, rows, blob = codes[j], base[j], top[j], n, planes
        if n > 1 and dhi[j] - dlo[j] < hi - lo:  # deltas, modulo 2**64, span less
            code, lo, hi, rows, blob = code | _DELTA, dlo[j], dhi[j], n - 1, dplanes
        width = ((hi - lo).bit_length() + 7) // 8
        start = j * 8 * rows
        result.append(_column(code, width, lo, firsts[j], blob[start : start + width * rows]))
    return result
