"""The wire codec: a :class:`~streampipe.readings.Batch` to one compact frame and back.

API
---
``encode(batch, *, schema_id=False) -> bytes`` and
``decode(frame, schemas=None, limits=DEFAULT_LIMITS) -> Batch``. ``decode`` raises only
:class:`CodecError`, whose ``reason`` is one of :data:`REASONS`. Frames are sent with
MQTT v5 content type :data:`CONTENT_TYPE`; schema frames with :data:`SCHEMA_CONTENT_TYPE`.

>>> import numpy as np
>>> from streampipe import Batch
>>> b = Batch("boiler-1", 0, np.arange(3), np.array([1.0, 1.1, 1.2]),
...           ("temp",), np.array([[21.53], [21.5], [float("nan")]]))
>>> decode(encode(b)).same_as(b)
True

Schemas
-------
A sensor sending one reading at a time should not repeat its field names. It
publishes ``schema_frame(batch)`` once, retained, on ``ROOT/schemas/<id>``, then sends
``encode(batch, schema_id=True)``. The edge feeds schema frames to
``SchemaRegistry.add_frame(payload, schema_id=<id from topic>)`` and decodes with
``decode(frame, registry)``; a frame whose schema has not arrived yet is rejected with
reason ``"unknown_schema"`` (retry it, or drop it, once the schema arrives).

>>> sid, sframe = schema_frame(b)
>>> registry = SchemaRegistry()
>>> registry.add_frame(sframe, schema_id=sid) == sid
True
>>> decode(encode(b, schema_id=True), registry).same_as(b)
True
>>> try:
...     decode(encode(b, schema_id=True))
... except CodecError as err:
...     print(err.reason)
unknown_schema

Frame layout (version 1)
------------------------
Integers are LEB128 varints unless a size is given; "svarint" is zigzag + varint.

==============  ==============================================================
byte 0          ``0xB0 | version``: the high nibble is the magic, the low nibble
                the format version (1); readers reject versions they do not know
byte 1          flags: 0x01 reserved (0), 0x02 schema id, 0x04 single reading,
                0x08 feature mask, 0x10 target, 0x20 target mask, 0x40 sign bits,
                0x80 schema frame
device          varint length + UTF-8 (at most 128 bytes)
epoch           varint
n               varint readings (absent in single-reading frames: n = 1)
names           schema id: 4 bytes (BLAKE2b-32 of the packed names); else varint
                length + msgpack array of str
masks           feature mask (n*f bits, row-major, ``np.packbits``), then target
                mask (n bits), each a block: varint L, then L bytes of zstd, or
                (L = 0) the bits as they are
columns         seq, ts, each feature, target; only present values are stored
==============  ==============================================================

A column (frames of 2 or more readings) is: a code byte (low 5 bits: decimal
exponent ``e``, or 31 for raw float64 bits; 0x20 delta-coded; 0x40 zstd), a width
byte ``w`` (0..8), svarint base, [svarint first value if delta-coded], then ``w``
byte planes of the integers minus base (plane 0 holds every low byte), stored or
as varint length + magicless zstd. A decimal column decodes as ``int / 10**e``,
bit-identical to what was sent (see :mod:`streampipe.codec.columns`). Each zstd
block inflates only to the size its header implies, within
``Limits.max_decompressed_bytes`` for the whole frame.

A single-reading frame holds no zstd: its masks are bare bits, then 3-bit codes
(``e`` in 0..6, or 7 for raw float64) for ts, features and target, sign bits if
any decimal is negative, seq as svarint and each present value as a varint
magnitude (or 8 raw little-endian bytes).

Schema frames are ``0xB1 0x80`` + msgpack ``[names, has_target]``.
"""

from __future__ import annotations

from streampipe.codec.errors import DEFAULT_LIMITS, REASONS, CodecError, Limits
from streampipe.codec.frame import decode, encode, encode_reading
from streampipe.codec.schema import Schema, SchemaRegistry, schema_frame

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_LIMITS",
    "REASONS",
    "SCHEMA_CONTENT_TYPE",
    "CodecError",
    "Limits",
    "Schema",
    "SchemaRegistry",
    "decode",
    "encode",
    "encode_reading",
    "schema_frame",
]

#: MQTT v5 content type of batch frames.
CONTENT_TYPE = "application/vnd.streampipe.batch"
#: MQTT v5 content type of schema frames (retained on ``ROOT/schemas/<id>``).
SCHEMA_CONTENT_TYPE = "application/vnd.streampipe.schema"
