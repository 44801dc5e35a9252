"""A source whose payloads are JSON documents: Zigbee2MQTT, Tasmota, Shelly Gen2,
OwnTracks, The Things Stack, …

Fields are picked with JSONPath (RFC 9535, python-jsonpath), compiled once when the
mapping is loaded. What a message becomes:

* the **device** is the source's device template filled from the topic's wildcards,
  and must be a valid device id (else ``invalid_device``);
* the **target** (``y``) is the value at ``target``; a message without it is still a
  reading (``y=None``: the edge predicts, it cannot learn);
* the **features** (``x``) are the mapped ones, or without a ``[source.features]``
  table every JSON number and boolean of the payload (nested objects flattened as
  ``a.b``, arrays as ``a_0``, ``a_1``), the target excepted; text is left out unless
  mapped (a numeric string is taken only when mapped: ids like ``"0004A30B…"`` or
  ``"2147483647"`` are not measurements);
* a message with neither target nor feature is a dead letter (``path_missing``),
  except with ``merge = "last"``, where partial updates that touch no mapped field
  are normal (Shelly's ``NotifyStatus`` for the cloud connection) and only counted.

>>> src = JsonSource("z2m", TopicTemplate("zigbee2mqtt/{device}"), "z2m.{device}",
...                  target=FieldRule("power", compile_path("$.power")))
>>> m, = src.map(Incoming("zigbee2mqtt/plug", b'{"power": 12.5, "voltage": 230, "state": "ON"}'))
>>> m.device, m.x, m.y
('z2m.plug', {'voltage': 230.0}, 12.5)
"""

from __future__ import annotations

import functools
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import jsonpath
import orjson

from streampipe.ingest.base import Incoming, Mapped, Unmappable
from streampipe.ingest.topic import MATCH_CACHE, TopicTemplate, fill
from streampipe.limits import MAX_DEVICES, MAX_FEATURES
from streampipe.topics import InvalidName, check_name

__all__ = [
    "FieldRule",
    "JsonSource",
    "MatchRule",
    "TimestampRule",
    "compile_path",
    "to_number",
]

#: RFC 9535 JSONPath, strictly: what a mapping file says means what the RFC says.
JSONPATH = jsonpath.JSONPathEnvironment(strict=True)
#: Nesting followed when every field of a payload is taken: deeper is not a reading.
MAX_DEPTH = 8
TIMESTAMP_FORMATS = ("unix", "unix_ms", "iso8601")


def compile_path(path: str) -> jsonpath.JSONPath:
    """Compile a JSONPath once (raises ``jsonpath.JSONPathError`` if it is not one)."""
    compiled = JSONPATH.compile(path)
    if not isinstance(compiled, jsonpath.JSONPath):  # a union of paths (a | b)
        raise jsonpath.JSONPathSyntaxError("one path, not a union", token=None)
    return compiled


def to_number(value: Any, enum: dict[str, float] | None = None) -> float:
    """A field's value as a float: numbers, numeric strings, booleans as 0/1, or an
    enum map's value for a string. Raises ``ValueError`` otherwise.

    >>> to_number("230.5"), to_number(True), to_number("ON", {"ON": 1.0, "OFF": 0.0})
    (230.5, 1.0, 1.0)
    """
    if enum is not None:
        key = str(value).lower() if isinstance(value, bool) else str(value)
        if key in enum:
            return enum[key]
        raise ValueError(f"{value!r} is none of {', '.join(enum)}")
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
    else:
        raise ValueError(f"{type(value).__name__} {_short(value)} is not a number")
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True, slots=True)
class FieldRule:
    """One mapped field: a feature (``name`` is the feature's) or the target.

    ``wildcard`` takes every numeric field under ``path`` (``"*" = "$.ENERGY"``).
    """

    name: str
    path: jsonpath.JSONPath
    enum: dict[str, float] | None = None
    wildcard: bool = False


@dataclass(frozen=True, slots=True)
class TimestampRule:
    path: jsonpath.JSONPath
    format: str = "unix"  # unix | unix_ms | iso8601
    timezone: ZoneInfo | None = None  # for ISO 8601 times without an offset

    def parse(self, value: Any) -> float:
        """Unix seconds; raises ``ValueError``."""
        if self.format == "iso8601":
            if not isinstance(value, str):
                raise ValueError(f"{_short(value)} is not an ISO 8601 string")
            try:
                when = datetime.fromisoformat(value.strip())
            except ValueError:
                raise ValueError(f"{value!r} is not ISO 8601") from None
            if when.tzinfo is None:
                if self.timezone is None:
                    raise ValueError(f"{value!r} has no UTC offset and the source no timezone")
                when = when.replace(tzinfo=self.timezone)
            return when.timestamp()
        number = to_number(value) if not isinstance(value, bool) else math.nan
        if not math.isfinite(number):
            raise ValueError(f"{_short(value)} is not a Unix time")
        return number / 1000.0 if self.format == "unix_ms" else number


