"""A stage's numbers, for Prometheus and for the JSON metrics topic alike.

:class:`StageStats` holds the counts; :class:`StageCollector` exports them, and the
River metric objects of the learner, at scrape time — so Prometheus and the MQTT
metrics topic read the same numbers from the same place. Label sets are bounded:
reasons come from a fixed vocabulary and no series is ever per device.

>>> from prometheus_client import CollectorRegistry
>>> stats = StageStats("edge-1")
>>> stats.reject("malformed", 2)
>>> registry = CollectorRegistry()
>>> registry.register(StageCollector(stats))
>>> registry.get_sample_value("streampipe_rejected_total", {"reason": "malformed"})
2.0
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from streampipe import __version__

__all__ = [
    "BatchHistogram",
    "LatencyHistogram",
    "ReadingAgeHistogram",
    "StageCollector",
    "StageStats",
    "summary",
]

NAMESPACE = "streampipe"
#: How River calls the metrics in help texts.
_TITLES = {
    "mae": "MAE",
    "rmse": "RMSE",
    "r2": "R2",
    "accuracy": "Accuracy",
    "f1": "F1 (positive class True)",
    "macro_f1": "MacroF1",
    "rocauc": "ROCAUC",
}

#: Up to this many values, plain Python beats numpy (whose calls cost ~1 µs each).
_FEW = 8

#: Seconds from the edge receiving a message to the publication of its predictions.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_MINUTE, _HOUR, _DAY = 60.0, 3600.0, 86400.0
#: Seconds from a reading's timestamp to its prediction's publication: milliseconds for a
#: live fleet, up to a year for replayed history (older is +Inf).
AGE_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    *(_MINUTE, 5 * _MINUTE, 15 * _MINUTE, _HOUR, 6 * _HOUR, _DAY, 7 * _DAY, 30 * _DAY),
    365 * _DAY,
)


class StageStats:
    """Counts kept by a stage. Updated by the stage's worker, read by anyone."""

    def __init__(self, stage_id: str) -> None:
        self.stage_id = stage_id
        self.started = time.time()
        self.messages = 0
        self.readings = 0
        self.predictions = 0
        self.cleaned = 0
        self.gaps = 0
        self.gap_events = 0
        #: Devices first seen after their sequence had begun (what came before is no gap).
        self.joined_midstream = 0
        #: Readings the broker delivered again after a reconnect that were already learned.
        self.redelivered = 0
        self.non_finite_predictions = 0
        self.queue_depth: Callable[[], int] = lambda: 0
        self.sessions_lost: Callable[[], int] = lambda: 0
        self.commits = 0  # checkpoints that made processed input durable, then acknowledged it
        self.swaps = 0  # deployed models hot-swapped in
        self.queue_capacity = 0
        self._rejected: dict[str, int] = {}
        self._lock = threading.Lock()
        self.model: Any = None  # the OnlineLearner, for its River metrics
        self.model_name = ""
        self.model_version = 0
        self.challenger: Any = None  # the challenger's OnlineLearner, if any
        self.challenger_name = ""
        self.anomalies = 0  # anomaly events published
        self.promotions = 0
        self._drifts: dict[str, int] = {}  # by model name: bounded (champion, challenger)
        #: With fleet learning, the stage's streampipe.fleet.edge.FleetMember: its counts,
        #: the fleet model's version and its scores on this stage's readings.
        self.fleet: Any = None
        #: Per-sender bounds by name (a fixed vocabulary): how much is used, and the bound.
        self.limits: dict[str, Callable[[], tuple[float, float]]] = {}

    @property
    def devices(self) -> int:
        """Devices with a model on this stage, read from the learner itself."""
        return len(self.model.devices) if self.model is not None else 0

    def reject(self, reason: str, count: int = 1) -> None:
        with self._lock:
            self._rejected[reason] = self._rejected.get(reason, 0) + count

    @property
    def rejected(self) -> dict[str, int]:
        with self._lock:
            return dict(self._rejected)

    def count_drift(self, model: str) -> None:
        with self._lock:
            self._drifts[model] = self._drifts.get(model, 0) + 1

    @property
    def drifts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._drifts)

    def limits_used(self) -> dict[str, tuple[float, float]]:
        """``{limit: (used, bound)}``: how close each per-sender bound is."""
        return {name: used() for name, used in self.limits.items()}

    def model_metrics(self) -> dict[str, Any]:
        return self.model.metrics.as_dict() if self.model is not None else {}

    def evaluated(self) -> list[tuple[str, dict[str, Any]]]:
        """``(model name, metrics)`` of the served model, then of the challenger, then of
        the fleet model (as ``fleet``), those the stage has."""
        models = [(self.model_name, self.model_metrics())]
        challenger = self.challenger
        if challenger is not None:
            models.append((self.challenger_name, challenger.metrics.as_dict()))
        fleet = self.fleet
        if fleet is not None and fleet.version:
            models.append((fleet.LABEL, fleet.scores.as_dict()))
        return models

    def snapshot(self) -> dict[str, Any]:
        """Everything, as the JSON published on ``ROOT/metrics/<stage_id>``."""
        rejected = self.rejected
        return {
            "stage": self.stage_id,
            "ts": time.time(),
            "uptime_s": round(time.time() - self.started, 3),
            "model": self.model_name,
            "version": self.model_version,
            "messages": self.messages,
            "readings": self.readings,
            "predictions": self.predictions,
            "rejected": sum(rejected.values()),
            "rejected_by_reason": rejected,
            "cleaned_values": self.cleaned,
            "sequence_gaps": self.gaps,
            "devices_joined_midstream": self.joined_midstream,
            "redelivered_readings": self.redelivered,
            "non_finite_predictions": self.non_finite_predictions,
            "devices": self.devices,
            "queue_depth": self.queue_depth(),
            "commits": self.commits,
            "model_swaps": self.swaps,
            "sessions_lost": self.sessions_lost(),
            "limits": {k: {"used": u, "limit": b} for k, (u, b) in self.limits_used().items()},
            "metrics": self.model_metrics(),
            **self._evaluation(),
        }

    def _evaluation(self) -> dict[str, Any]:
        """The parts of the snapshot that only some stages have."""
        extra: dict[str, Any] = {}
        challenger = self.challenger
        if challenger is not None:
            extra["challenger"] = {
                "model": self.challenger_name,
                "metrics": challenger.metrics.as_dict(),
            }
        if self.fleet is not None:
            extra["fleet"] = self.fleet.snapshot_stats()
        kind = getattr(self.model, "kind", None)
        if kind == "anomaly":
            extra["anomalies"] = self.anomalies
        drifts = self.drifts
        if drifts:
            extra["drifts"] = sum(drifts.values())
            extra["drifts_by_model"] = drifts
        if self.promotions:
            extra["promotions"] = self.promotions
        return extra


