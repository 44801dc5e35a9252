"""Sparkplug B: readings from an industrial edge node's BIRTH and DATA messages.

Topics are ``spBv1.0/<group>/<type>/<edge node>[/<device>]``; payloads are Eclipse
Tahu's protobuf ``Payload`` (:mod:`streampipe.ingest._sparkplug_proto`). What this
source keeps per edge node, and why:

* **Aliases.** NBIRTH/DBIRTH name every metric and give it an alias unique across the
  edge node; NDATA/DDATA may carry only the alias. The table is cleared by NBIRTH and
  NDEATH, a device's part of it by DBIRTH and DDEATH. A DATA before its BIRTH, or an
  alias or name the BIRTH did not declare, is ``Unmappable("unknown_alias")``.
* **Report by exception.** A DATA message carries only the metrics that changed, so
  the source keeps each device's last value of every metric and a reading has all of
  them ("merge last"): the changed ones from the message, the rest as last reported. A
  metric sent with ``is_null`` (or a non-finite value) is dropped until reported again.
* **seq** counts every message of an edge node (all its devices together) modulo 256,
  so it is *not* a device's counter: ``Mapped.counter`` stays ``None`` and the gateway
  numbers each device's readings itself. The source checks seq per node: a repeat of
  the last seq is ``Unmappable("duplicate")``, a skip puts ``seq_gap`` (messages lost,
  of any device of the node) in the reading's ``meta`` and, when enabled, asks for a
  rebirth, because merged values may be stale until the next BIRTH. A seq that goes
  back without an NBIRTH is a gap like any other; a restart is an NBIRTH, and every
  device's first reading after its (re)birth has ``new_epoch=True``.
* **bdSeq** ties an NDEATH to its NBIRTH: an NDEATH whose bdSeq is not the current
  session's (a late will of an earlier connection) clears nothing.

BIRTH messages carry the current value of every metric, so they give a reading too.
NDEATH, DDEATH, STATE and commands give none. Messages are mapped as they come: no
reordering buffer (the spec's "Reorder Timeout"), so a late message counts as a gap.

>>> from streampipe.ingest.base import Incoming
>>> src = SparkplugSource(target="Power")
>>> t = "spBv1.0/plant/{}/line1/meter"
>>> birth = encode_birth({"Power": 10.0, "Volts": 230.0}, seq=1, aliases={"Power": 1, "Volts": 2})
>>> _ = src.map(Incoming("spBv1.0/plant/NBIRTH/line1", encode_birth({}, seq=0, bdseq=0)))
>>> m = src.map(Incoming(t.format("DBIRTH"), birth))[0]
>>> m.device, m.x, m.y, m.new_epoch
('plant.line1.meter', {'Volts': 230.0}, 10.0, True)
>>> data = encode_data({"Volts": 231.5}, seq=2, aliases={"Volts": 2}, ts=1700000000.0)
>>> m = src.map(Incoming(t.format("DDATA"), data))[0]
>>> m.device, m.x, m.y, m.ts
('plant.line1.meter', {'Volts': 231.5}, 10.0, 1700000000.0)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from streampipe.ingest._sparkplug_proto import DataType, Payload
from streampipe.ingest.base import Incoming, Mapped, Unmappable
from streampipe.topics import InvalidName, check_name

__all__ = [
    "NAMESPACE",
    "SparkplugSource",
    "encode_birth",
    "encode_data",
    "encode_death",
    "rebirth_command",
    "topic",
]

NAMESPACE = "spBv1.0"
SEQ_MODULO = 256  # Sparkplug's seq runs 0..255 per edge node, then wraps
REBIRTH = "Node Control/Rebirth"

# Bounds, so one misbehaving sender costs only itself (its messages become dead letters).
MAX_NODES = 10_000  # edge nodes tracked by one source: a site has tens to hundreds
MAX_DEVICES_PER_NODE = 1_000  # a gateway node with more than this is not a sensor gateway
MAX_METRICS_PER_NODE = 10_000  # aliases per node, across its devices (alias table size)

#: Names that control a node or device rather than measure anything: never a feature
#: unless named in ``features``.
CONTROL_PREFIXES = ("Node Control/", "Device Control/", "Properties/", "bdSeq")

_NODE_TYPES = {"NBIRTH", "NDATA", "NDEATH"}
_DEVICE_TYPES = {"DBIRTH", "DDATA", "DDEATH"}
_NUMERIC = {DataType[n] for n in ("Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16")}
_NUMERIC |= {DataType[n] for n in ("UInt32", "UInt64", "Float", "Double", "Boolean")}
_SIGNED_BITS = {DataType["Int8"]: 8, DataType["Int16"]: 16, DataType["Int32"]: 32}
_SIGNED_BITS[DataType["Int64"]] = 64
_NUMBER_FIELDS = {"int_value", "long_value", "float_value", "double_value", "boolean_value"}
_NODE = ""  # the device key of an edge node's own metrics


@dataclass(slots=True)
class _Device:
    types: dict[str, int] = field(default_factory=dict)  # metric name -> DataType (BIRTH)
    last: dict[str, float] = field(default_factory=dict)  # last value of each metric
    epoch: bool = True  # its next reading is the first since its (re)birth


@dataclass(slots=True)
class _Node:
    bdseq: int | None = None
    seq: int | None = None
    born: bool = False
    aliases: dict[int, tuple[str, str]] = field(default_factory=dict)  # -> (device, name)
    devices: dict[str, _Device] = field(default_factory=dict)


class SparkplugSource:
    """Readings from Sparkplug B edge nodes and devices (a :class:`~.base.Source`).

    ``group`` is one group id or ``"+"`` for all. ``target`` names the metric that is a
    reading's ``y`` (``None``: readings have no ``y``). ``features`` names the metrics
    that are ``x``; ``None`` takes every numeric metric (Int*, UInt*, Float, Double,
    Boolean as 0/1) but the target and control metrics (``Node Control/…``, ``bdSeq``).
    ``device`` and ``node_device`` make device ids from ``{group}``, ``{node}`` and
    ``{device}``; ``node_device=""`` ignores edge nodes' own metrics (NBIRTH/NDATA).

    With ``rebirth=True``, a message the source cannot follow (DATA before BIRTH, an
    unknown alias, a seq gap) queues an NCMD ``Node Control/Rebirth = true`` for that
    node, at most one per node every ``rebirth_interval`` seconds; :meth:`commands`
    hands them to the gateway to publish (QoS 0, not retained).
    """

    def __init__(
        self,
        name: str = "sparkplug",
        group: str = "+",
        target: str | None = None,
        features: Iterable[str] | None = None,
        device: str = "{group}.{node}.{device}",
        node_device: str = "{group}.{node}",
        rebirth: bool = False,
        rebirth_interval: float = 30.0,
    ) -> None:
        if group != "+":
            check_name(group, "Sparkplug group id")
        for what, template in (("device", device), ("node_device", node_device)):
            try:
                template.format(group="g", node="n", device="d")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(
                    f"{what} template {template!r} may use only {{group}}, {{node}} and "
                    f"{{device}}: {e}"
                ) from None
        self.name = name
        self.group = group
        self.target = target
        self.features = None if features is None else frozenset(features)
        self.device = device
        self.node_device = node_device
        self.rebirth = rebirth
        self.rebirth_interval = rebirth_interval
        self._nodes: dict[str, _Node] = {}  # "group/node" -> its session
        self._rebirth_at: dict[str, float] = {}  # "group/node" -> when last requested
        self._commands: dict[str, tuple[str, bytes]] = {}  # pending, one per node

    # -- Source --------------------------------------------------------------------

    def filters(self) -> list[str]:
        g = self.group
        return [f"{NAMESPACE}/{g}/{t}/+" for t in ("NBIRTH", "NDATA", "NDEATH")] + [
            f"{NAMESPACE}/{g}/{t}/+/+" for t in ("DBIRTH", "DDATA", "DDEATH")
        ]

    def claims(self, topic: str) -> bool:
        levels = topic.split("/")
        if len(levels) < 3 or levels[0] != NAMESPACE:
            return False
        return self.group == "+" or levels[1] == self.group

    def map(self, message: Incoming) -> list[Mapped]:
        levels = message.topic.split("/")
        kind = levels[2] if len(levels) > 2 else ""
        if kind not in _NODE_TYPES and kind not in _DEVICE_TYPES:
            return []  # STATE, NCMD, DCMD: not readings
        if len(levels) != (4 if kind in _NODE_TYPES else 5) or not all(levels):
            raise Unmappable("bad_topic", f"{message.topic!r} is not a Sparkplug {kind} topic")
        group, node_id = levels[1], levels[3]
        dev = levels[4] if kind in _DEVICE_TYPES else _NODE
        try:
            payload = Payload.FromString(message.payload)
        except DecodeError as e:
            raise Unmappable("malformed", f"not a Sparkplug B protobuf payload: {e}") from None
        key = f"{group}/{node_id}"
        now = message.arrived or time.time()
        node = self._nodes.get(key)

        if kind == "NDEATH":
            bdseq = _bdseq(payload)
            if node is not None and (bdseq is None or node.bdseq is None or bdseq == node.bdseq):
                del self._nodes[key]
            return []
        if kind == "NBIRTH":
            if node is None and len(self._nodes) >= MAX_NODES:
                raise Unmappable("too_many_nodes", f"more than {MAX_NODES} edge nodes")
            node = self._nodes[key] = _Node(bdseq=_bdseq(payload), born=True)
            node.seq = payload.seq if payload.HasField("seq") else None
            return self._birth(node, group, node_id, _NODE, payload, kind, gap=None)

        if node is None or not node.born:
            self._ask_rebirth(group, node_id, now)
            raise Unmappable("unknown_alias", f"{kind} from edge node {key!r} before its NBIRTH")
        gap = self._check_seq(node, payload, group, node_id, kind, now)
        if kind == "DDEATH":
            node.devices.pop(dev, None)
            node.aliases = {a: dn for a, dn in node.aliases.items() if dn[0] != dev}
            return []
        if kind == "DBIRTH":
            return self._birth(node, group, node_id, dev, payload, kind, gap)
        if dev not in node.devices:
            self._ask_rebirth(group, node_id, now)
            raise Unmappable("unknown_alias", f"DDATA from {key}/{dev} before its DBIRTH")
        return self._data(node, group, node_id, dev, payload, kind, gap, now)

    def due(self, now: float) -> list[Mapped]:
        return []  # every message is mapped as it comes

    def state(self) -> dict[str, Any]:
        return {
            "version": 1,
            "nodes": {
                key: {
                    "bdseq": n.bdseq,
                    "seq": n.seq,
                    "born": n.born,
                    "aliases": [[a, d, name] for a, (d, name) in n.aliases.items()],
                    "devices": {
                        d: {"types": dict(s.types), "last": dict(s.last), "epoch": s.epoch}
                        for d, s in n.devices.items()
                    },
                }
                for key, n in self._nodes.items()
            },
            "rebirth_at": dict(self._rebirth_at),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self._nodes = {
            key: _Node(
                bdseq=n["bdseq"],
                seq=n["seq"],
                born=n["born"],
                aliases={int(a): (d, name) for a, d, name in n["aliases"]},
                devices={
                    d: _Device(dict(s["types"]), dict(s["last"]), bool(s["epoch"]))
                    for d, s in n["devices"].items()
                },
            )
            for key, n in state.get("nodes", {}).items()
        }
        self._rebirth_at = dict(state.get("rebirth_at", {}))

    # -- rebirth requests ----------------------------------------------------------

    def commands(self) -> list[tuple[str, bytes]]:
        """Take the pending ``(topic, payload)`` commands the gateway should publish.

        Each is an NCMD ``Node Control/Rebirth = true`` to one edge node. Empty unless
        the source was made with ``rebirth=True``; each call returns a command once.
        """
        out = list(self._commands.values())
        self._commands.clear()
        return out

    def _ask_rebirth(self, group: str, node_id: str, now: float) -> None:
        key = f"{group}/{node_id}"
        if not self.rebirth or now - self._rebirth_at.get(key, -math.inf) < self.rebirth_interval:
            return
        if key not in self._rebirth_at and len(self._rebirth_at) >= MAX_NODES:
            return  # a flood of made-up node ids must not grow this without bound
        self._rebirth_at[key] = now
        self._commands[key] = (topic(group, "NCMD", node_id), rebirth_command(ts=now))

    # -- the messages --------------------------------------------------------------

    def _check_seq(
        self, node: _Node, payload: Any, group: str, node_id: str, kind: str, now: float
    ) -> int | None:
        """The messages lost before this one (``None`` if none or unknown)."""
        if not payload.HasField("seq"):
            return None
        seq = payload.seq % SEQ_MODULO
        last, node.seq = node.seq, seq
        if last is None:
            return None
        if seq == last:
            raise Unmappable("duplicate", f"{kind} repeats seq {seq} of {group}/{node_id}")
        gap = (seq - last - 1) % SEQ_MODULO
        if gap:
            self._ask_rebirth(group, node_id, now)
        return gap or None

    def _birth(
        self,
        node: _Node,
        group: str,
        node_id: str,
        dev: str,
        payload: Any,
        kind: str,
        gap: int | None,
    ) -> list[Mapped]:
        if dev not in node.devices and len(node.devices) >= MAX_DEVICES_PER_NODE:
            raise Unmappable(
                "too_many_devices", f"{group}/{node_id} has over {MAX_DEVICES_PER_NODE}"
            )
        # Checked whole before anything changes: a bad BIRTH leaves the node as it was.
        aliases = {a: dn for a, dn in node.aliases.items() if dn[0] != dev}
        device = _Device()
        for metric in payload.metrics:
            if not metric.name:
                raise Unmappable(
                    "malformed", f"{kind} of {group}/{node_id} has a metric without name"
                )
            if metric.HasField("alias"):
                owner = aliases.get(metric.alias)
                if owner is not None and owner != (dev, metric.name):
                    raise Unmappable(
                        "malformed", f"{kind} reuses alias {metric.alias} of {owner[1]!r}"
                    )
                if len(aliases) >= MAX_METRICS_PER_NODE:
                    raise Unmappable(
                        "too_many_metrics", f"{group}/{node_id} has over {MAX_METRICS_PER_NODE}"
                    )
                aliases[metric.alias] = (dev, metric.name)
            device.types[metric.name] = metric.datatype
        node.aliases, node.devices[dev] = aliases, device
        return self._readings(group, node_id, dev, device, payload.metrics, payload, kind, gap)

    def _data(
        self,
        node: _Node,
        group: str,
        node_id: str,
        dev: str,
        payload: Any,
        kind: str,
        gap: int | None,
        now: float,
    ) -> list[Mapped]:
        device = node.devices[dev]
        for metric in payload.metrics:
            if metric.name:
                known = metric.name in device.types
                what = f"metric {metric.name!r}"
            elif metric.HasField("alias"):
                owner = node.aliases.get(metric.alias)
                known = owner is not None and owner[0] == dev
                what = f"alias {metric.alias}"
            else:
                raise Unmappable("malformed", f"{kind} has a metric with neither name nor alias")
            if not known:
                self._ask_rebirth(group, node_id, now)
                where = f"{group}/{node_id}" + (f"/{dev}" if dev else "")
                raise Unmappable("unknown_alias", f"{what} of {where} is not in its BIRTH")
        return self._readings(
            group, node_id, dev, device, payload.metrics, payload, kind, gap, node
        )

    def _readings(
        self,
        group: str,
        node_id: str,
        dev: str,
        device: _Device,
        metrics: Any,
        payload: Any,
        kind: str,
        gap: int | None,
        node: _Node | None = None,
    ) -> list[Mapped]:
        template = self.node_device if dev == _NODE else self.device
        if not template:
            return []
        try:
            device_id = check_name(template.format(group=group, node=node_id, device=dev))
        except InvalidName as e:
            raise Unmappable("invalid_device", str(e)) from None
        sent = payload.timestamp / 1000 if payload.HasField("timestamp") else None
        seq = payload.seq if payload.HasField("seq") else None
        # One reading per run of distinct metrics: a metric sent twice in one message
        # (buffered values) starts the next reading.
        out: list[Mapped] = []
        batch: dict[str, tuple[float | None, float | None]] = {}
        for metric in metrics:
            name = metric.name or node.aliases[metric.alias][1]  # type: ignore[union-attr]
            if name in batch:
                out += self._merge(device_id, device, batch, sent, kind, seq, gap)
                batch, gap = {}, None
            value = _value(metric, device.types.get(name, metric.datatype))
            ts = metric.timestamp / 1000 if metric.HasField("timestamp") else sent
            if value is not _NOT_NUMERIC:
                batch[name] = (value, ts)  # type: ignore[assignment]
        out += self._merge(device_id, device, batch, sent, kind, seq, gap)
        return out

    def _merge(
        self,
        device_id: str,
        device: _Device,
        batch: dict[str, tuple[float | None, float | None]],
        sent: float | None,
        kind: str,
        seq: int | None,
        gap: int | None,
    ) -> list[Mapped]:
        for name, (value, _) in batch.items():
            if value is None:
                device.last.pop(name, None)
            else:
                device.last[name] = value
        if not batch and not kind.endswith("BIRTH"):
            return []
        target = self.target
        if target in batch:
            ts = batch[target][1]
        else:
            times = [t for _, t in batch.values() if t is not None]
            ts = max(times) if times else sent
        x = {n: v for n, v in device.last.items() if n != target and self._is_feature(n)}
        y = device.last.get(target) if target is not None else None
        if not x and y is None:
            return []
        meta: dict[str, Any] = {"type": kind, "seq": seq}  # seq: the node's, None if absent
        if gap:
            meta["seq_gap"] = gap
        epoch, device.epoch = device.epoch, False
        return [Mapped(device_id, x, y=y, ts=ts, new_epoch=epoch, meta=meta)]

    def _is_feature(self, name: str) -> bool:
        if self.features is not None:
            return name in self.features
        return not name.startswith(CONTROL_PREFIXES)


_NOT_NUMERIC = object()


def _value(metric: Any, datatype: int) -> float | object | None:
    """A metric's value as a float, ``None`` if null, or ``_NOT_NUMERIC``."""
    if metric.is_null:
        return None
    if datatype not in _NUMERIC and datatype != DataType["Unknown"]:
        return _NOT_NUMERIC
    which = metric.WhichOneof("value")
    if which not in _NUMBER_FIELDS:
        return _NOT_NUMERIC
    raw = getattr(metric, which)
    bits = _SIGNED_BITS.get(datatype)
    if bits is not None and which in ("int_value", "long_value"):
        raw &= (1 << bits) - 1  # signed values travel as two's complement in uint32/64
        if raw >= 1 << (bits - 1):
            raw -= 1 << bits
    value = float(raw)
    return value if math.isfinite(value) else None


