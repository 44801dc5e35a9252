"""The two bytes that open every frame: magic and format version, then flags."""

from __future__ import annotations

from streampipe.codec.errors import DEFAULT_LIMITS, CodecError, Limits

__all__ = ["FLAG_NAMES", "VERSION", "make_header", "read_header"]

_MAGIC = 0xB0  # high nibble of byte 0; the low nibble is the format version
VERSION = 1  # this module writes version 1 and reads versions {1}
_READABLE = frozenset({1})

# Byte 1: flags.
RESERVED = 0x01  # must be 0 in version 1 (columns say themselves if they are compressed)
SCHEMA_ID = 0x02  # field names come from a 4-byte schema id, not inline
SINGLE = 0x04  # one reading, in the compact varint layout
MASK = 0x08  # a feature-presence bitmap follows
TARGET = 0x10  # the batch has a target column
TARGET_MASK = 0x20  # a target-presence bitmap follows
SIGNS = 0x40  # (single only) a sign bitmap follows; without it every decimal is >= 0
SCHEMA_FRAME = 0x80  # not a batch: a schema for SchemaRegistry.add_frame

FLAG_NAMES = {
    RESERVED: "reserved",
    SCHEMA_ID: "schema_id",
    SINGLE: "single",
    MASK: "mask",
    TARGET: "target",
    TARGET_MASK: "target_mask",
    SIGNS: "signs",
    SCHEMA_FRAME: "schema_frame",
}


def make_header(flags: int) -> bytes:
    return bytes((_MAGIC | VERSION, flags))


def read_header(frame: bytes, limits: Limits = DEFAULT_LIMITS) -> int:
    """Check size, magic and version of untrusted bytes; return the flags byte."""
    if len(frame) > limits.max_frame_bytes:
        raise CodecError(
            "too_large", f"frame of {len(frame)} bytes exceeds {limits.max_frame_bytes}"
        )
    if len(frame) < 2 or frame[0] & 0xF0 != _MAGIC:
        raise CodecError("bad_magic", "not a streampipe frame (bad magic byte)")
    if frame[0] & 0x0F not in _READABLE:
        raise CodecError(
            "unsupported_version",
            f"streampipe frame format version {frame[0] & 0x0F} is not supported "
            f"(this build reads {sorted(_READABLE)})",
        )
    return frame[1]
