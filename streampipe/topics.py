"""The MQTT topic contract.

Every topic starts with a root (``streampipe`` unless told otherwise):

=====================================  ==============================================
``ROOT/readings/<partition>/<device>``  readings of one device (msgpack + zstd frames)
``ROOT/schemas/<schema_id>``            retained field-name schemas for small frames
``ROOT/predictions/<device>``           JSON predictions, one message per batch
``ROOT/predictions/<device>/last``      with ``--last-value``: retained, the newest
                                        ``y_pred`` as plain text (``512.3``)
``ROOT/metrics/<stage_id>``             JSON rolling metrics of a stage
``ROOT/deadletter/<stage_id>``          JSON, one message per rejected input message
``ROOT/status/<stage_id>``              retained ``online`` / ``offline`` (last will)
``ROOT/models/<name>``                  retained, signed model artifact: what edges run
``ROOT/models/<name>/previous``         retained, the artifact it replaced (rollback)
``ROOT/events/<stage_id>``              JSON, one message per event: anomaly, drift,
                                        promotion
``ROOT/control/<stage_id>``             JSON commands to a stage, e.g.
                                        ``{"promote": "challenger"}``
``ROOT/fleet/<name>/updates/<stage>``   retained, msgpack: a stage's latest model
                                        update for fleet ``name`` (never readings)
``ROOT/fleet/<name>/model``             retained, signed artifact: the fleet model
=====================================  ==============================================

The ``<partition>`` level (``p00`` … ``p63``, a fixed hash of the device id) lets several
edge workers share the readings while each device's model stays in one place: a worker
subscribes to the partitions it owns, so one device always reaches the same worker. A
worker refuses readings on a partition level that is not their device's
(``wrong_partition``): a sender may publish anywhere its ACL allows, and the ACL cannot
compute a partition.

>>> t = Topics("streampipe")
>>> t.readings("boiler-1")
'streampipe/readings/p39/boiler-1'
>>> t.predictions("boiler-1")
'streampipe/predictions/boiler-1'
>>> t.last_value("boiler-1")
'streampipe/predictions/boiler-1/last'
>>> t.device_of_reading_topic("streampipe/readings/p39/boiler-1")
'boiler-1'
"""

from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass

__all__ = [
    "DEFAULT_ROOT",
    "PARTITIONS",
    "InvalidName",
    "Topics",
    "check_name",
    "partition_level",
    "partition_of",
]

DEFAULT_ROOT = "streampipe"
#: Number of reading partitions. Fixed: changing it would move devices between workers.
PARTITIONS = 64
#: Device and stage ids longer than this are refused (a topic level, a label, a file name).
MAX_NAME_LENGTH = 128


_FORBIDDEN = r"+#/\x00-\x1f\x7f-\x9f"  # wildcards, the separator, control characters
_VALID_NAME = re.compile(f"[^{_FORBIDDEN}$][^{_FORBIDDEN}]{{0,{MAX_NAME_LENGTH - 1}}}")


class InvalidName(ValueError):
    """A device id, stage id or topic root that cannot be used as an MQTT topic level."""


def check_name(name: object, what: str = "device id") -> str:
    """Return ``name`` if it can be one MQTT topic level, else raise :class:`InvalidName`.

    Refused: empty, longer than 128 characters, MQTT wildcards (``+`` ``#``), the level
    separator ``/``, a leading ``$`` (reserved for the broker) and control characters.

    >>> check_name("sensor-007")
    'sensor-007'
    >>> check_name("a/b")
    Traceback (most recent call last):
    ...
    streampipe.topics.InvalidName: device id 'a/b' contains '/'
    """
    if isinstance(name, str) and _VALID_NAME.fullmatch(name):
        return name  # the common case, in one regex; the rules below say what is wrong
    if not isinstance(name, str):
        raise InvalidName(f"{what} must be a string, not {type(name).__name__}")
    if not name:
        raise InvalidName(f"{what} is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"{what} is longer than {MAX_NAME_LENGTH} characters")
    for bad in ("+", "#", "/"):
        if bad in name:
            raise InvalidName(f"{what} {name!r} contains {bad!r}")
    if name.startswith("$"):
        raise InvalidName(f"{what} {name!r} starts with '$', which MQTT reserves")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name):
        raise InvalidName(f"{what} {name!r} contains a control character")
    return name


def partition_of(device: str) -> int:
    """The reading partition of a device: CRC-32 of its UTF-8 id, modulo 64.

    >>> partition_of("boiler-1")
    39
    """
    return zlib.crc32(device.encode()) % PARTITIONS


@functools.lru_cache(maxsize=1 << 16)
def partition_level(device: str) -> str:
    """The partition level of a device's readings topic.

    >>> partition_level("boiler-1")
    'p39'
    """
    return f"p{partition_of(device):02d}"


@dataclass(frozen=True, slots=True)
class Topics:
    """Builds and parses the topics under one root."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        levels = self.root.split("/")
        for level in levels:
            check_name(level, "topic root level")

    def readings(self, device: str) -> str:
        return f"{self.root}/readings/{partition_level(device)}/{device}"

    def readings_filter(self, partitions: tuple[int, ...] | None = None) -> list[str]:
        """Subscription filters for all readings, or for some partitions only."""
        if partitions is None:
            return [f"{self.root}/readings/+/+"]
        return [f"{self.root}/readings/p{p:02d}/+" for p in partitions]

    def device_of_reading_topic(self, topic: str) -> str | None:
        """The device id a readings topic names, or ``None`` if it is not one."""
        prefix = f"{self.root}/readings/"
        if not topic.startswith(prefix):
            return None
        rest = topic[len(prefix) :].split("/")
        if len(rest) != 2 or not rest[0].startswith("p"):
            return None
        return rest[1]

    def schemas(self, schema_id: str = "+") -> str:
        return f"{self.root}/schemas/{schema_id}"

    def predictions(self, device: str = "+") -> str:
        return f"{self.root}/predictions/{device}"

    def last_value(self, device: str = "+") -> str:
        """Retained, the newest prediction of a device as plain text. One level below its
        predictions: ``ROOT/predictions/#`` gets both, ``ROOT/predictions/+`` only JSON."""
        return f"{self.root}/predictions/{device}/last"

    def metrics(self, stage_id: str = "+") -> str:
        return f"{self.root}/metrics/{stage_id}"

    def deadletter(self, stage_id: str = "+") -> str:
        return f"{self.root}/deadletter/{stage_id}"

    def status(self, stage_id: str = "+") -> str:
        return f"{self.root}/status/{stage_id}"

    def instance(self, stage_id: str) -> str:
        """Retained: which process runs a stage (one level below its status)."""
        return f"{self.root}/status/{stage_id}/instance"

    def models(self, name: str) -> str:
        """Where the artifact of model ``name`` is retained; edges subscribe to it."""
        return f"{self.root}/models/{name}"

    def previous_model(self, name: str) -> str:
        """Where the artifact that ``models(name)`` replaced is kept, for a rollback."""
        return f"{self.root}/models/{name}/previous"

    def events(self, stage_id: str = "+") -> str:
        return f"{self.root}/events/{stage_id}"

    def control(self, stage_id: str = "+") -> str:
        return f"{self.root}/control/{stage_id}"

    def fleet_updates(self, name: str, stage_id: str = "+") -> str:
        """Retained: the latest model update a stage published for fleet ``name``."""
        return f"{self.root}/fleet/{name}/updates/{stage_id}"

    def fleet_model(self, name: str) -> str:
        """Retained: the signed fleet model the aggregator of fleet ``name`` publishes."""
        return f"{self.root}/fleet/{name}/model"
