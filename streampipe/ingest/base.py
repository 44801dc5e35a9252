"""What every source of foreign payloads gives the gateway: readings, or a reason.

A :class:`Source` is one kind of device (one ``[[source]]`` of a mapping file, or the
one-flag form of ``streampipe ingest``). The gateway asks each source, in order,
whether a topic is its own (:meth:`Source.claims`), and the first that claims it
maps the message (:meth:`Source.map`) to zero or more :class:`Mapped` readings, or
raises :class:`Unmappable` with a reason, which becomes a dead letter.

>>> m = Mapped("z2m.kitchen", {"voltage": 230.1}, y=12.5)
>>> m.device, m.y, m.ts is None
('z2m.kitchen', 12.5, True)
>>> str(Unmappable("not_json", "payload is not JSON"))
'not_json: payload is not JSON'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["Incoming", "Mapped", "Source", "Unmappable"]


class Unmappable(Exception):
    """A foreign message that cannot be mapped to readings: a dead letter."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Incoming:
    """A foreign MQTT message as a source sees it."""

    topic: str
    payload: bytes
    retained: bool = False
    arrived: float = 0.0  # Unix time the gateway received it


@dataclass(frozen=True, slots=True)
class Mapped:
    """One reading of one device, mapped from a foreign message.

    ``ts`` is the reading's time (Unix seconds), ``None`` for the message's arrival.
    ``counter`` is the source's own message counter when it has one (The Things
    Stack's ``f_cnt``, Sparkplug's ``seq``), taken modulo ``counter_modulo``: the
    gateway uses it to number the device's readings, so a skipped counter shows as a
    gap at the edge, a repeated one is a duplicate and one that goes back is a reboot
    (a new epoch). ``new_epoch`` says the device restarted (a Sparkplug birth).
    ``x`` is the gateway's once returned: a source makes a new dict for each reading.
    """

    device: str
    x: dict[str, float]
    y: float | None = None
    ts: float | None = None
    counter: int | None = None
    counter_modulo: int | None = None
    new_epoch: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Source(Protocol):
    """One kind of device the gateway takes payloads from."""

    #: A name for logs, dead letters and errors (``[[source]]``'s ``name``).
    name: str

    def filters(self) -> list[str]:
        """MQTT topic filters to subscribe to."""
        ...

    def claims(self, topic: str) -> bool:
        """Whether messages on ``topic`` are this source's (and not excluded): by the
        topic alone, so the gateway asks once per topic and remembers the answer."""
        ...

    def map(self, message: Incoming) -> list[Mapped]:
        """The readings ``message`` carries; raises :class:`Unmappable` if none can be
        had. May return nothing (a partial reading waiting for the rest)."""
        ...

    def due(self, now: float) -> list[Mapped]:
        """Readings completed by time alone (a partial reading whose bound passed)."""
        ...

    def state(self) -> dict[str, Any]:
        """What must survive a restart (msgpack-able): alias tables, partial readings."""
        ...

    def restore(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state` returned."""
        ...