@dataclass(frozen=True, slots=True)
class MatchRule:
    """Only messages whose ``path`` equals ``equals`` are this source's readings."""

    path: jsonpath.JSONPath
    equals: Any


@dataclass(frozen=True, slots=True)
class CounterRule:
    """The device's own message counter (``f_cnt``), modulo ``modulo`` if it wraps."""

    path: jsonpath.JSONPath
    modulo: int | None = 2**32


_SEGMENT = re.compile(r"\['([^'\\]*)'\]|\[(-?\d+)\]")
#: path -> its keys and indexes, for paths of names and indexes only (None otherwise).
_SIMPLE: dict[int, tuple[jsonpath.JSONPath, tuple[str | int, ...] | None]] = {}


def _keys(path: jsonpath.JSONPath) -> tuple[str | int, ...] | None:
    """The steps of a singular path of member names and indexes (``$.a.b``,
    ``$.a[0]["c:d"]``), which are looked up directly, at a tenth of what the JSONPath
    engine takes; ``None`` for any other path, which the engine evaluates.

    >>> _keys(compile_path('$.params["switch:0"].apower')), _keys(compile_path("$.a[*]"))
    (('params', 'switch:0', 'apower'), None)
    """
    cached = _SIMPLE.get(id(path))
    if cached is not None and cached[0] is path:
        return cached[1]
    text = str(path)
    keys: tuple[str | int, ...] | None = None
    if path.singular_query() and text.startswith("$"):
        steps = list(_SEGMENT.finditer(text, 1))
        if "".join(m.group(0) for m in steps) == text[1:]:
            keys = tuple(m.group(1) if m.group(2) is None else int(m.group(2)) for m in steps)
    _SIMPLE[id(path)] = (path, keys)
    return keys


def _first(path: jsonpath.JSONPath, doc: Any) -> tuple[bool, Any, tuple]:
    keys = _keys(path)
    if keys is None:
        for match in path.finditer(doc):
            return True, match.obj, tuple(match.parts)
        return False, None, ()
    value, at = doc, []
    for key in keys:
        if isinstance(key, str):
            if not isinstance(value, dict) or key not in value:
                return False, None, ()
        else:
            if not isinstance(value, list) or not -len(value) <= key < len(value):
                return False, None, ()
            key = key % len(value)
        value = value[key]
        at.append(key)
    return True, value, tuple(at)


def _flatten(prefix: str, value: Any, out: dict[str, float], skip: tuple, at: tuple, depth: int):
    """Every number and boolean under ``value`` into ``out`` (``a.b``, ``a_0``), except
    the one at path ``skip`` (``value`` is at path ``at``)."""
    if skip and at == skip:
        return
    kind = type(value)
    if kind is dict:
        if depth >= MAX_DEPTH:
            return
        # The path to skip, if it is one of this object's members (else None).
        level = len(at)
        here = skip[level] if len(skip) == level + 1 and skip[:level] == at else None
        for key, item in value.items():
            name = f"{prefix}.{key}" if prefix else key
            kind = type(item)
            if kind is float:  # the common case, without a call
                if key != here and item - item == 0.0:  # finite: 1e999 parses as inf
                    out[name] = item
            elif kind is int or kind is bool:
                if key != here:
                    out[name] = float(item)
            elif kind is dict or kind is list:
                _flatten(name, item, out, skip, (*at, key), depth + 1)
            if len(out) > MAX_FEATURES:
                raise Unmappable("too_many_features", f"more than {MAX_FEATURES} numeric fields")
    elif kind is list:
        if depth >= MAX_DEPTH:
            return
        for i, item in enumerate(value):
            _flatten(f"{prefix}_{i}", item, out, skip, (*at, i), depth + 1)
            if len(out) > MAX_FEATURES:
                raise Unmappable("too_many_features", f"more than {MAX_FEATURES} numeric fields")
    elif kind is float or kind is int or kind is bool:
        number = float(value)
        if math.isfinite(number):
            out[prefix] = number


