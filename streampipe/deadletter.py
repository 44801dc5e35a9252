"""Dead letters: what every streampipe service publishes, on
``ROOT/deadletter/<its id>``, for an input message it could not take.

One shape for the edge, the ingest gateway and the fleet aggregator, so one consumer
reads them all: who refused it (``stage``: the service's id), when (``ts``), why
(``reason``, a word from a bounded vocabulary, and ``detail``, for people), the
message's ``topic`` and ``size``, and the first bytes of its payload (base64), with
what the service adds (``source``, ``readings``, …).

>>> body = dead_letter_body("gw", 1.5, "not_json", "payload is not JSON", "z/k", b"{oops")
>>> body["reason"], body["payload_prefix"], body["payload_truncated"]
('not_json', 'e29vcHM=', False)
"""

from __future__ import annotations

import base64
from typing import Any

__all__ = ["DEADLETTER_PREFIX_BYTES", "dead_letter_body"]

#: First bytes of a refused payload a dead letter carries: enough to recognise it,
#: never a copy of a large one.
DEADLETTER_PREFIX_BYTES = 256


def dead_letter_body(
    sender: str, ts: float, reason: str, detail: str, topic: str, payload: bytes, **extra: Any
) -> dict[str, Any]:
    """The JSON object of one dead letter (see the module)."""
    body: dict[str, Any] = {
        "stage": sender,
        "ts": ts,
        "reason": reason,
        "detail": detail,
        "topic": topic,
        "size": len(payload),
        "payload_prefix": base64.b64encode(payload[:DEADLETTER_PREFIX_BYTES]).decode(),
        "payload_truncated": len(payload) > DEADLETTER_PREFIX_BYTES,
    }
    body.update(extra)
    return body
