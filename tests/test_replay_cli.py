"""`streampipe replay` as a new user meets it: the column report, --features,
--delimiter, errors that name the row, column and value, and the shipped example."""

from __future__ import annotations

import csv
import importlib.util
import signal
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from streampipe import codec
from streampipe.cli import build_parser, main
from streampipe.learn import DEFAULT_MODEL_SPEC
from streampipe.learn.spec import ModelSpec

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "readings.csv"
NOWHERE = ("--broker", "mqtt://127.0.0.1:1")  # the report is printed before connecting


@pytest.fixture(autouse=True)
def _signal_handlers():
    """main() installs its own SIGINT and SIGTERM handlers: put pytest's back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def report(capsys, *args: str) -> list[str]:
    """The stderr lines of ``streampipe replay ARGS`` against no broker (exit code 2)."""
    assert main(["replay", *args, *NOWHERE]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "cannot reach broker" in err[-1]
    return err[:-1]


def test_the_report_says_what_each_column_became_and_why(capsys):
    assert report(capsys, str(EXAMPLE), "--target", "power") == [
        f"{EXAMPLE}: delimiter ',' (sniffed from the header)",
        "  time:        times, not a feature (use --time-column time to stamp readings with them)",
        "  device:      device ids, one model per device (named so; --device-id ID for one device)",
        "  voltage:     feature",
        "  current:     feature",
        "  temperature: feature",
        "  power:       target",
        "4 devices in the first 1,000 rows: meter-1, meter-2, meter-3, meter-4",
    ]


def test_with_device_id_a_device_column_is_text_and_the_report_says_how_to_split(capsys, tmp_path):
    path = tmp_path / "house.csv"
    path.write_text("when,device,volts,note,power\n1700000000,m1,230,ok,500\n")
    lines = report(capsys, str(path), "--target", "power", "--device-id", "m9")
    assert lines[1:] == [
        "  when:   feature",
        "  device: text, not a feature (use --device-column device to split readings by device)",
        "  volts:  feature",
        "  note:   text, not a feature (use --device-column note to split readings by device)",
        "  power:  target",
        "1 device, every row: m9 (--device-id)",
    ]
    lines = report(capsys, str(path), "--target", "power", "--time-column", "when")
    assert lines[1] == "  when:   timestamps (--time-column)"
    assert lines[4] == "  note:   text, not a feature"


def test_features_names_the_only_features(capsys, tmp_path):
    path = tmp_path / "house.csv"
    path.write_text("ts,volts,amps,power\n1,230,2,500\n")
    lines = report(capsys, str(path), "--target", "power", "--features", "amps")
    assert lines[1:] == [
        "  ts:    numbers, not a feature (not in --features)",
        "  volts: numbers, not a feature (not in --features)",
        "  amps:  feature",
        "  power: target",
        "1 device, every row: house (the file's name; --device-id ID to change it)",
    ]
    lines = report(capsys, str(path), "--target", "power")
    assert lines[1] == "  ts:    feature (if these numbers are times, use --time-column ts instead)"


def test_an_unnamed_column_a_row_index_say_is_not_a_feature(capsys, tmp_path):
    path = tmp_path / "house.csv"
    path.write_text(",volts,power\n0,230,500\n1,231,510\n")  # pandas' to_csv()
    assert report(capsys, str(path), "--target", "power")[1:4] == [
        "  (no name): not a feature (the header gives this column no name)",
        "  volts:     feature",
        "  power:     target",
    ]


def test_an_unknown_feature_is_one_line_naming_it_and_the_header(capsys, tmp_path):
    path = tmp_path / "house.csv"
    path.write_text("volts,amps,power\n230,2,500\n")
    assert main(["replay", str(path), "--target", "power", "--features", "volts,amp"]) == 2
    assert capsys.readouterr().err == (
        "streampipe replay: error: feature column 'amp' is not in the header "
        "(columns: volts, amps, power)\n"
    )


@pytest.mark.parametrize(("given", "how"), [((), "sniffed from the header"), ((";",), None)])
def test_a_semicolon_file_is_read_with_its_delimiter(capsys, tmp_path, given, how):
    path = tmp_path / "meter.csv"
    path.write_text("volts;amps;power\n230,5;2;500\n")
    args = ("--delimiter", *given) if given else ()
    lines = report(capsys, str(path), "--target", "power", "--features", "amps", *args)
    assert lines[0] == f"{path}: delimiter ';' ({how or '--delimiter'})"
    assert lines[1:4] == [
        "  volts: text, not a feature (use --device-column volts to split readings by device)",
        "  amps:  feature",
        "  power: target",
    ]


def run_replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streampipe", "replay", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_bad_cell_is_one_line_with_its_row_column_and_value(tmp_path):
    path = tmp_path / "readings.csv"
    path.write_text("volts,power\n230,500\n231,ON\n")
    result = run_replay(str(path), "--target", "power", *NOWHERE)
    assert result.returncode == 2
    assert result.stderr == (
        f"streampipe replay: error: {path} row 3, column 'power': 'ON' is not a number "
        "(a target must be a number or empty)\n"
    )


@pytest.mark.parametrize(
    ("text", "args", "message"),
    [
        ("t,a,power\nnoon,1,2\n", ("--time-column", "t"), "row 2, column 't': 'noon' is neither"),
        ("d,a,power\nx/y,1,2\n", ("--device-column", "d"), "row 2, column 'd': 'x/y' cannot be"),
        ("a;power\n1;2,5\n", (), "row 2, column 'power': '2,5' is not a number (decimal commas"),
        ("a,power\n1,2\n", ("--device-id", "x", "--device-column", "a"), "not allowed with"),
        ("a,power\n1,2\n", ("--delimiter", "::"), "one character"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2_never_a_traceback(tmp_path, text, args, message):
    path = tmp_path / "f.csv"
    path.write_text(text)
    result = run_replay(str(path), "--target", "power", *args, *NOWHERE)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1


def test_help_describes_replay_and_every_option_its_default():
    parser = build_parser()
    (sub,) = (a for a in parser._actions if a.dest == "command")
    replay = sub.choices["replay"]
    assert "what each column became" in " ".join(replay.description.split())
    for action in replay._actions:
        if action.option_strings and action.dest != "help":
            told = action.help or ""
            assert "default" in told or action.required or "$STREAMPIPE_" in told, action.dest


def frames(cap, topics) -> list:
    """The reading frames captured, decoded with the schemas captured too."""
    schemas = codec.SchemaRegistry()
    for m in cap.on(topics.schemas()):
        schemas.add_frame(m.payload, schema_id=m.topic.rsplit("/", 1)[1])
    return [codec.decode(m.payload, schemas) for m in cap.on(topics.readings_filter()[0])]


def test_the_shipped_example_replays_as_four_meters(broker, topics, capture, capsys):
    """examples/readings.csv, as the README replays it: one device per meter, three
    features, each meter's readings numbered from 0 and stamped with the file's times."""
    cap = capture([*topics.readings_filter(), topics.schemas()])
    url = f"mqtt://127.0.0.1:{broker.port}"
    args = ["replay", str(EXAMPLE), "--target", "power", "--time-column", "time"]
    assert main([*args, "--broker", url, "--topic-root", topics.root]) == 0
    out, err = capsys.readouterr()
    assert "replayed 1,536 readings" in out and "all acknowledged" in out
    assert "  time:        timestamps (--time-column)" in err.splitlines()
    assert cap.wait(lambda: sum(len(b) for b in frames(cap, topics)) == 1536)
    by_device: dict[str, list] = {}
    for batch in frames(cap, topics):
        assert batch.features == ("voltage", "current", "temperature")
        assert batch.target is not None and batch.present is None
        by_device.setdefault(batch.device, []).extend(batch.readings())
    assert sorted(by_device) == ["meter-1", "meter-2", "meter-3", "meter-4"]
    start = datetime(2024, 3, 4, tzinfo=UTC).timestamp()
    for readings in by_device.values():
        readings.sort(key=lambda r: r.seq)
        assert [r.seq for r in readings] == list(range(384))
        assert [r.ts for r in readings] == [start + 900 * k for k in range(384)]
        assert all(200 < r.x["voltage"] < 260 and r.y > 0 for r in readings)


def test_a_bad_target_late_in_the_file_stops_the_replay_there(broker, topics, tmp_path, capsys):
    path = tmp_path / "late.csv"
    rows = [f"{i},{2 * i}" for i in range(1500)]
    rows[1400] = "1400,ON"
    path.write_text("a,power\n" + "\n".join(rows) + "\n")
    url = f"mqtt://127.0.0.1:{broker.port}"
    args = ["replay", str(path), "--target", "power", "--batch", "100"]
    assert main([*args, "--broker", url, "--topic-root", topics.root]) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert error == (
        f"streampipe replay: error: {path} row 1402, column 'power': 'ON' is not a number "
        "(a target must be a number or empty); replay stopped there, after 1,400 readings"
    )


def test_the_summary_names_the_first_feature_cells_that_were_not_numbers(
    broker, topics, tmp_path, caplog
):
    path = tmp_path / "meter.csv"
    rows = [f"{230 + i % 3},{i % 7},{i}" for i in range(40)]
    rows[5], rows[30] = "n/a,5,5", "230,?,30"
    path.write_text("volts,amps,power\n" + "\n".join(rows) + "\n")
    url = f"mqtt://127.0.0.1:{broker.port}"
    assert main(["replay", str(path), "--target", "power", "--broker", url,
                 "--topic-root", topics.root]) == 0  # fmt: skip
    assert (
        "2 feature cells were not numbers and went out as NaN (the edge cleans and counts "
        f"them): {path} row 7, column 'volts': 'n/a'; row 32, column 'amps': '?'"
    ) in caplog.messages


def test_the_example_is_what_make_readings_writes_and_stays_small(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_readings", EXAMPLE.parent / "make_readings.py"
    )
    make_readings = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_readings)
    make_readings.main(str(tmp_path / "readings.csv"))
    assert (tmp_path / "readings.csv").read_bytes() == EXAMPLE.read_bytes()
    assert EXAMPLE.stat().st_size < 150_000


def test_the_default_model_learns_the_example_one_model_per_meter():
    """What examples/README.md says: predict-then-learn with the edge's default model,
    per meter, the error falls from day 1 to day 4 and ends below one model for all."""
    rows = list(csv.DictReader(EXAMPLE.open()))
    features = ("voltage", "current", "temperature")

    def errors(device_of) -> list[float]:
        models: dict[str, object] = {}
        out = []
        for row in rows:
            model = models.setdefault(device_of(row), ModelSpec.parse(DEFAULT_MODEL_SPEC).build())
            x, y = {f: float(row[f]) for f in features}, float(row["power"])
            out.append(abs(model.predict_one(x) - y))
            model.learn_one(x, y)
        return out

    def mae(errs: list[float], day: int) -> float:
        day_rows = len(errs) // 4
        return statistics.fmean(errs[day * day_rows : (day + 1) * day_rows])

    per_meter, as_one = errors(lambda row: row["device"]), errors(lambda row: "house")
    assert mae(per_meter, 0) > 400 and mae(per_meter, 3) < 40
    assert mae(as_one, 3) > 1.5 * mae(per_meter, 3)
