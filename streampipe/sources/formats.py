"""Readings as the MQTT messages real devices publish: Zigbee2MQTT, Tasmota, Shelly,
ESPHome and Sparkplug B.

``streampipe sensors --format FORMAT`` publishes the simulated fleet through one of
these encoders, so ``streampipe ingest`` can be tried (and tested) against payloads of
the shape each kind of device sends, and mapped back with the matching mapping file in
``examples/ingest/<format>.toml``. What each encoder sends for one reading:

=========  ==========================================  ===================================
format     topic                                       payload
=========  ==========================================  ===================================
z2m        ``zigbee2mqtt/<device>`` (retained, as      one JSON object: the features and
           Zigbee2MQTT does)                           ``power`` at the top level, a plug's
                                                       ``voltage``, ``linkquality``,
                                                       ``state: "ON"``
tasmota    ``tele/<device>/SENSOR``                    ``Time`` (local, no offset),
                                                       ``ENERGY`` {Power, Voltage,
                                                       Current}, ``BME280`` {Temperature,
                                                       Humidity, Pressure}, ``ANALOG``
                                                       {Range1: vibration}
shelly     ``<device>/events/rpc``                     a Gen2 ``NotifyStatus``:
                                                       ``switch:0`` {apower, voltage,
                                                       current, temperature.tC}, add-on
                                                       ``humidity:100``, ``voltmeter:100``
                                                       (vibration), ``bthomesensor:200``
                                                       (pressure)
esphome    ``<device>/sensor/<name>/state``, one       the value as text, with the sensor's
           per value, the target last (retained, as    decimals
           ESPHome does)
sparkplug  ``spBv1.0/<group>/NBIRTH/<node>`` once,     Sparkplug B protobuf: the birth
           ``…/DBIRTH/<node>/<device>`` once per       declares every metric with an alias;
           device, then ``…/DDATA/<node>/<device>``    DATA carries the changed ones by
                                                       alias; ``seq`` counts the node's
                                                       messages
=========  ==========================================  ===================================

The fleet simulates no mains voltage: plugs report the nominal :data:`MAINS_VOLTS`,
and a JSON source that takes every numeric field gets a constant feature, which a
scaled linear model ignores. A feature a reading lacks (a simulated dropout) is left
out of the payload, as a device leaves out a value it could not read.

>>> from streampipe.readings import Reading
>>> r = Reading("plug-1", 0, 1_700_000_000.0, {"current": 0.52, "temperature": 21.5}, 118.2)
>>> (m,) = encoder("z2m").encode(r)
>>> m.topic, m.retain
('zigbee2mqtt/plug-1', True)
>>> m.payload.decode()[:60]
'{"current":0.52,"temperature":21.5,"power":118.2,"voltage":2'
>>> [m.topic for m in encoder("esphome").encode(r)]
['plug-1/sensor/current/state', 'plug-1/sensor/temperature/state', 'plug-1/sensor/power/state']
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import orjson

from streampipe.ingest import sparkplug
from streampipe.readings import Reading
from streampipe.sources.simulate import DECIMALS, TARGET

__all__ = [
    "DEVICES",
    "FORMATS",
    "MAINS_VOLTS",
    "ESPHome",
    "Encoder",
    "FormatPublisher",
    "Outgoing",
    "Shelly",
    "Sparkplug",
    "Tasmota",
    "Zigbee2MQTT",
    "encoder",
]

#: The nominal mains voltage plugs report (the fleet does not simulate it).
MAINS_VOLTS = 230.0


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One MQTT message a device publishes."""

    topic: str
    payload: bytes
    retain: bool = False

    def __post_init__(self) -> None:
        if not self.topic or any(c in self.topic for c in "+#"):
            raise ValueError(f"{self.topic!r} is not a topic to publish to")


class Encoder(Protocol):
    """Turns readings into the messages one kind of device publishes, in order."""

    name: str

    def encode(self, reading: Reading) -> list[Outgoing]:
        """The messages that carry ``reading`` (a stateful encoder may add births)."""
        ...


def _json(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc)


@dataclass
class Zigbee2MQTT:
    """A Zigbee2MQTT smart plug with sensors: one JSON object per state change."""

    base_topic: str = "zigbee2mqtt"
    target: str = TARGET
    name: str = "z2m"

    def encode(self, reading: Reading) -> list[Outgoing]:
        doc: dict[str, Any] = dict(reading.x)
        if reading.y is not None:
            doc[self.target] = reading.y
        doc.update(voltage=MAINS_VOLTS, linkquality=_linkquality(reading.device), state="ON")
        return [Outgoing(f"{self.base_topic}/{reading.device}", _json(doc), retain=True)]


def _linkquality(device: str) -> int:
    """A steady link quality per device (0–255, as Zigbee2MQTT reports it)."""
    return 60 + sum(device.encode()) % 120