def _bdseq(payload: Any) -> int | None:
    for metric in payload.metrics:
        if metric.name == "bdSeq" and metric.WhichOneof("value") in ("int_value", "long_value"):
            return int(getattr(metric, metric.WhichOneof("value")))
    return None


# -- encoding: payloads from readings (``streampipe sensors --format sparkplug``) -----


def topic(group: str, message_type: str, node: str, device: str | None = None) -> str:
    """``spBv1.0/<group>/<message_type>/<node>[/<device>]``.

    >>> topic("plant", "DDATA", "line1", "meter")
    'spBv1.0/plant/DDATA/line1/meter'
    """
    levels = [NAMESPACE, group, message_type, node] + ([device] if device else [])
    return "/".join(levels)


def _ms(ts: float | None) -> int:
    return round((time.time() if ts is None else ts) * 1000)


def _set_value(metric: Any, value: float | int | bool) -> None:
    if isinstance(value, bool):
        metric.datatype, metric.boolean_value = DataType["Boolean"], value
    elif isinstance(value, int):
        metric.datatype, metric.long_value = DataType["Int64"], value & (1 << 64) - 1
    else:
        metric.datatype, metric.double_value = DataType["Double"], float(value)


def encode_birth(
    values: Mapping[str, float | int | bool],
    *,
    seq: int,
    aliases: Mapping[str, int] | None = None,
    ts: float | None = None,
    bdseq: int | None = None,
) -> bytes:
    """An NBIRTH (given ``bdseq``) or DBIRTH payload declaring ``values``' metrics.

    Floats are Double, ints Int64, bools Boolean. ``aliases`` maps names to aliases
    (default: 1, 2, … in order; aliases must be unique across the edge node). An NBIRTH
    also gets ``bdSeq`` and ``Node Control/Rebirth = false`` as the spec requires.

    >>> p = Payload.FromString(encode_birth({"Power": 1.5}, seq=0, bdseq=3))
    >>> [(m.name, m.alias) for m in p.metrics]
    [('bdSeq', 0), ('Node Control/Rebirth', 0), ('Power', 1)]
    """
    aliases = aliases if aliases is not None else {n: i for i, n in enumerate(values, 1)}
    payload = Payload(timestamp=_ms(ts), seq=seq % SEQ_MODULO)
    if bdseq is not None:
        _set_value(payload.metrics.add(name="bdSeq"), int(bdseq))
        _set_value(payload.metrics.add(name=REBIRTH), False)
    for name, value in values.items():
        metric = payload.metrics.add(name=name)
        if name in aliases:
            metric.alias = aliases[name]
        _set_value(metric, value)
    return payload.SerializeToString()