class BatchHistogram(Collector):
    """A histogram observed a batch of readings at a time.

    prometheus_client's ``Histogram`` takes one observation per call, which costs more
    per reading than the rest of the stage's bookkeeping together; this one counts a
    whole batch with one ``searchsorted``, or one value for many readings at once.
    Exported at scrape time, like the rest.

    >>> import numpy as np
    >>> from prometheus_client import CollectorRegistry
    >>> h = BatchHistogram("streampipe_example_seconds", "An example.", (0.25, 1.0, 10.0))
    >>> h.observe_many(np.array([0.125, 0.5, 0.5, 60.0]))
    >>> h.observe(0.75, 2)  # two readings of one message, received together
    >>> registry = CollectorRegistry()
    >>> registry.register(h)
    >>> name = "streampipe_example_seconds"
    >>> registry.get_sample_value(name + "_bucket", {"le": "1.0"})
    5.0
    >>> registry.get_sample_value(name + "_count"), registry.get_sample_value(name + "_sum")
    (6.0, 62.625)
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.buckets = np.asarray(buckets, dtype=float)
        self._bounds = self.buckets.tolist()
        self._counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # the last is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float, count: int = 1) -> None:
        """Count ``value`` ``count`` times."""
        slot = bisect.bisect_left(self._bounds, value)
        with self._lock:
            self._counts[slot] += count
            self._sum += value * count

    def observe_many(self, values: np.ndarray) -> None:
        """Count each value in the first bucket whose upper bound (``le``) holds it."""
        if len(values) <= _FEW:  # numpy's per-call cost would exceed the work
            vs = values.tolist()
            with self._lock:
                for v in vs:
                    self._counts[bisect.bisect_left(self._bounds, v)] += 1
                self._sum += sum(vs)
            return
        slots = np.searchsorted(self.buckets, values, side="left")
        counts = np.bincount(slots, minlength=len(self._counts))
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self._counts).astype(float).tolist()
            total = self._sum
        bounds = [floatToGoString(b) for b in self.buckets.tolist()] + ["+Inf"]
        yield HistogramMetricFamily(
            self.name,
            self.documentation,
            buckets=list(zip(bounds, cumulative)),
            sum_value=total,
        )


class LatencyHistogram(BatchHistogram):
    """``streampipe_prediction_latency_seconds``: from the moment the edge received a
    readings message to the publication of its predictions, per reading. What the edge
    itself takes, its queue included; the readings' own timestamps play no part."""

    NAME = f"{NAMESPACE}_prediction_latency_seconds"

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        super().__init__(
            self.NAME,
            "Time from the edge receiving a readings message to the publication of its "
            "predictions (queueing and processing at the edge), per reading.",
            buckets,
        )


