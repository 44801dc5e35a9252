"""What a stage reports on ``ROOT/events/<stage_id>``: one JSON message per event.

Every event carries ``kind``, ``stage`` and ``ts``: when it happened, in seconds
since the Unix epoch — the timestamp of the reading that revealed it, or the stage's
clock for a promotion. The rest depends on the kind. These shapes are a contract,
like the topics:

- ``anomaly``: a reading whose anomaly score reached the threshold — ``device``,
  ``model``, ``seq``, ``score``, ``threshold``.
- ``drift``: a drift detector saw one device's error rise — ``device``, ``model``,
  ``role`` (``champion`` or ``challenger``), ``detector``, ``seq`` of the reading
  that made it fire, ``error_before``, ``error_after``, ``error`` (``absolute`` or
  ``0/1``) and ``action`` (``alert``, or ``reset``: the device's model was replaced
  by a fresh one).
- ``promotion``: the challenger became the champion for every device — ``from`` and
  ``to`` (``{"model", "version"}``), ``reason`` (``rule`` or ``command``) and, for a
  rule, ``readings``, ``error``, ``champion_error``, ``challenger_error``.

>>> anomaly_event("edge-1", "HalfSpaceTrees", "d1", 17, 1700000000.5, 0.93, 0.9)
{'kind': 'anomaly', 'stage': 'edge-1', 'ts': 1700000000.5, 'device': 'd1', \
'model': 'HalfSpaceTrees', 'seq': 17, 'score': 0.93, 'threshold': 0.9}
"""

from __future__ import annotations

from typing import Any

from streampipe.learn.drift import Drift

__all__ = ["anomaly_event", "drift_event", "promotion_event"]


def _event(kind: str, stage: str, ts: float, **fields: Any) -> dict[str, Any]:
    return {"kind": kind, "stage": stage, "ts": ts, **fields}


def anomaly_event(
    stage: str,
    model: str,
    device: str,
    seq: int,
    ts: float,
    score: float,
    threshold: float | None,
) -> dict[str, Any]:
    """A reading whose anomaly score reached the threshold."""
    return _event(
        "anomaly",
        stage,
        ts,
        device=device,
        model=model,
        seq=seq,
        score=score,
        threshold=threshold,
    )


def drift_event(
    stage: str,
    model: str,
    role: str,
    detector: str,
    drift: Drift,
    *,
    classifier: bool,
    action: str,
) -> dict[str, Any]:
    """A rise of one device's error, seen by a drift detector."""
    return _event(
        "drift",
        stage,
        drift.ts,
        device=drift.device,
        model=model,
        role=role,
        detector=detector,
        seq=drift.seq,
        error_before=drift.error_before,
        error_after=drift.error_after,
        error="0/1" if classifier else "absolute",
        action=action,
    )


def promotion_event(
    stage: str,
    old: tuple[str, int],
    new: tuple[str, int],
    reason: str,
    *,
    now: float,
    **evidence: Any,
) -> dict[str, Any]:
    """The challenger became the champion."""
    return _event(
        "promotion",
        stage,
        now,
        **{"from": {"model": old[0], "version": old[1]}},
        to={"model": new[0], "version": new[1]},
        reason=reason,
        **evidence,
    )
