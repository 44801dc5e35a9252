"""``streampipe ingest``: a gateway from the payloads devices already publish
(Zigbee2MQTT, Tasmota, Shelly, ESPHome, The Things Stack, Sparkplug B, …) to
streampipe's native readings, so every guarantee of the edge applies to them."""

from streampipe.ingest.base import Incoming, Mapped, Source, Unmappable

__all__ = ["DEFAULT_ID", "Incoming", "Mapped", "Source", "Unmappable"]

#: The gateway's id unless ``streampipe ingest --id`` says otherwise: its status, dead
#: letters and session. The ACL of ``broker init-secure`` grants the ``gateway``
#: account this id's status and dead-letter topics.
DEFAULT_ID = "ingest"
