"""One value per topic (``format = "value"``), assembled into one reading per device.

ESPHome publishes each sensor on its own topic (``<node>/sensor/<name>/state``, a
plain number); Home Assistant's MQTT Statestream publishes each entity's state and
attributes on ``<base>/<domain>/<entity>/state`` and ``…/<attribute>``, JSON-encoded
(a string arrives quoted). The template's ``{field}`` level names the value; its other
wildcards make the device.

A device's values wait until its **target** field arrives: then they are one reading
(the target is ``y``, the others ``x``), timed at the target's arrival. A device
without a target field in the mapping is emitted ``emit_after`` seconds after its
first value. Either way a partial reading is held at most ``max_wait`` seconds after
its first value (:meth:`ValueSource.due`): then it is emitted without a target (the
edge can still predict) and counted as ``partial``. Values that do not read as numbers
on a field nobody mapped (``"unavailable"``, ``"unknown"``) are skipped and counted
as ``text``; on a mapped field or the target they are a dead letter (``not_numeric``).

>>> src = ValueSource("esphome", TopicTemplate("esphome/{device}/sensor/{field}/state"),
...                   "esphome.{device}", target="power")
>>> src.map(Incoming("esphome/plug/sensor/voltage/state", b"230.1", arrived=10.0))
[]
>>> m, = src.map(Incoming("esphome/plug/sensor/power/state", b"12.5", arrived=11.0))
>>> m.device, m.x, m.y, m.ts
('esphome.plug', {'voltage': 230.1}, 12.5, 11.0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from streampipe.ingest.base import Incoming, Mapped, Unmappable
from streampipe.ingest.json_source import to_number
from streampipe.ingest.topic import TopicTemplate, fill
from streampipe.limits import MAX_DEVICES, MAX_FEATURES
from streampipe.topics import InvalidName, check_name

__all__ = ["MAX_WAIT", "ValueRule", "ValueSource"]

#: Seconds a partial reading waits for its target by default: ESPHome sensors update
#: every 60 s unless told otherwise, so a value older than that belongs to the past.
MAX_WAIT = 60.0
#: Bytes of one value: a number or a short state, never a document.
MAX_VALUE_BYTES = 256


@dataclass(frozen=True, slots=True)
class ValueRule:
    """A mapped field: the feature ``name`` is read from the topic's ``{field}``
    level ``field``, with an optional enum map (``{ON = 1, OFF = 0}``)."""

    name: str
    field: str
    enum: dict[str, float] | None = None


@dataclass
class ValueSource:
    """One ``[[source]]`` with ``format = "value"`` (see the module docstring)."""

    name: str
    template: TopicTemplate
    device: str
    target: str | None = None  # the {field} whose value is y
    target_enum: dict[str, float] | None = None
    features: list[ValueRule] | None = None  # None: every field that reads as a number
    emit_after: float | None = None
    max_wait: float = MAX_WAIT
    #: Values and readings that were not plain readings, by why (bounded keys).
    counts: dict[str, int] = field(default_factory=lambda: {"partial": 0, "text": 0, "unmapped": 0})
    # device -> {"x": {feature: value}, "first": t, "last": t}; owned by the
    # gateway's thread, like every call of this source.
    _pending: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "field" not in self.template.names:
            raise ValueError(f"topic {self.template.template!r} has no {{field}} level")
        self._by_field = {r.field: r for r in self.features or ()}

    def filters(self) -> list[str]:
        return [self.template.filter]

    def claims(self, topic: str) -> bool:
        return self.template.match(topic) is not None

    def map(self, message: Incoming) -> list[Mapped]:
        names = self.template.match(message.topic)
        if names is None:
            raise Unmappable("no_rule", f"{message.topic!r} is not {self.template.template!r}")
        name = names["field"]
        try:
            device = check_name(fill(self.device, names))
        except InvalidName as e:
            raise Unmappable("invalid_device", str(e)) from None
        raw = self._decode(message.payload)
        now = message.arrived or None
        if name == self.target:
            try:
                y = to_number(raw, self.target_enum)
            except ValueError as e:
                raise Unmappable("not_numeric", f"target {name!r}: {e}") from None
            held = self._pending.pop(device, None)
            x = held["x"] if held else {}
            return [Mapped(device, x, y=y, ts=now, meta={"source": self.name})]
        rule = self._by_field.get(name)
        if rule is None and self.features is not None:
            self.counts["unmapped"] += 1
            return []
        try:
            value = to_number(raw, rule.enum if rule else None)
        except ValueError as e:
            if rule is None:
                self.counts["text"] += 1
                return []
            raise Unmappable("not_numeric", f"feature {rule.name!r}: {e}") from None
        self._hold(device, rule.name if rule else name, value, message.arrived)
        return []

    @staticmethod
    def _decode(payload: bytes) -> Any:
        if len(payload) > MAX_VALUE_BYTES:
            raise Unmappable("not_numeric", f"a value of {len(payload)} bytes")
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise Unmappable("not_numeric", "payload is not UTF-8 text") from None
        try:
            return orjson.loads(text)  # Statestream JSON-encodes: '"on"', '21.5', 'true'
        except orjson.JSONDecodeError:
            return text  # ESPHome's plain text: 'ON', '21.5'

    def _hold(self, device: str, name: str, value: float, arrived: float) -> None:
        held = self._pending.get(device)
        if held is None:
            if len(self._pending) >= MAX_DEVICES:
                raise Unmappable("too_many_devices", f"{MAX_DEVICES} devices hold partial readings")
            held = self._pending[device] = {"x": {}, "first": arrived, "last": arrived}
        if name not in held["x"] and len(held["x"]) >= MAX_FEATURES:
            raise Unmappable("too_many_features", f"{device} holds {MAX_FEATURES} values")
        held["x"][name] = value
        held["last"] = arrived

    def due(self, now: float) -> list[Mapped]:
        """Readings whose time is up: ``emit_after`` passed (no target mapped) or
        ``max_wait`` passed (a partial reading, emitted without a target)."""
        out = []
        for device in list(self._pending):
            held = self._pending[device]
            age = now - held["first"]
            on_time = self.target is None and self.emit_after is not None
            if (on_time and age >= self.emit_after) or age >= self.max_wait:
                del self._pending[device]
                if self.target is not None:
                    self.counts["partial"] += 1
                ts = held["last"] or None
                out.append(Mapped(device, held["x"], ts=ts, meta={"source": self.name}))
        return out

    def state(self) -> dict[str, Any]:
        return {"pending": {d: {**h, "x": dict(h["x"])} for d, h in self._pending.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        self._pending = {
            str(d): {
                "x": {str(k): float(v) for k, v in h["x"].items()},
                "first": float(h["first"]),
                "last": float(h["last"]),
            }
            for d, h in (state.get("pending") or {}).items()
        }
