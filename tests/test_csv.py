"""CSV replay source: columns, missing cells, devices, timestamps, clear errors."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streampipe.sources import csv as csv_source
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
    got = sorted((r.device, r.seq, r.epoch, r.x["a"]) for r in rows)
    assert got == [("A", 0, 9, 1.0), ("A", 1, 9, 3.0), ("B", 0, 9, 2.0)]


def test_batches_hold_one_device_each_with_missing_cells_marked():
    text = "dev,a,b,y\nA,1,,1\nB,2,5,\nA,3,6,3\nA,4,7,4\n"
    src = CsvSource.from_text(text, target="y", device_column="dev", clock=lambda: 42.0)
    first, second, third = src.batches(3)  # rows 1-3 are one chunk, row 4 the next
    assert (first.device, first.seq.tolist(), first.values[:, 0].tolist()) == ("A", [0, 1], [1, 3])
    assert first.present.tolist() == [[True, False], [True, True]]
    assert (second.device, second.target) == ("B", None)  # no target in any of its rows
    assert (third.device, third.seq.tolist(), third.ts.tolist()) == ("A", [2], [42.0])


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("", {"target": "y"}, "empty"),
        ("a,b\n1,2\n", {"target": "y"}, "not in the header"),
        ("a,y\n1,x\n", {"target": "y"}, "row 2, column 'y': 'x' is not a number"),
        ("a,y\n1,\n", {"target": "y"}, "target column 'y' is empty in the first 1,000 rows"),
        ("y\n1\n", {"target": "y"}, "no numeric feature"),
        ("a,y\n1,2\n", {"target": "y", "time_column": "t"}, "time column 't'"),
        ("a,a,y\n1,2,3\n", {"target": "y"}, "names column 'a' twice"),
        ("a,y\n1,2\n", {"target": "y", "device_column": "y"}, "also the device or time"),
        ("a,b,y\n1,2,3\n", {"target": "y", "feature_columns": ["c"]}, "'c' is not in the header"),
        ("a,b,y\n1,2,3\n", {"target": "y", "feature_columns": ["y"]}, "'y' is the target"),
        ("a,y\n1,2\n", {"target": "y", "delimiter": "ab"}, "one character"),
    ],
)
def test_bad_files_get_clear_errors(text, kwargs, message):
    with pytest.raises(CsvError, match=message):
        CsvSource.from_text(text, **kwargs)


def test_plain_numeric_chunks_and_the_csv_path_read_the_same_values():
    """numpy reads plain numeric chunks; empty cells, words or quotes send a chunk
    (after a quote: the rest of the file) through csv. Both give float()'s values."""
    lines = ["0.1,2,3", "1e-7,-0.0,5", "7,,9", "nan,inf,11", '"12.5",13,14', "15,16,17"]
    text = "a,b,y\n" + "\n".join(lines) + "\n"
    src = CsvSource.from_text(text, target="y", device_id="d", clock=lambda: 0.0)
    got = [(r.seq, r.x, r.y) for b in src.batches(2) for r in b.readings()]
    expected = []
    for seq, line in enumerate(lines):
        a, b, y = (c.strip('"') for c in line.split(","))
        x = {k: float(v) for k, v in (("a", a), ("b", b)) if v}
        expected.append((seq, x, float(y)))
    assert [(s, {k: repr(v) for k, v in x.items()}, y) for s, x, y in got] == [
        (s, {k: repr(v) for k, v in x.items()}, y) for s, x, y in expected
    ]


def _bits(values) -> list[bytes]:
    return [struct.pack("<d", v) for v in values]


@pytest.mark.parametrize(
    "cell",
    ["-0", "-0.0", "0", "1e-0", "1E5", "-1e-5", " 2.5", "3 ", "18446744073709551615",
     "123456789012345678901234567890", "9007199254740993", "4.9e-324", "1e-400",
     "1.7976931348623157e308", "1e999", "1.", ".5", "+1", "01", "nan"],
)  # fmt: skip
def test_every_numeric_path_reads_a_cell_as_float_does(cell):
    """orjson reads plain chunks; what JSON reads otherwise (a bare -0 is the integer 0
    to it) or not at all goes to numpy or csv. Every path gives float()'s double."""
    text = f"a,b,y\n1.5,{cell},2\n{cell},0.25,3\r\n"
    src = CsvSource.from_text(text, target="y", device_id="d", clock=lambda: 0.0)
    (batch,) = src.batches(10)
    want = np.array([[1.5, float(cell)], [float(cell), 0.25]])
    assert _bits(batch.values.ravel().tolist()) == _bits(want.ravel().tolist())
    assert batch.target.tolist() == [2.0, 3.0]