class ReadingAgeHistogram(BatchHistogram):
    """``streampipe_reading_age_seconds``: the edge's clock minus a reading's timestamp
    when its prediction is published. For live sensors the whole way from the sensor
    to the prediction (clock skew included); for replayed history, the data's age."""

    NAME = f"{NAMESPACE}_reading_age_seconds"

    def __init__(self, buckets: tuple[float, ...] = AGE_BUCKETS) -> None:
        super().__init__(
            self.NAME,
            "Age of a reading (the edge's clock minus the reading's timestamp) when its "
            "prediction is published: end-to-end latency for live readings, the data's age "
            "for replayed ones.",
            buckets,
        )


def summary(snapshot: dict[str, Any], previous: dict[str, Any] | None = None) -> str:
    """One line for the log: what a stage has done, at what rate since ``previous`` (an
    earlier :meth:`StageStats.snapshot`; since the start without one), and how well
    its model predicts over the rolling window.

    >>> now = {"stage": "edge-1", "ts": 160.0, "uptime_s": 160.0, "readings": 12345,
    ...        "predictions": 12342, "devices": 10, "rejected": 3, "queue_depth": 0,
    ...        "rejected_by_reason": {"invalid_label": 3},
    ...        "metrics": {"count": 12342, "rolling": {"mae": 3.2149, "rmse": 4.5}}}
    >>> summary(now, {"ts": 100.0, "readings": 0})
    'edge-1: 12,345 readings (206/s), 12,342 predicted, 10 devices, 3 refused (invalid_label 3), rolling MAE 3.21, queue 0'
    >>> summary({**now, "metrics": {"count": 0, "rolling": {"accuracy": None}}})
    'edge-1: 12,345 readings (77/s), 12,342 predicted, 10 devices, 3 refused (invalid_label 3), nothing scored, queue 0'
    """  # noqa: E501
    if previous is None:
        elapsed, done = snapshot["uptime_s"], snapshot["readings"]
    else:
        elapsed, done = snapshot["ts"] - previous["ts"], snapshot["readings"] - previous["readings"]
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [
        f"{_count(snapshot['readings'], 'reading')} ({rate:,.0f}/s)"
        if rate >= 10
        else f"{_count(snapshot['readings'], 'reading')} ({rate:.2g}/s)",
        f"{snapshot['predictions']:,} predicted",
        _count(snapshot["devices"], "device"),
    ]
    refused = snapshot["rejected"]
    if refused:
        by_reason = sorted(snapshot["rejected_by_reason"].items(), key=lambda kv: -kv[1])
        parts.append(f"{refused:,} refused ({', '.join(f'{r} {n:,}' for r, n in by_reason)})")
    rolling = (snapshot.get("metrics") or {}).get("rolling") or {}
    name, value = next(iter(rolling.items()), (None, None))
    if value is not None:
        parts.append(f"rolling {_TITLES.get(name, name)} {value:.3g}")  # type: ignore[arg-type]
    elif name is not None:
        parts.append("nothing scored")
    parts.append(f"queue {snapshot['queue_depth']:,}")
    return f"{snapshot['stage']}: " + ", ".join(parts)


def _count(n: int, thing: str) -> str:
    return f"{n:,} {thing}" if n == 1 else f"{n:,} {thing}s"


def counts_by(name: str, doc: str, label: str, counts: dict[str, int]) -> CounterMetricFamily:
    """A counter with one series per value of ``label`` (a bounded vocabulary)."""
    family = CounterMetricFamily(f"{NAMESPACE}_{name}", doc, labels=[label])
    for value, n in sorted(counts.items()):
        family.add_metric([value], float(n))
    return family


