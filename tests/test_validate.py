"""Validation: every kind of bad value is stopped or cleaned before a model sees it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streampipe.readings import Batch, Reading
from streampipe.validate import (
    _DICT_OF_FROM,
    DEFAULT_MAX_ABS,
    LABELS,
    _apply_rules,
    validate,
)

NAN, INF = float("nan"), float("inf")


def one(x: dict, y: float | None = 1.0, seq: int = 0, ts: float = 1.0):
    return validate(Batch.from_readings([Reading("d", seq, ts, x, y)]))


@pytest.mark.parametrize(
    ("x", "y", "ts", "reason"),
    [
        ({"a": 1e308}, 1.0, 1.0, "value_out_of_range"),
        ({"a": -1e16}, 1.0, 1.0, "value_out_of_range"),
        ({"a": 1.0}, 1e308, 1.0, "value_out_of_range"),
        ({"a": 1.0}, NAN, 1.0, "non_finite_target"),
        ({"a": 1.0}, INF, 1.0, "non_finite_target"),
        ({"a": 1.0}, -INF, 1.0, "non_finite_target"),
        ({"a": 1.0}, 1.0, NAN, "invalid_timestamp"),
        ({"a": 1.0}, 1.0, -5.0, "invalid_timestamp"),
        ({"a": NAN}, 1.0, 1.0, "no_features"),
        ({}, 1.0, 1.0, "no_features"),
    ],
)
def test_bad_reading_is_rejected_with_reason(x, y, ts, reason):
    out = one(x, y, ts=ts)
    assert out.readings == []
    assert [r.reason for r in out.rejected] == [reason]


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_non_finite_feature_is_dropped_not_learned(bad):
    out = one({"a": 2.0, "b": bad})
    assert [r.x for r in out.readings] == [{"a": 2.0}]
    assert out.cleaned == 1


def test_one_bad_reading_does_not_cost_its_neighbours():
    readings = [Reading("d", i, 1.0 + i, {"a": float(i)}, float(i)) for i in range(5)]
    readings[2] = Reading("d", 2, 3.0, {"a": 1e308}, 2.0)
    out = validate(Batch.from_readings(readings))
    assert [r.seq for r in out.readings] == [0, 1, 3, 4]
    assert [(r.seq, r.reason) for r in out.rejected] == [(2, "value_out_of_range")]


def test_sequence_must_increase_within_a_batch():
    b = Batch(
        "d",
        0,
        np.array([0, 2, 2, 1, -1]),
        np.ones(5),
        ("a",),
        np.ones((5, 1)),
    )
    out = validate(b)
    assert [r.seq for r in out.readings] == [0, 2]
    assert {r.reason for r in out.rejected} == {"invalid_sequence"}


def test_clean_readings_pass_unchanged():
    r = Reading("d", 7, 12.5, {"a": -0.0, "b": 5e-324, "c": 1e15}, None, epoch=3)
    out = validate(Batch.from_readings([r]))
    assert out.readings == [r] and not out.rejected and out.cleaned == 0
    assert math.copysign(1.0, out.readings[0].x["a"]) == -1.0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(-2, 50),
            st.sampled_from([0.0, 5.0, -1.0, math.nan, math.inf]),
            st.lists(
                st.sampled_from([1.0, -2.5, 1e16, math.nan, -math.inf]), min_size=2, max_size=2
            ),
            st.sampled_from([None, 3.0, math.nan, 1e16, 0.0, 1.0, 0.5]),
        ),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from([None, *LABELS]),
)
def test_the_fast_path_agrees_with_the_rules(rows, labels):
    """validate() skips the rules when a batch is clean; it must never skip a bad one."""
    batch = Batch.from_readings(
        [Reading("d", seq, ts, {"a": a, "b": b}, y) for seq, ts, (a, b), y in rows]
    )
    fast, rules = validate(batch, labels=labels), _apply_rules(batch, DEFAULT_MAX_ABS, labels)
    assert fast.index.tolist() == rules.index.tolist()
    assert fast.rejected == rules.rejected and fast.cleaned == rules.cleaned
    assert fast.readings == rules.readings


@pytest.mark.parametrize(
    ("labels", "targets", "refused", "kept"),
    [
        ("binary", [0.0, 1.0, 2.0, -1.0, 0.5, None], [2, 3, 4], [False, True, None]),
        ("integer", [0.0, 3.0, -2.0, 0.5, None], [3], [0, 3, -2, None]),
    ],
)
def test_a_target_that_is_not_a_label_is_refused_and_labels_come_out_typed(
    labels, targets, refused, kept
):
    readings = [Reading("d", i, 1.0, {"a": 1.0}, y) for i, y in enumerate(targets)]
    out = validate(Batch.from_readings(readings), labels=labels)
    assert [(r.seq, r.reason) for r in out.rejected] == [(s, "invalid_label") for s in refused]
    got = out.labels(labels)
    assert got == kept and [type(v) for v in got] == [type(v) for v in kept]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from([None, 0.0, 1.0, 2.0, 0.5, -3.0]), min_size=1, max_size=6),
    st.sampled_from(LABELS),
)
def test_the_fast_path_agrees_with_the_rules_on_labels(targets, labels):
    """Clean readings but for their targets: only the label rule can refuse them."""
    batch = Batch.from_readings(
        [Reading("d", i, 1.0, {"a": 1.0}, y) for i, y in enumerate(targets)]
    )
    fast, rules = validate(batch, labels=labels), _apply_rules(batch, DEFAULT_MAX_ABS, labels)
    assert fast.index.tolist() == rules.index.tolist()
    assert fast.rejected == rules.rejected


@given(
    names=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=40, unique=True),
    values=st.lists(st.floats(-1e6, 1e6), min_size=40, max_size=40),
)
@settings(max_examples=60, deadline=None)
@pytest.mark.parametrize("n", [1, _DICT_OF_FROM])
def test_feature_dicts_are_the_readings_own(n, names, values):
    # Batches of _DICT_OF_FROM readings or more get dicts from code made of the names;
    # any name (quotes, backslashes, newlines, non-ASCII) must come out as it went in.
    rows = [dict(zip(names, values[i % 40 :] + values[: i % 40])) for i in range(n)]
    batch = Batch.from_readings([Reading("d", i, 1.0, x, 0.0) for i, x in enumerate(rows)])
    got = validate(batch).features()
    assert got == rows
    assert [list(x) for x in got] == [list(x) for x in rows]  # in the readings' order