def test_the_json_path_refuses_rows_of_another_width_and_non_numbers():
    width = 3
    assert csv_source._json_table(["1,2,3\n", "4,5\n"], width) is None
    assert csv_source._json_table(["1,2,3\n", "4,5,6,7\n"], width) is None
    assert csv_source._json_table(["1,2,\n"], width) is None  # an empty cell
    assert csv_source._json_table(["1,[2],3\n"], width) is None
    assert csv_source._json_table(["1,true,3\n"], width) is None
    assert csv_source._json_table(["1,-0,3\n"], width) is None  # the integer 0 to JSON
    got = csv_source._json_table(["1,2e3,-3.5\r\n", "4,5,6"], width)
    assert got is not None and got.tolist() == [[1.0, 2000.0, -3.5], [4.0, 5.0, 6.0]]


_FORMATS = [repr, "{:.17e}".format, "{:.25g}".format, "{:.3f}".format, lambda v: str(int(v))]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(allow_nan=False, allow_infinity=False, width=64),
            st.integers(0, len(_FORMATS) - 1),
        ),
        min_size=3,
        max_size=60,
    )
)
def test_replayed_values_are_float_of_the_cells(cells):
    """Whatever the spelling of a number, replay sends float(cell), bit for bit."""
    texts = []
    for v, f in cells:
        cell = _FORMATS[f](v) if f != 4 or abs(v) < 1e300 else repr(v)
        texts.append(cell)
    rows = [texts[i : i + 3] for i in range(0, len(texts) - len(texts) % 3, 3)]
    text = "a,b,y\n" + "".join(",".join(r) + "\n" for r in rows)
    src = CsvSource.from_text(text, target="y", device_id="d", clock=lambda: 0.0)
    got = [v for b in src.batches(7) for v in np.column_stack([b.values, b.target]).ravel()]
    assert _bits(got) == _bits([float(c) for r in rows for c in r])


def test_a_cell_error_names_the_row_as_a_user_counts_it_the_column_and_the_value():
    """Rows are the file's lines (the header is row 1), blank and multi-line rows too."""
    text = 'a,note,y\n1,"two\nlines",3\n\n2,x,ON\n'
    with pytest.raises(CsvError) as err:
        CsvSource.from_text(text, target="y", name="readings.csv")
    assert str(err.value) == (
        "readings.csv row 5, column 'y': 'ON' is not a number (a target must be a number or empty)"
    )


def test_a_bad_target_after_the_first_rows_stops_the_replay_there():
    """The first 1,000 rows are checked before anything is sent; a later bad target
    stops the replay with the same message, on either reading path."""
    rows = [f"{i},{i}" for i in range(1500)]
    rows[1200] = "5,ON"
    src = CsvSource.from_text("a,y\n" + "\n".join(rows) + "\n", target="y", name="f.csv")
    with pytest.raises(CsvError, match=r"^f\.csv row 1202, column 'y': 'ON' is not a number"):
        list(src.batches(100))
    text = "a,y,d\n" + "\n".join(f"{r},A" for r in rows) + "\n"
    src = CsvSource.from_text(text, target="y", device_column="d", name="f.csv")
    with pytest.raises(CsvError, match=r"^f\.csv row 1202, column 'y': 'ON' is not a number"):
        list(src.batches(100))


def test_a_decimal_comma_is_named_as_such():
    with pytest.raises(
        CsvError, match=r"'2,5' is not a number \(decimal commas are not read: write 2\.5\)"
    ):
        CsvSource.from_text("a;y\n1;2,5\n", target="y")


