"""A mapping file (TOML): one ``[[source]]`` per kind of device, checked at start-up.

Every mistake is one line naming the file, the source, the key and what was expected
(here: ``timestamp.format must be one of unix, unix_ms, iso8601, not 'epoch'``),
raised as :class:`MappingError`; unknown keys are mistakes too (a typo must not
silently map nothing).

>>> load_mapping_text('''
... [[source]]
... name = "tasmota"
... topic = "tele/{device}/SENSOR"
... device = "tasmota.{device}"
... target = "$.ENERGY.Power"
... timestamp = { path = "$.Time", format = "epoch" }
... ''', "ingest.toml")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
streampipe.ingest.mapping.MappingError: ingest.toml: source 'tasmota': timestamp.format ...
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jsonpath

from streampipe.ingest.assemble import MAX_WAIT, ValueRule, ValueSource
from streampipe.ingest.base import Source
from streampipe.ingest.json_source import (
    TIMESTAMP_FORMATS,
    CounterRule,
    FieldRule,
    JsonSource,
    MatchRule,
    TimestampRule,
    compile_path,
)
from streampipe.ingest.topic import TemplateError, TopicTemplate, names_in

__all__ = [
    "MappingError",
    "build_source",
    "load_mapping",
    "load_mapping_text",
    "shipped_mapping",
    "shipped_mapping_names",
]

FORMATS = ("json", "value", "sparkplug")
MERGES = ("none", "last")
_COMMON = {"name", "topic", "exclude", "device", "format", "target", "features"}
_KEYS = {
    "json": _COMMON | {"timestamp", "match", "merge", "counter"},
    "value": _COMMON | {"emit_after", "max_wait"},
    "sparkplug": {"name", "format", "group", "target", "features", "device", "node_device"}
    | {"rebirth", "rebirth_interval"},
}
_FEATURE_KEYS = {"json": {"path", "type", "map"}, "value": {"field", "type", "map"}}
_TYPES = ("float",)


class MappingError(ValueError):
    """A mistake in a mapping file or in the one-flag form, as one line."""


def load_mapping(path: str | Path) -> list[Source]:
    """The sources of the mapping file at ``path``, in file order (the gateway asks
    them in that order which one claims a topic)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MappingError(f"{path}: cannot read it ({e.strerror or e})") from None
    return load_mapping_text(text, path.name)


def _shipped() -> Any:
    # Package data, not the checkout's examples/ingest/ (links to these files): a
    # non-editable install has no checkout.
    return resources.files("streampipe.ingest").joinpath("examples")


def shipped_mapping_names() -> list[str]:
    """The mappings installed with streampipe, one per ``streampipe sensors --format``.

    >>> shipped_mapping_names()
    ['esphome', 'shelly', 'sparkplug', 'tasmota', 'z2m']
    """
    return sorted(f.name[: -len(".toml")] for f in _shipped().iterdir() if f.name.endswith(".toml"))


def shipped_mapping(name: str) -> list[Source]:
    """The sources of a mapping installed with streampipe (``examples/ingest/NAME.toml``
    in the checkout).

    >>> [(s.name, s.filters()) for s in shipped_mapping("z2m")]
    [('z2m', ['zigbee2mqtt/+'])]
    """
    if name not in shipped_mapping_names():
        raise MappingError(
            f"no shipped mapping {name!r}: one of {', '.join(shipped_mapping_names())}"
        )
    text = _shipped().joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return load_mapping_text(text, f"{name}.toml")