#: Where a Tasmota ``SENSOR`` message carries each simulated value: (object, key).
TASMOTA_KEYS = {
    "current": ("ENERGY", "Current"),
    "temperature": ("BME280", "Temperature"),
    "humidity": ("BME280", "Humidity"),
    "pressure": ("BME280", "Pressure"),
    "vibration": ("ANALOG", "Range1"),  # an analog vibration transmitter on A0
}


@dataclass
class Tasmota:
    """A Tasmota plug with a BME280 and an analog input: ``tele/<device>/SENSOR`` at
    each TelePeriod, ``Time`` in the device's local time without an offset (Tasmota's
    default), to the second."""

    timezone: str = "UTC"
    name: str = "tasmota"

    def __post_init__(self) -> None:
        self._zone = ZoneInfo(self.timezone)

    def encode(self, reading: Reading) -> list[Outgoing]:
        local = datetime.fromtimestamp(reading.ts, self._zone).replace(tzinfo=None)
        doc: dict[str, Any] = {"Time": local.isoformat(timespec="seconds")}
        energy: dict[str, Any] = {}
        if reading.y is not None:
            energy["Power"] = reading.y
        energy["Voltage"] = MAINS_VOLTS
        doc["ENERGY"] = energy
        for name, value in reading.x.items():
            obj, key = TASMOTA_KEYS.get(name, ("ANALOG", name))
            doc.setdefault(obj, {})[key] = value
        if "BME280" in doc:
            doc["PressureUnit"] = "hPa"
        doc["TempUnit"] = "C"
        return [Outgoing(f"tele/{reading.device}/SENSOR", _json(doc))]


#: Where a Shelly Gen2 ``NotifyStatus`` carries each simulated value: (component, path).
SHELLY_KEYS = {
    "current": ("switch:0", ("current",)),
    "temperature": ("switch:0", ("temperature", "tC")),
    "humidity": ("humidity:100", ("rh",)),  # Plus Add-on with a DHT22
    "vibration": ("voltmeter:100", ("xvoltage",)),  # Add-on 0-10 V input, transformed
    "pressure": ("bthomesensor:200", ("value",)),  # a BTHome sensor paired to it
}


@dataclass
class Shelly:
    """A Shelly Gen2 switch (Plus 1PM) with add-ons: a ``NotifyStatus`` per change on
    ``<device>/events/rpc``, only the components that changed."""

    name: str = "shelly"

    def encode(self, reading: Reading) -> list[Outgoing]:
        params: dict[str, Any] = {"ts": round(reading.ts, 2)}
        switch: dict[str, Any] = {"id": 0}
        if reading.y is not None:
            switch["apower"] = reading.y
        switch["voltage"] = MAINS_VOLTS
        params["switch:0"] = switch
        for name, value in reading.x.items():
            component, path = SHELLY_KEYS.get(name, (f"{name}:0", ("value",)))
            obj = params.setdefault(component, {"id": int(component.rsplit(":", 1)[1])})
            for key in path[:-1]:
                obj = obj.setdefault(key, {})
            obj[path[-1]] = value
            if path == ("temperature", "tC"):
                obj["tF"] = round(value * 9 / 5 + 32, 1)
        doc = {
            "src": reading.device,
            "dst": f"{reading.device}/events",
            "method": "NotifyStatus",
            "params": params,
        }
        return [Outgoing(f"{reading.device}/events/rpc", _json(doc))]


@dataclass
class ESPHome:
    """An ESPHome node: each sensor's state on its own topic, as text with the sensor's
    ``accuracy_decimals``, retained (ESPHome's default); the target is published last,
    so a gateway can close the reading when it arrives."""

    target: str = TARGET
    retain: bool = True
    name: str = "esphome"

    def encode(self, reading: Reading) -> list[Outgoing]:
        values = list(reading.x.items())
        if reading.y is not None:
            values.append((self.target, reading.y))
        return [
            Outgoing(f"{reading.device}/sensor/{name}/state", _text(name, v), self.retain)
            for name, v in values
        ]


def _text(name: str, value: float) -> bytes:
    decimals = DECIMALS.get(name)
    return (f"{value:.{decimals}f}" if decimals is not None else repr(value)).encode()


@dataclass
class _Node:
    seq: int = 0  # the next message's seq
    born: set[str] = field(default_factory=set)  # devices with a DBIRTH
    aliases: dict[tuple[str, str], int] = field(default_factory=dict)  # (device, metric)
    last: dict[str, dict[str, float]] = field(default_factory=dict)  # device -> metric


