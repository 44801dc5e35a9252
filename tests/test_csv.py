"""CSV replay source: columns, missing cells, devices, timestamps, clear errors."""

from __future__ import annotations

import math

import pytest

from streampipe.sources.csv import CsvError, CsvSource


def test_features_are_the_numeric_columns_but_target_device_and_time():
    text = "site,time,temp,label,power\nA,2026-01-01T00:00:00,21.5,x,300\n"
    src = CsvSource.from_text(text, target="power", device_column="site", time_column="time")
    assert src.features == ("temp",)
    (r,) = list(src)
    assert (r.device, r.seq, r.ts, r.x, r.y) == ("A", 0, 1767225600.0, {"temp": 21.5}, 300.0)


def test_values_are_sent_as_they_are_in_the_file():
    text = "a,b,y\nnan,inf,1e308\n-inf,,\n"
    rows = list(CsvSource.from_text(text, target="y"))
    assert math.isnan(rows[0].x["a"]) and rows[0].x["b"] == math.inf and rows[0].y == 1e308
    assert rows[1].x == {"a": -math.inf} and rows[1].y is None


def test_each_device_is_numbered_from_zero():
    text = "dev,a,y\nA,1,1\nB,2,2\nA,3,3\n"
    rows = list(CsvSource.from_text(text, target="y", device_column="dev", epoch=9))
    assert [(r.device, r.seq, r.epoch) for r in rows] == [("A", 0, 9), ("B", 0, 9), ("A", 1, 9)]


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("", {"target": "y"}, "empty"),
        ("a,b\n1,2\n", {"target": "y"}, "not in the header"),
        ("a,y\n1,x\n", {"target": "y"}, "not numeric"),
        ("y\n1\n", {"target": "y"}, "no numeric feature"),
        ("a,y\n1,2\n", {"target": "y", "time_column": "t"}, "time column 't'"),
    ],
)
def test_bad_files_get_clear_errors(text, kwargs, message):
    with pytest.raises(CsvError, match=message):
        CsvSource.from_text(text, **kwargs)