def load_mapping_text(text: str, where: str = "mapping") -> list[Source]:
    """The sources a mapping file's text describes; ``where`` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MappingError(f"{where}: not TOML ({e})") from None
    unknown = set(data) - {"source"}
    if unknown:
        raise MappingError(f"{where}: unknown key {sorted(unknown)[0]!r} (expected [[source]])")
    tables = data.get("source")
    if not isinstance(tables, list) or not tables:
        raise MappingError(f"{where}: no [[source]] (at least one is needed)")
    sources: list[Source] = []
    names: set[str] = set()
    for i, table in enumerate(tables, 1):
        label = f"source #{i}"
        if isinstance(table, dict) and isinstance(table.get("name"), str):
            label = f"source {table['name']!r}"
        source = _Reader(f"{where}: {label}").source(table)
        if source.name in names:
            raise MappingError(f"{where}: {label}: name is used by an earlier source")
        names.add(source.name)
        sources.append(source)
    return sources


def build_source(
    topic: str,
    target: str | None = None,
    exclude: Iterable[str] = (),
    features: Sequence[str] | None = None,
    device: str | None = None,
    name: str = "ingest",
) -> Source:
    """The one-flag form of ``streampipe ingest``: a JSON source from a topic template.

    ``features`` are JSONPaths (``"$.voltage"``, named by their last member) or
    ``"name=$.path"``; ``None`` takes every numeric field. ``device`` defaults to the
    template's ``{device}``.

    >>> src = build_source("zigbee2mqtt/{device}", target="$.power",
    ...                    exclude=["zigbee2mqtt/bridge/#"])
    >>> src.filters(), src.claims("zigbee2mqtt/bridge/state")
    (['zigbee2mqtt/+'], False)
    """
    table: dict[str, Any] = {"name": name, "topic": topic, "exclude": list(exclude)}
    if target is not None:
        table["target"] = target
    if device is not None:
        table["device"] = device
    if features is not None:
        named: dict[str, str] = {}
        for spec in features:
            key, sep, path = spec.partition("=")
            if not sep:
                path = spec
                key = _last_member(spec)
            named[key.strip()] = path.strip()
        table["features"] = named
    return _Reader("ingest").source(table)


def _last_member(path: str) -> str:
    try:
        segment = compile_path(path).segments[-1]
        return str(segment.selectors[0].name)
    except (jsonpath.JSONPathError, IndexError, AttributeError):
        raise MappingError(
            f"ingest: feature {path!r} needs a name: give it as name=$.path"
        ) from None


class _Reader:
    """Reads one source table; every error is prefixed with where it is."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, message: str) -> MappingError:
        return MappingError(f"{self.where}: {message}")

    def source(self, table: Any) -> Source:
        if not isinstance(table, dict):
            raise self.fail("must be a table")
        fmt = table.get("format", "json")
        if fmt not in FORMATS:
            raise self.fail(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
        self.known(table, _KEYS[fmt], "")
        name = self.string(table, "name", required=True)
        if fmt == "sparkplug":
            return self.sparkplug_source(table, name)
        template = self.template(table)
        device = self.device(table, template)
        if fmt == "value":
            return self.value_source(table, name, template, device)
        return JsonSource(
            name,
            template,
            device,
            target=self.field_rule("target", table["target"]) if "target" in table else None,
            features=self.features(table.get("features"), "json"),
            timestamp=self.timestamp(table.get("timestamp")),
            match=self.match(table.get("match")),
            merge=self.choice(table, "merge", MERGES, "none"),
            counter=self.counter(table.get("counter")),
        )

    def value_source(self, table, name, template, device) -> ValueSource:
        if "field" not in template.names:
            raise self.fail(
                f'topic {template.template!r} needs a {{field}} level for format = "value"'
            )
        target = table.get("target")
        target_enum = None
        if isinstance(target, dict):
            self.known(target, {"field", "type", "map"}, "target.")
            target_enum = self.enum(target, "target.")
            target = target.get("field")
        if target is not None and not isinstance(target, str):
            raise self.fail(f"target must be a field name (a {{field}} level), not {target!r}")
        emit_after = self.seconds(table, "emit_after", None)
        max_wait = self.seconds(table, "max_wait", MAX_WAIT)
        if emit_after is not None and emit_after > max_wait:
            raise self.fail(f"emit_after ({emit_after:g}) must not exceed max_wait ({max_wait:g})")
        rules = self.features(table.get("features"), "value")
        return ValueSource(
            name,
            template,
            device,
            target=target,
            target_enum=target_enum,
            features=rules,
            emit_after=emit_after,
            max_wait=max_wait,
        )

    def sparkplug_source(self, table: dict, name: str) -> Source:
        from streampipe.ingest.sparkplug import SparkplugSource

        group = self.string(table, "group") or "+"
        if group != "+" and any(c in group for c in "+#/"):
            raise self.fail(f"group must be one group id or '+', not {group!r}")
        target = self.string(table, "target") or None
        features = table.get("features")
        if features is not None and not (
            isinstance(features, list) and all(isinstance(f, str) and f for f in features)
        ):
            raise self.fail('features must be a list of metric names for format = "sparkplug"')
        rebirth = table.get("rebirth", False)
        if not isinstance(rebirth, bool):
            raise self.fail(f"rebirth must be true or false, not {rebirth!r}")
        kwargs: dict[str, Any] = {}
        for key in ("device", "node_device"):
            if key in table:
                if not isinstance(table[key], str):
                    raise self.fail(f"{key} must be a string, not {table[key]!r}")
                kwargs[key] = table[key]
        if "rebirth_interval" in table:
            kwargs["rebirth_interval"] = self.seconds(table, "rebirth_interval", None)
        return SparkplugSource(
            name=name, group=group, target=target, features=features, rebirth=rebirth, **kwargs
        )

    # --- keys -----------------------------------------------------------------------

    def known(self, table: dict, allowed: set[str], prefix: str) -> None:
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise self.fail(
                f"unknown key {prefix}{unknown[0]} (expected one of {', '.join(sorted(allowed))})"
            )

    def string(self, table: dict, key: str, required: bool = False) -> str:
        value = table.get(key)
        if value is None and not required:
            return ""
        if not isinstance(value, str) or not value:
            raise self.fail(f"{key} must be a non-empty string" + ("" if value else " (missing)"))
        return value

    def choice(self, table: dict, key: str, options: tuple[str, ...], default: str) -> str:
        value = table.get(key, default)
        if value not in options:
            raise self.fail(f"{key} must be one of {', '.join(options)}, not {value!r}")
        return value

    def seconds(self, table: dict, key: str, default: float | None) -> float | None:
        value = table.get(key, default)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (math.isfinite(value) and value > 0)
        ):
            raise self.fail(f"{key} must be a positive number of seconds, not {value!r}")
        return float(value)

    def template(self, table: dict) -> TopicTemplate:
        topic = self.string(table, "topic", required=True)
        exclude = table.get("exclude", [])
        if isinstance(exclude, str):
            exclude = [exclude]
        if not isinstance(exclude, list) or not all(isinstance(p, str) and p for p in exclude):
            raise self.fail("exclude must be a list of MQTT topic filters")
        try:
            return TopicTemplate(topic, exclude)
        except TemplateError as e:
            raise self.fail(str(e)) from None

    def device(self, table: dict, template: TopicTemplate) -> str:
        device = table.get("device")
        if device is None:
            if "device" not in template.names:
                raise self.fail(
                    f"device is needed: topic {template.template!r} has no {{device}} level"
                )
            return "{device}"
        try:
            used = names_in(device) if isinstance(device, str) else None
        except TemplateError as e:
            raise self.fail(f"device {e}") from None
        if used is None:
            raise self.fail(f"device must be a string, not {device!r}")
        for name in used:
            if name not in template.names:
                raise self.fail(
                    f"device uses {{{name}}}, which topic {template.template!r} does not name"
                )
        return device

    def path(self, value: Any, key: str) -> jsonpath.JSONPath:
        if not isinstance(value, str):
            raise self.fail(f'{key} must be a JSONPath string like "$.a.b", not {value!r}')
        try:
            return compile_path(value)
        except jsonpath.JSONPathError as e:
            first = str(e).splitlines()[0]
            raise self.fail(f"{key} is not a JSONPath (RFC 9535): {value!r}: {first}") from None

    def enum(self, spec: dict, prefix: str) -> dict[str, float] | None:
        kind = spec.get("type", "float")
        if kind not in _TYPES:
            raise self.fail(f"{prefix}type must be one of {', '.join(_TYPES)}, not {kind!r}")
        table = spec.get("map")
        if table is None:
            return None
        if not isinstance(table, dict) or not table:
            raise self.fail(f"{prefix}map must be a table like {{ ON = 1, OFF = 0 }}")
        out = {}
        for key, value in table.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self.fail(f"{prefix}map.{key} must be a number, not {value!r}")
            out[str(key)] = float(value)
        return out

    def field_rule(self, key: str, spec: Any) -> FieldRule:
        if isinstance(spec, str):
            return FieldRule(key, self.path(spec, key))
        if not isinstance(spec, dict):
            raise self.fail(f"{key} must be a JSONPath or a table {{ path = ... }}, not {spec!r}")
        self.known(spec, _FEATURE_KEYS["json"], f"{key}.")
        if "path" not in spec:
            raise self.fail(f"{key}.path is missing")
        return FieldRule(key, self.path(spec["path"], f"{key}.path"), self.enum(spec, f"{key}."))

    def features(self, table: Any, fmt: str) -> list | None:
        if table is None:
            return None
        if not isinstance(table, dict) or not table:
            raise self.fail('features must be a table: [source.features] name = "$.path"')
        rules: list = []
        for name, spec in table.items():
            key = f"features.{name}"
            if fmt == "value":
                rules.append(self.value_rule(name, spec, key))
            elif name == "*":
                rules.append(FieldRule("*", self.path(spec, key), wildcard=True))
            else:
                rule = self.field_rule(key, spec)
                rules.append(FieldRule(name, rule.path, rule.enum))
        return rules

    def value_rule(self, name: str, spec: Any, key: str) -> ValueRule:
        if spec is True or spec == {}:
            return ValueRule(name, name)
        if isinstance(spec, str):
            return ValueRule(name, spec)
        if not isinstance(spec, dict):
            raise self.fail(
                f"{key} must be a field name or a table {{ field = ... }}, not {spec!r}"
            )
        self.known(spec, _FEATURE_KEYS["value"], f"{key}.")
        field_name = spec.get("field", name)
        if not isinstance(field_name, str) or not field_name:
            raise self.fail(f"{key}.field must be a field name, not {field_name!r}")
        return ValueRule(name, field_name, self.enum(spec, f"{key}."))

    def timestamp(self, spec: Any) -> TimestampRule | None:
        if spec is None:
            return None
        if isinstance(spec, str):
            spec = {"path": spec}
        if not isinstance(spec, dict):
            raise self.fail("timestamp must be a table { path = ..., format = ... }")
        self.known(spec, {"path", "format", "timezone"}, "timestamp.")
        if "path" not in spec:
            raise self.fail("timestamp.path is missing")
        path = self.path(spec["path"], "timestamp.path")
        fmt = spec.get("format", "unix")
        if fmt not in TIMESTAMP_FORMATS:
            raise self.fail(
                f"timestamp.format must be one of {', '.join(TIMESTAMP_FORMATS)}, not {fmt!r}"
            )
        zone = None
        if "timezone" in spec:
            if fmt != "iso8601":
                raise self.fail('timestamp.timezone is for format = "iso8601" only')
            try:
                zone = ZoneInfo(str(spec["timezone"]))
            except (ZoneInfoNotFoundError, ValueError):
                raise self.fail(
                    f'timestamp.timezone must be an IANA time zone like "Europe/Berlin", '
                    f"not {spec['timezone']!r}"
                ) from None
        return TimestampRule(path, fmt, zone)

    def match(self, spec: Any) -> MatchRule | None:
        if spec is None:
            return None
        if not isinstance(spec, dict):
            raise self.fail("match must be a table { path = ..., equals = ... }")
        self.known(spec, {"path", "equals"}, "match.")
        for key in ("path", "equals"):
            if key not in spec:
                raise self.fail(f"match.{key} is missing")
        return MatchRule(self.path(spec["path"], "match.path"), spec["equals"])

    def counter(self, spec: Any) -> CounterRule | None:
        if spec is None:
            return None
        if isinstance(spec, str):
            spec = {"path": spec}
        if not isinstance(spec, dict):
            raise self.fail("counter must be a JSONPath or a table { path = ..., modulo = ... }")
        self.known(spec, {"path", "modulo"}, "counter.")
        if "path" not in spec:
            raise self.fail("counter.path is missing")
        modulo = spec.get("modulo", 2**32)
        if modulo == 0:
            modulo = None
        elif isinstance(modulo, bool) or not isinstance(modulo, int) or modulo < 2:
            raise self.fail(
                f"counter.modulo must be an integer ≥ 2 (or 0: never wraps), not {modulo!r}"
            )
        return CounterRule(self.path(spec["path"], "counter.path"), modulo)