@dataclass
class JsonSource:
    """One ``[[source]]`` with ``format = "json"`` (see the module docstring)."""

    name: str
    template: TopicTemplate
    device: str
    target: FieldRule | None = None
    features: list[FieldRule] | None = None  # None: every numeric field
    timestamp: TimestampRule | None = None
    match: MatchRule | None = None
    merge: str = "none"  # none | last
    counter: CounterRule | None = None
    #: Messages that were not readings, by why (bounded keys): ``not_matched``
    #: (``match`` said no), ``nothing_new`` (a merged partial update with no mapped field).
    counts: dict[str, int] = field(default_factory=lambda: {"not_matched": 0, "nothing_new": 0})
    # Last value of each feature per device, for merge = "last"; owned by the
    # gateway's thread, like every call of this source.
    _last: OrderedDict[str, dict[str, float]] = field(default_factory=OrderedDict)

    def filters(self) -> list[str]:
        return [self.template.filter]

    def claims(self, topic: str) -> bool:
        return self.template.match(topic) is not None

    def due(self, now: float) -> list[Mapped]:
        return []

    def state(self) -> dict[str, Any]:
        return {"last": {d: dict(x) for d, x in self._last.items()}} if self._last else {}

    def restore(self, state: dict[str, Any]) -> None:
        self._last = OrderedDict(
            (str(d), {str(k): float(v) for k, v in x.items()})
            for d, x in (state.get("last") or {}).items()
        )

    def __post_init__(self) -> None:
        # topic -> its (valid) device id: the same topics come again and again
        self._devices = functools.lru_cache(maxsize=MATCH_CACHE)(self._device_of)

    def device_of(self, topic: str) -> str:
        """The device id ``topic`` names; raises :class:`Unmappable` if it is not a
        valid one."""
        return self._devices(topic)

    def _device_of(self, topic: str) -> str:
        names = self.template.match(topic)
        if names is None:
            raise Unmappable("no_rule", f"{topic!r} is not {self.template.template!r}")
        device = fill(self.device, names)
        try:
            return check_name(device)
        except InvalidName as e:
            raise Unmappable("invalid_device", str(e)) from None

    def map(self, message: Incoming) -> list[Mapped]:
        device = self.device_of(message.topic)
        try:
            doc = orjson.loads(message.payload)
        except orjson.JSONDecodeError as e:
            raise Unmappable("not_json", f"payload is not JSON ({e})") from None
        if self.match is not None:
            found, value, _ = _first(self.match.path, doc)
            if not found or value != self.match.equals:
                self.counts["not_matched"] += 1
                return []
        ts = self._timestamp(doc)
        y, target_at = self._target(doc)
        x = self._features(doc, target_at)
        if self.merge == "last":
            if not x and y is None:
                self.counts["nothing_new"] += 1
                return []
            x = self._merged(device, x)
        elif not x and y is None:
            what = f"target {self.target.path} nor any feature" if self.target else "any feature"
            raise Unmappable("path_missing", f"neither {what} in the payload")
        counter = modulo = None
        if self.counter is not None:
            found, value, _ = _first(self.counter.path, doc)
            if found:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise Unmappable(
                        "not_numeric", f"counter {self.counter.path} is {_short(value)}"
                    )
                modulo = self.counter.modulo
                counter = value % modulo if modulo else value
        meta = {"source": self.name}
        return [Mapped(device, x, y=y, ts=ts, counter=counter, counter_modulo=modulo, meta=meta)]

    def _timestamp(self, doc: Any) -> float | None:
        if self.timestamp is None:
            return None
        found, value, _ = _first(self.timestamp.path, doc)
        if not found:
            raise Unmappable("bad_timestamp", f"no {self.timestamp.path} in the payload")
        try:
            return self.timestamp.parse(value)
        except ValueError as e:
            raise Unmappable("bad_timestamp", f"{self.timestamp.path}: {e}") from None

    def _target(self, doc: Any) -> tuple[float | None, tuple]:
        if self.target is None:
            return None, ()
        found, value, at = _first(self.target.path, doc)
        if not found or value is None:
            return None, ()
        try:
            return to_number(value, self.target.enum), at
        except ValueError as e:
            raise Unmappable("not_numeric", f"target {self.target.path}: {e}") from None

    def _features(self, doc: Any, target_at: tuple) -> dict[str, float]:
        x: dict[str, float] = {}
        if self.features is None:
            _flatten("", doc, x, target_at, (), 0)
            return x
        for rule in self.features:
            for match in rule.path.finditer(doc):
                if rule.wildcard:
                    found: dict[str, float] = {}
                    _flatten("", match.obj, found, target_at, tuple(match.parts), 0)
                    x.update(found)
                else:
                    self._one(rule, match.obj, x)
                break  # a path names one field; the first match is it
        return x

    @staticmethod
    def _one(rule: FieldRule, value: Any, x: dict[str, float]) -> None:
        if value is None:
            return  # Shelly sends null for a key that disappeared: no value, no error
        try:
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if item is not None:
                        x[f"{rule.name}_{i}"] = to_number(item, rule.enum)
            else:
                x[rule.name] = to_number(value, rule.enum)
        except ValueError as e:
            raise Unmappable("not_numeric", f"feature {rule.name!r} ({rule.path}): {e}") from None

    def _merged(self, device: str, x: dict[str, float]) -> dict[str, float]:
        last = self._last.get(device)
        if last is None:
            if len(self._last) >= MAX_DEVICES:
                return x  # beyond the bound a device is mapped unmerged, never evicting others
            last = self._last[device] = {}
        if len(last.keys() | x.keys()) > MAX_FEATURES:
            raise Unmappable("too_many_features", f"{device} would have more than {MAX_FEATURES}")
        last.update(x)
        return dict(last)