@dataclass
class Sparkplug:
    """A Sparkplug B edge node ``node`` of group ``group`` with the devices as its
    devices: an NBIRTH first, a DBIRTH for each device before its first DDATA, then
    report by exception (only metrics that changed, by alias). Metric names are the
    value names capitalised (``Temperature``, …, ``Power``)."""

    group: str = "streampipe"
    node: str = "sensors"
    target: str = TARGET
    bdseq: int = 0
    name: str = "sparkplug"
    _node: _Node | None = None

    def _next_seq(self, node: _Node) -> int:
        seq, node.seq = node.seq, (node.seq + 1) % sparkplug.SEQ_MODULO
        return seq

    def encode(self, reading: Reading) -> list[Outgoing]:
        out = []
        node = self._node
        if node is None:
            node = self._node = _Node()
            birth = sparkplug.encode_birth({}, seq=0, bdseq=self.bdseq, ts=reading.ts)
            node.seq = 1
            out.append(Outgoing(sparkplug.topic(self.group, "NBIRTH", self.node), birth))
        values = {metric_name(k): v for k, v in reading.x.items()}
        if reading.y is not None:
            values[metric_name(self.target)] = reading.y
        device = reading.device
        if device not in node.born:
            for metric in values:
                node.aliases.setdefault((device, metric), len(node.aliases) + 1)
            aliases = {m: node.aliases[(device, m)] for m in values}
            payload = sparkplug.encode_birth(
                values, seq=self._next_seq(node), aliases=aliases, ts=reading.ts
            )
            node.born.add(device)
            node.last[device] = dict(values)
            kind = "DBIRTH"
        else:
            last = node.last[device]
            new = [m for m in values if (device, m) not in node.aliases]
            if new:  # a metric the birth did not declare: a real node rebirths the device
                node.born.discard(device)
                return out + self.encode(reading)
            changed = {m: v for m, v in values.items() if last.get(m) != v}
            last.update(changed)
            aliases = {m: node.aliases[(device, m)] for m in changed}
            payload = sparkplug.encode_data(
                changed, seq=self._next_seq(node), aliases=aliases, ts=reading.ts
            )
            kind = "DDATA"
        out.append(Outgoing(sparkplug.topic(self.group, kind, self.node, device), payload))
        return out


def metric_name(name: str) -> str:
    """The Sparkplug metric name of a value: ``temperature`` → ``Temperature``."""
    return name[:1].upper() + name[1:]


#: The formats ``streampipe sensors --format`` takes, and how to make their encoders.
FORMATS: dict[str, Callable[..., Encoder]] = {
    "z2m": Zigbee2MQTT,
    "tasmota": Tasmota,
    "shelly": Shelly,
    "esphome": ESPHome,
    "sparkplug": Sparkplug,
}


#: Each format's devices and where they publish, in a phrase (``streampipe demo``).
DEVICES = {
    "z2m": "Zigbee2MQTT devices on zigbee2mqtt/<device>",
    "tasmota": "Tasmota devices on tele/<device>/SENSOR",
    "shelly": "Shelly Gen2 devices on <device>/events/rpc",
    "esphome": "ESPHome nodes on <device>/sensor/<name>/state",
    "sparkplug": "Sparkplug B devices on spBv1.0/streampipe/DDATA/sensors/<device>",
}


def encoder(name: str, **options: Any) -> Encoder:
    """A new encoder of format ``name`` (one of :data:`FORMATS`)."""
    try:
        make = FORMATS[name]
    except KeyError:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {name!r}") from None
    return make(**options)


@dataclass
class FormatStats:
    readings: int = 0
    dropped_readings: int = 0


class FormatPublisher:
    """Publishes readings through an :class:`Encoder` (QoS 1, retained where the format
    retains), with the loop-facing methods of :class:`~streampipe.publish.ReadingPublisher`
    that ``streampipe sensors`` uses. Like it, it keeps a bounded backlog while the broker
    is away: beyond ``backlog`` unacknowledged messages a reading is dropped and counted.
    """

    def __init__(self, conn: Any, enc: Encoder, backlog: int = 10_000) -> None:
        self.conn = conn
        self.encoder = enc
        self.backlog = backlog
        self.stats = FormatStats()
        self._pending: deque[Any] = deque()  # MQTTMessageInfo, oldest first

    def add(self, reading: Reading) -> None:
        self.flush_due()
        self.stats.readings += 1
        if len(self._pending) >= self.backlog and self.conn.connected:
            self.wait_acked(1.0, keep=self.backlog // 2)  # connected: a full backlog is speed
        if len(self._pending) >= self.backlog:
            self.stats.dropped_readings += 1
            return
        for m in self.encoder.encode(reading):
            self._pending.append(self.conn.publish(m.topic, m.payload, qos=1, retain=m.retain))

    def flush_due(self) -> None:
        """Forget the messages the broker acknowledged (each message is sent at once)."""
        while self._pending and self._pending[0].is_published():
            self._pending.popleft()

    def next_due(self) -> float | None:
        return None  # nothing is held back

    def wait_acked(self, timeout: float, keep: int = 0) -> bool:
        """Wait until at most ``keep`` messages are unacknowledged."""
        deadline = time.monotonic() + timeout
        while len(self._pending) > keep:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._pending[0].wait_for_publish(left)
            self.flush_due()
        return True
