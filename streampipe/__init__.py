"""streampipe: an MQTT pipeline that learns online at the edge with River."""

from __future__ import annotations

from streampipe.readings import Batch, Reading

__all__ = ["Batch", "Reading", "__version__"]
__version__ = "0.1.0"
