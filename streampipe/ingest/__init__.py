"""``streampipe ingest``: a gateway from the payloads devices already publish
(Zigbee2MQTT, Tasmota, Shelly, ESPHome, The Things Stack, Sparkplug B, …) to
streampipe's native readings, so every guarantee of the edge applies to them."""

from streampipe.ingest.base import Incoming, Mapped, Source, Unmappable

__all__ = ["Incoming", "Mapped", "Source", "Unmappable"]