def test_feature_cells_that_are_not_numbers_are_sent_as_nan_and_the_first_named():
    """A column that is mostly numbers is a feature; its other cells go out as NaN,
    counted, the first few kept with their row and column for the summary."""
    lines = ["1,2,3"] * 9 + ["n/a,2,3", "1,?,3", "x,2,3", "y,2,3", "1,2,3"]
    src = CsvSource.from_text("a,b,y\n" + "\n".join(lines) + "\n", target="y", name="f.csv")
    assert src.features == ("a", "b")
    readings = list(src)
    assert math.isnan(readings[9].x["a"]) and math.isnan(readings[10].x["b"])
    assert src.unparsable == 4
    assert src.unparsable_examples == [(11, "a", "n/a"), (12, "b", "?"), (13, "a", "x")]


def test_time_and_device_cells_are_checked_with_their_row():
    with pytest.raises(CsvError, match=r"^row 3, column 't': 'yesterday' is neither a number"):
        CsvSource.from_text("t,a,y\n1,1,1\nyesterday,2,2\n", target="y", time_column="t")
    with pytest.raises(CsvError, match=r"^row 2, column 'd': 'a/b' cannot be a device id"):
        CsvSource.from_text("d,a,y\na/b,1,1\n", target="y", device_column="d")
    with pytest.raises(CsvError, match=r"^row 3, column 'd': '' cannot be a device id"):
        CsvSource.from_text("d,a,y\nA,1,1\n,2,2\n", target="y", device_column="d")


def test_what_is_not_a_feature_says_why():
    text = "t,site,a,b,blank,y\n2024-03-04T00:00:00Z,A,1,2,,3\n"
    src = CsvSource.from_text(text, target="y")
    assert src.features == ("a", "b")
    assert src.ignored == {"t": "times", "site": "text", "blank": "empty"}
    src = CsvSource.from_text(text, target="y", feature_columns=["b"], device_column="site")
    assert src.features == ("b",)
    assert src.ignored == {"t": "times", "a": "unlisted", "blank": "empty"}
    assert src.sample_devices == ("A",)


def test_a_text_column_named_as_a_feature_is_an_error_at_its_first_word():
    with pytest.raises(CsvError, match=r"^row 2, column 'site': 'A' is not a number \(most"):
        CsvSource.from_text("site,a,y\nA,1,3\n", target="y", feature_columns=["site", "a"])


def test_a_device_column_is_guessed_only_by_its_name_and_only_when_asked():
    text = "device,a,y\nm1,1,1\nm2,2,2\n"
    assert CsvSource.from_text(text, target="y").device_column is None
    src = CsvSource.from_text(text, target="y", guess_device_column=True)
    assert (src.device_column, src.device_guessed, src.sample_devices) == (
        "device",
        True,
        ("m1", "m2"),
    )
    assert sorted(r.device for r in src) == ["m1", "m2"]
    src = CsvSource.from_text(text, target="y", device_column="device", guess_device_column=True)
    assert not src.device_guessed
    both = "device,device_id,a,y\nm1,1,1,1\n"
    with pytest.raises(CsvError, match="could both hold device ids"):
        CsvSource.from_text(both, target="y", guess_device_column=True)


@pytest.mark.parametrize("delimiter", [";", "\t", ","])
def test_the_delimiter_is_sniffed_from_the_header_and_every_reading_path_uses_it(delimiter):
    """Plain numeric chunks (orjson, numpy), a chunk with an empty cell (csv), and after
    a quote the rest of the file (csv) all split on the sniffed delimiter."""
    cells = [["0.5", "2", "3"], ["1e-7", "-0.0", "5"], ["7", "", "9"], ['"12.5"', "13", "14"]]
    text = "a,b,y\n" + "".join(",".join(row) + "\n" for row in cells)
    src = CsvSource.from_text(text.replace(",", delimiter), target="y", device_id="d")
    assert (src.delimiter, src.delimiter_source, src.features) == (delimiter, "sniffed", ("a", "b"))
    got = [(r.x, r.y) for b in src.batches(2) for r in b.readings()]
    assert got == [
        ({"a": 0.5, "b": 2.0}, 3.0),
        ({"a": 1e-7, "b": -0.0}, 5.0),
        ({"a": 7.0}, 9.0),
        ({"a": 12.5, "b": 13.0}, 14.0),
    ]


def test_a_given_delimiter_is_used_as_given():
    src = CsvSource.from_text("a|y\n1|2\n", target="y", delimiter="|")
    assert (src.delimiter, src.delimiter_source, [r.y for r in src]) == ("|", "given", [2.0])
    assert csv_source.sniff_delimiter("a|y") is None
