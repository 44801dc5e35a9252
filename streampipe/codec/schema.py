"""Schemas: a batch's field names, published once so frames can carry a 4-byte id.

A publisher sends ``schema_frame(batch)`` on a retained topic such as
``ROOT/schemas/<id>`` and then ``encode(batch, schema_id=True)``; an edge feeds every
schema frame it receives to :meth:`SchemaRegistry.add_frame` and passes the registry
to ``decode``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack

from streampipe.codec import header
from streampipe.codec.errors import DEFAULT_LIMITS, CodecError, Limits
from streampipe.readings import Batch

__all__ = ["MAX_SCHEMAS", "Schema", "SchemaRegistry", "schema_frame", "unpack_names"]


#: Ids of schemas seen, bounded.
_IDS: dict[Schema, bytes] = {}


@dataclass(frozen=True, slots=True)
class Schema:
    """The field names of a batch: its features and whether it has a target.

    >>> s = Schema(("temp", "rh"), has_target=True)
    >>> s.id
    '2eb6a87b'
    >>> Schema.from_frame(s.frame()) == s
    True
    """

    features: tuple[str, ...]
    has_target: bool

    def __post_init__(self) -> None:
        if not all(isinstance(f, str) for f in self.features):
            raise ValueError("feature names must be str")

    @classmethod
    def of(cls, batch: Batch) -> Schema:
        return cls(tuple(batch.features), batch.target is not None)

    @property
    def id(self) -> str:
        """Eight hex digits: the first 4 bytes of BLAKE2b over the packed names."""
        return self.raw_id.hex()

    @property
    def raw_id(self) -> bytes:
        rid = _IDS.get(self)  # a sensor names the same few schemas in every frame
        if rid is None:
            rid = hashlib.blake2b(self._packed(), digest_size=4).digest()
            if len(_IDS) < 1024:
                _IDS[self] = rid
        return rid

    def _packed(self) -> bytes:
        return msgpack.packb([list(self.features), self.has_target], use_bin_type=True)

    def frame(self) -> bytes:
        """Bytes to publish (retained) on ``ROOT/schemas/<id>``."""
        return header.make_header(header.SCHEMA_FRAME) + self._packed()

    @classmethod
    def from_frame(cls, frame: bytes, limits: Limits = DEFAULT_LIMITS) -> Schema:
        """Parse untrusted schema-frame bytes; raises only :class:`CodecError`."""
        flags = header.read_header(frame, limits)
        if flags != header.SCHEMA_FRAME:
            raise CodecError("malformed", "not a schema frame")
        data = bytes(frame[2:])
        if data[:1] == b"\x92":  # [names, has_target]: count the names before unpacking
            _check_count(data, 1, limits)
        obj = _unpack(data, limits)
        if not (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[1], bool)):
            raise CodecError("malformed", "a schema frame holds [names, has_target]")
        return cls(check_names(obj[0], limits), obj[1])


def _check_count(data: bytes, at: int, limits: Limits) -> None:
    """Reject a msgpack array header at ``data[at]`` announcing too many names."""
    kind = data[at : at + 1]
    if kind == b"\xdc":
        count = int.from_bytes(data[at + 1 : at + 3], "big")
    elif kind == b"\xdd":
        count = int.from_bytes(data[at + 1 : at + 5], "big")
    elif kind and 0x90 <= kind[0] <= 0x9F:
        count = kind[0] & 0x0F
    else:
        return  # not an array: msgpack or check_names will say so
    if count > limits.max_fields:
        raise CodecError("too_many_fields", f"{count} fields exceed {limits.max_fields}")


def _unpack(data: bytes, limits: Limits) -> object:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=limits.max_string_bytes,
            max_bin_len=0,
            max_array_len=max(limits.max_fields, 2),
            max_map_len=0,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # ExtraData, FormatError, StackError and over-limit lengths all land here.
        raise CodecError("malformed", f"bad msgpack in field names: {exc}") from None


def unpack_names(data: bytes, limits: Limits) -> tuple[str, ...]:
    """Field names sent inline: a msgpack array of str."""
    _check_count(data, 0, limits)
    return check_names(_unpack(data, limits), limits)


def check_names(obj: object, limits: Limits) -> tuple[str, ...]:
    """Field names from the wire, inline or in a schema frame: the one place both pass.

    A name that is empty or given twice is refused here, before any model sees it: a
    feature dict would silently keep one of two values, and River's mini-batch API
    refuses such a DataFrame after part of a pipeline has learned from it.
    """
    if not isinstance(obj, list) or not all(isinstance(x, str) for x in obj):
        raise CodecError("malformed", "field names must be an array of strings")
    if len(obj) > limits.max_fields:
        raise CodecError("too_many_fields", f"{len(obj)} fields exceed {limits.max_fields}")
    for name in obj:
        if len(name.encode("utf-8", "surrogatepass")) > limits.max_string_bytes:
            raise CodecError("string_too_long", "a field name is too long")
    if "" in obj:
        raise CodecError("bad_field_names", "a field name is empty")
    if len(set(obj)) != len(obj):
        twice = next(name for i, name in enumerate(obj) if name in obj[:i])
        raise CodecError("bad_field_names", f"field name {twice!r} is given more than once")
    return tuple(obj)


def schema_frame(batch: Batch) -> tuple[str, bytes]:
    """The schema id of ``batch`` and the frame that teaches it to a registry.

    >>> import numpy as np
    >>> b = Batch("d", 0, np.zeros(1, np.int64), np.zeros(1), ("t",), np.zeros((1, 1)))
    >>> sid, frame = schema_frame(b)
    >>> reg = SchemaRegistry()
    >>> reg.add_frame(frame) == sid, sid in reg
    (True, True)
    """
    s = Schema.of(batch)
    return s.id, s.frame()


#: Schemas a registry keeps: a sensor names a few; beyond this the one a frame named
#: least recently is forgotten (:class:`SchemaRegistry`). ~300 bytes each.
MAX_SCHEMAS = 4096
#: The share of a registry kept for schemas no frame has named yet, so that however many
#: schemas frames name, a new one has room to wait for its first frame.
NEW_SHARE = 4


class SchemaRegistry:
    """Schema id -> :class:`Schema`, learnt from schema frames; bounded in size.

    Whoever may publish one schema may publish thousands (sensors may, on the secured
    broker), and retained ones reach every stage started later; so a full registry
    never refuses a schema, it forgets one: the oldest of those no frame has named yet
    (a flood of junk is that). Schemas frames named take at most three quarters of
    it; beyond that, the one named least recently counts as not named again. A new
    schema thus waits for its first frame among at least a quarter of the registry,
    and a frame naming a schema it forgot waits for it like for any unknown one.

    >>> reg = SchemaRegistry(max_schemas=2)
    >>> a, b, c = (Schema((name,), False) for name in "abc")
    >>> sid = reg.add(a)
    >>> reg.get(sid) == a  # a frame names it
    True
    >>> _ = reg.add(b), reg.add(c)  # b, named by no frame, goes first
    >>> sid in reg, b.id in reg, c.id in reg, reg.evicted
    (True, False, True, 1)

    Owned by one thread: :meth:`get`, which decoding a frame calls, reorders it.
    """

    def __init__(self, max_schemas: int = MAX_SCHEMAS) -> None:
        if max_schemas < 1:
            raise ValueError("a schema registry holds at least one schema")
        self.max_schemas = max_schemas
        self._max_used = max(1, max_schemas - max_schemas // NEW_SHARE)
        self._unused: dict[str, Schema] = {}  # named by no frame yet, oldest first
        self._used: dict[str, Schema] = {}  # named by a frame, least recently first
        #: Schemas forgotten to make room for newer ones, ever.
        self.evicted = 0

    def add(self, schema: Schema, *, used: bool = False) -> str:
        """Register ``schema`` (as if a frame had named it, if ``used``); returns its id.
        When the registry is full, another schema is forgotten to make room."""
        sid = schema.id
        if sid in self._used:
            return sid
        if sid in self._unused:
            if used:
                self._named(sid, self._unused.pop(sid))
            return sid
        if len(self) >= self.max_schemas:
            oldest = self._unused or self._used
            del oldest[next(iter(oldest))]
            self.evicted += 1
        if used:
            self._named(sid, schema)
        else:
            self._unused[sid] = schema
        return sid

    def _named(self, sid: str, schema: Schema) -> None:
        """``schema`` is the one a frame named last; the least recently named one is
        no longer counted as named if too many are."""
        self._used[sid] = schema
        if len(self._used) > self._max_used:
            old = next(iter(self._used))
            self._unused[old] = self._used.pop(old)

    def add_frame(
        self,
        frame: bytes,
        schema_id: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
        *,
        used: bool = False,
    ) -> str:
        """Register the schema in untrusted ``frame``; returns its id.

        Pass ``schema_id`` (e.g. the last level of the topic it came on) to reject a
        frame published under an id that is not its own.
        """
        schema = Schema.from_frame(frame, limits)
        if schema_id is not None and schema.id != schema_id:
            raise CodecError(
                "malformed", f"schema frame has id {schema.id}, published as {schema_id!r}"
            )
        return self.add(schema, used=used)

    def get(self, schema_id: str) -> Schema | None:
        """The schema a frame names, which becomes the most recently used; or None."""
        schema = self._used.pop(schema_id, None)
        if schema is not None:
            self._used[schema_id] = schema
            return schema
        schema = self._unused.pop(schema_id, None)
        if schema is not None:
            self._named(schema_id, schema)
        return schema

    def peek(self, schema_id: str) -> Schema | None:
        """The schema of that id, or None, leaving the order alone."""
        return self._used.get(schema_id) or self._unused.get(schema_id)

    def used(self) -> list[str]:
        """The ids of the schemas frames have named, least recently named first."""
        return list(self._used)

    def __contains__(self, schema_id: object) -> bool:
        return schema_id in self._used or schema_id in self._unused

    def __len__(self) -> int:
        return len(self._used) + len(self._unused)

    def __iter__(self) -> Iterator[str]:
        return iter([*self._unused, *self._used])
