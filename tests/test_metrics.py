"""Small-batch paths in plain Python count exactly what the numpy paths count, and one
value observed for many readings counts as each of them."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from streampipe.learn.learner import _null_non_finite
from streampipe.metrics import LATENCY_BUCKETS, LatencyHistogram

NAME = LatencyHistogram.NAME
seconds = st.floats(0.0, 20.0) | st.sampled_from(LATENCY_BUCKETS)  # bounds: le is inclusive


def buckets(h: LatencyHistogram) -> list[float]:
    registry = CollectorRegistry()
    registry.register(h)
    les = [*(str(b) for b in LATENCY_BUCKETS), "+Inf"]
    return [registry.get_sample_value(f"{NAME}_bucket", {"le": le}) for le in les]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(seconds, min_size=0, max_size=20), min_size=1, max_size=6))
def test_latency_buckets_agree_whatever_the_batch_sizes(batches):
    one_by_one, all_at_once = LatencyHistogram(), LatencyHistogram()
    for b in batches:
        one_by_one.observe_many(np.array(b, dtype=float))
    everything = np.array([v for b in batches for v in b], dtype=float)
    all_at_once.observe_many(everything)
    expected = np.cumsum(
        np.bincount(
            np.searchsorted(LATENCY_BUCKETS, everything, side="left"),
            minlength=len(LATENCY_BUCKETS) + 1,
        )
    ).tolist()
    assert buckets(one_by_one) == buckets(all_at_once) == expected
    registry = CollectorRegistry()
    registry.register(one_by_one)
    assert math.isclose(
        registry.get_sample_value(f"{NAME}_sum"), float(everything.sum()), abs_tol=1e-9
    )


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(seconds, st.integers(1, 50)), max_size=10))
def test_one_value_for_a_whole_message_counts_as_each_of_its_readings(observations):
    together, each = LatencyHistogram(), LatencyHistogram()
    for value, n in observations:
        together.observe(value, n)
        each.observe_many(np.full(n, value))
    assert buckets(together) == buckets(each)


predictions = st.one_of(
    st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5)
)


@settings(max_examples=200, deadline=None)
@given(st.lists(predictions, max_size=20))
def test_non_finite_predictions_become_none_at_any_batch_size(y_pred):
    expected = [None if isinstance(p, float) and not math.isfinite(p) else p for p in y_pred]
    got = list(y_pred)
    assert _null_non_finite(got) == sum(a is not b for a, b in zip(y_pred, expected))
    assert got == expected or all(
        (a is None and b is None) or a == b for a, b in zip(got, expected)
    )
