"""Home Assistant MQTT discovery: each device's prediction as a sensor entity, no YAML.

On a device's first prediction (``streampipe edge --ha-discovery``) the stage publishes,
retained, one *single-component* discovery config on
``<prefix>/sensor/<stage node id>/<object_id>/config``, as Home Assistant's MQTT
integration documents it (``/integrations/mqtt/#discovery-messages`` and
``/integrations/sensor.mqtt/``); the node id level, which it allows, is the stage's:
:func:`node_id`.

- ``state_topic`` (the one option a sensor requires) is the device's retained last
  value, ``ROOT/predictions/<device>/last``, read with ``{{ value }}``: Home Assistant
  shows the newest prediction as soon as it subscribes, also after its own restart,
  where the JSON predictions (not retained) would leave it ``unknown`` until the
  device's next reading;
- ``availability`` is the stage's retained ``online``/``offline`` status, so the entity
  is unavailable while the stage is down;
- ``unique_id`` is stage, device and model name; the topic's ``object_id`` is the same
  (the documented best practice) and ``default_entity_id`` (which replaced
  ``object_id`` in the payload in Home Assistant 2025.10) is its entity-id form;
- ``device`` (one per stage and device) and ``origin`` say where the entity comes from;
- ``state_class: measurement`` for numeric predictions (regressors, anomaly scores),
  none for a classifier's labels. No unit or device class: a model does not know its
  target's; set them in Home Assistant.

Ids keep only what Home Assistant allows (``[a-zA-Z0-9_-]``); an id that had to be
changed gets a hash of the original, so two devices never share an entity.

>>> d = Discovery(Topics("streampipe"), "edge-1")
>>> [out] = d.announce("boiler.1", "power")
>>> out.topic
'homeassistant/sensor/edge-1/streampipe_edge-1_boiler_1_power_34a46419/config'
>>> cfg = json.loads(out.payload)
>>> cfg["state_topic"], cfg["value_template"]
('streampipe/predictions/boiler.1/last', '{{ value }}')
>>> cfg["default_entity_id"]
'sensor.streampipe_edge_1_boiler_1_power_34a46419'
>>> d.announce("boiler.1", "power")  # once per process
[]
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from dataclasses import dataclass, field

from streampipe import __version__
from streampipe.stage import Outgoing
from streampipe.topics import Topics, check_name

__all__ = ["DEFAULT_PREFIX", "Discovery", "object_id"]

#: Home Assistant's default discovery prefix.
DEFAULT_PREFIX = "homeassistant"
ONLINE, OFFLINE = "online", "offline"

_NOT_ALLOWED = re.compile(r"[^a-zA-Z0-9_-]+")


def object_id(*parts: str) -> str:
    """An id Home Assistant accepts in a discovery topic, from ``parts`` joined by ``_``:
    unchanged if it already is one, else cleaned and suffixed with a hash of the original.

    >>> object_id("edge-1", "sensor-007")
    'edge-1_sensor-007'
    >>> object_id("edge-1", "küche 1")
    'edge-1_k_che_1_e3bbc42f'
    """
    text = "_".join(parts)
    clean = _NOT_ALLOWED.sub("_", text)
    if clean == text:
        return text
    return f"{clean}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def node_id(stage_id: str) -> str:
    """The discovery topic level of a stage's configs (an :func:`object_id` of it).

    >>> node_id("edge-1"), node_id("edge.1")
    ('edge-1', 'edge_1_d6fe7c99')
    """
    return object_id(stage_id)


def _support_url() -> str | None:
    """The project's first URL in its package metadata (``[project.urls]``), if any."""
    try:
        urls = importlib.metadata.metadata("streampipe").get_all("Project-URL") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    return urls[0].partition(",")[2].strip() or None if urls else None


def _entity_id(oid: str) -> str:
    """``sensor.<oid>`` as an entity id may be: lower case, digits, single underscores."""
    slug = re.sub(r"_+", "_", re.sub(r"[^a-z0-9]", "_", oid.lower())).strip("_")
    return f"sensor.{slug or 'streampipe'}"


_SUPPORT_URL = _support_url()


@dataclass(slots=True)
class Discovery:
    """Discovery configs of one stage's entities, each published once per process.

    The worker thread owns it (it runs inside :class:`~streampipe.stage.EdgeStage`).
    ``announced`` holds one entry per device with a model, so it is bounded by
    ``--max-devices`` like the models are.
    """

    topics: Topics
    stage_id: str
    prefix: str = DEFAULT_PREFIX
    numeric: bool = True  # False for a classifier's labels: no state_class then
    #: device -> the object id its config was published under.
    announced: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for level in self.prefix.split("/"):
            check_name(level, "discovery prefix level")

    def topic(self, oid: str) -> str:
        """``PREFIX/sensor/<node id>/<object id>/config``: Home Assistant's optional node
        id level is the stage's, so a secured broker can let each stage write its own
        configs only (:func:`node_id`)."""
        return f"{self.prefix}/sensor/{node_id(self.stage_id)}/{oid}/config"

    def announce(self, device: str, model: str) -> list[Outgoing]:
        """What to publish before ``device``'s prediction by ``model``: its config the
        first time, nothing after. After a promotion (another model name, so another
        entity) the old config is cleared (an empty retained message) and the new one sent."""
        oid = object_id("streampipe", self.stage_id, device, model)
        old = self.announced.get(device)
        if old == oid:
            return []
        self.announced[device] = oid
        body: dict[str, object] = {
            "name": "Prediction",
            "unique_id": oid,
            "default_entity_id": _entity_id(oid),
            "state_topic": self.topics.last_value(device),
            "value_template": "{{ value }}",
            "qos": 1,
            "availability": [
                {
                    "topic": self.topics.status(self.stage_id),
                    "payload_available": ONLINE,
                    "payload_not_available": OFFLINE,
                }
            ],
            "device": {
                "identifiers": [object_id("streampipe", self.stage_id, device)],
                "name": device,
                "model": "streampipe",
                "manufacturer": "streampipe",
                "sw_version": __version__,
            },
            "origin": {"name": "streampipe", "sw_version": __version__},
        }
        if _SUPPORT_URL:
            body["origin"]["support_url"] = _SUPPORT_URL  # type: ignore[index]
        if self.numeric:
            body["state_class"] = "measurement"
        out = [Outgoing(self.topic(oid), json.dumps(body).encode(), retain=True)]
        if old is not None:
            out.insert(0, Outgoing(self.topic(old), b"", retain=True))
        return out