def encode_data(
    values: Mapping[str, float | int | bool],
    *,
    seq: int,
    aliases: Mapping[str, int],
    ts: float | None = None,
) -> bytes:
    """An NDATA/DDATA payload of the metrics that changed, by alias only (as the spec
    requires of DATA), types as in :func:`encode_birth`.

    >>> p = Payload.FromString(encode_data({"Power": 2.0}, seq=7, aliases={"Power": 1}))
    >>> p.seq, p.metrics[0].alias, p.metrics[0].name, p.metrics[0].double_value
    (7, 1, '', 2.0)
    """
    payload = Payload(timestamp=_ms(ts), seq=seq % SEQ_MODULO)
    for name, value in values.items():
        _set_value(payload.metrics.add(alias=aliases[name]), value)
    return payload.SerializeToString()


def encode_death(bdseq: int, *, ts: float | None = None) -> bytes:
    """An NDEATH payload (the will message): ``bdSeq`` only, no seq."""
    payload = Payload(timestamp=_ms(ts))
    _set_value(payload.metrics.add(name="bdSeq"), int(bdseq))
    return payload.SerializeToString()


def rebirth_command(*, ts: float | None = None) -> bytes:
    """An NCMD payload asking an edge node to rebirth: ``Node Control/Rebirth = true``,
    by name (the asker may not know the alias, which is why it asks)."""
    payload = Payload(timestamp=_ms(ts))
    _set_value(payload.metrics.add(name=REBIRTH), True)
    return payload.SerializeToString()