class StageCollector(Collector):
    """Exports :class:`StageStats` and River's metric values at scrape time."""

    def __init__(self, stats: StageStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        s = self.stats

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{NAMESPACE}_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, value=value)

        yield InfoMetricFamily(
            f"{NAMESPACE}_build", "streampipe version.", value={"version": __version__}
        )
        yield counter("messages_received", "MQTT messages received on readings topics.", s.messages)
        yield counter("readings_received", "Readings decoded from received messages.", s.readings)
        yield counter("predictions", "Predictions made and published.", s.predictions)
        yield counter(
            "cleaned_values", "Non-finite feature values dropped before learning.", s.cleaned
        )
        yield counter(
            "sequence_gaps", "Readings missing from sequences (skipped sequence numbers).", s.gaps
        )
        yield counter(
            "devices_joined_midstream",
            "Devices first seen after their first reading (earlier ones are not counted as gaps).",
            s.joined_midstream,
        )
        yield counter(
            "redelivered_readings",
            "Readings the broker delivered again after a reconnect, already learned: skipped.",
            s.redelivered,
        )
        yield counter(
            "non_finite_predictions",
            "Predictions that were not finite numbers (published as null).",
            s.non_finite_predictions,
        )
        yield counts_by(
            "rejected",
            "Readings or messages refused before reaching a model, by reason.",
            "reason",
            s.rejected,
        )
        yield counter(
            "commits",
            "Checkpoints after which processed input was acknowledged to the broker.",
            s.commits,
        )
        yield counter(
            "sessions_lost",
            "Reconnects or restarts that found no MQTT session kept by the broker.",
            s.sessions_lost(),
        )
        yield counter("model_swaps", "Deployed models hot-swapped in.", s.swaps)
        yield gauge("devices", "Devices with a model on this stage.", s.devices)
        yield gauge("queue_depth", "Messages waiting to be processed.", s.queue_depth())
        yield gauge("queue_capacity", "Capacity of the message queue.", s.queue_capacity)
        limits = s.limits_used()
        bound = GaugeMetricFamily(
            f"{NAMESPACE}_limit", "A per-sender bound of this stage, by name.", labels=["limit"]
        )
        used = GaugeMetricFamily(
            f"{NAMESPACE}_limit_used",
            "How much of a per-sender bound is used (for a per-device one: by the device "
            "that uses most).",
            labels=["limit"],
        )
        for name, (u, b) in sorted(limits.items()):
            used.add_metric([name], u)
            bound.add_metric([name], b)
        yield bound
        yield used
        info = GaugeMetricFamily(
            f"{NAMESPACE}_model_info",
            "The model this stage serves (value is always 1).",
            labels=["model", "version"],
        )
        info.add_metric([s.model_name, str(s.model_version)], 1)
        yield info
        models = s.evaluated()
        m = models[0][1]
        for name in m.get("progressive") or {}:
            g = GaugeMetricFamily(
                f"{NAMESPACE}_model_{name}",
                f"River {_TITLES.get(name, name)} of the served model's predictions (and a "
                f"challenger's) since start, or over the last {m.get('window')} scored "
                "predictions.",
                labels=["model", "window"],
            )
            for model, metrics in models:
                for window in ("progressive", "rolling"):
                    value = (metrics.get(window) or {}).get(name)
                    if value is not None:
                        g.add_metric([model, window], value)
            yield g
        yield gauge("model_scored", "Predictions scored against a target.", m.get("count", 0))
        yield counts_by(
            "drifts",
            "Rises of a device's error seen by the drift detector, by model.",
            "model",
            s.drifts,
        )
        yield counter("anomalies", "Readings published as anomaly events.", s.anomalies)
        yield counter("promotions", "Challengers promoted to serve.", s.promotions)
        fleet = s.fleet
        if fleet is not None:
            yield counter(
                "fleet_updates_sent", "Model updates published for the fleet.", fleet.updates
            )
            yield counter(
                "fleet_models_received",
                "Fleet models verified and taken (new devices start from the newest).",
                fleet.received,
            )
            yield counts_by(
                "fleet_models_refused",
                "Fleet models refused, by reason (as deployed models are).",
                "reason",
                fleet.refused_by_reason(),
            )
            yield gauge(
                "fleet_model_version",
                "Version of the fleet model this stage has (0: none yet).",
                fleet.version,
            )
