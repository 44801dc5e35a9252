"""`streampipe train` and `streampipe evaluate`: models and scores from history, equal to
River's own over the same rows."""

from __future__ import annotations

import pickle
import random

import pytest
from replaying import write_csv
from river import datasets, evaluate, linear_model, metrics, preprocessing

from streampipe.cli import main
from streampipe.models.deploy import read_model_file

DEFAULT = "preprocessing.StandardScaler | linear_model.LinearRegression"
LOGISTIC = "preprocessing.StandardScaler | linear_model.LogisticRegression"


@pytest.fixture(scope="module")
def trump(tmp_path_factory):
    path = tmp_path_factory.mktemp("history") / "trump.csv"
    write_csv(path, datasets.TrumpApproval())
    return path


@pytest.fixture(scope="module")
def phishing(tmp_path_factory):
    path = tmp_path_factory.mktemp("history") / "phishing.csv"
    write_csv(path, datasets.Phishing())  # True/False as 1/0, as a device sends them
    return path


def fleet_rows(n=600, seed=7):
    """Three devices' readings, interleaved at random, each device its own relation."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        device = rng.choice(["m1", "m2", "m3"])
        a, b = rng.uniform(0, 10), rng.uniform(-5, 5)
        scale = {"m1": 1.0, "m2": 3.0, "m3": -2.0}[device]
        rows.append((device, {"a": a, "b": b}, scale * a + b + rng.gauss(0, 0.1)))
    return rows


@pytest.fixture
def fleet(tmp_path):
    path = tmp_path / "fleet.csv"
    rows = fleet_rows()
    with open(path, "w") as f:
        f.write("device,a,b,y\n")
        for device, x, y in rows:
            f.write(f"{device},{x['a']!r},{x['b']!r},{y!r}\n")
    return path, rows


def river_default(rows):
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    for x, y in rows:
        model.learn_one(x, y)
    return model


def assert_same_parameters(ours, river):
    scaler, regression = ours["StandardScaler"], ours["LinearRegression"]
    assert scaler.counts == river["StandardScaler"].counts
    assert scaler.means == river["StandardScaler"].means
    assert scaler.vars == river["StandardScaler"].vars
    assert regression.weights == river["LinearRegression"].weights
    assert regression.intercept == river["LinearRegression"].intercept


def test_train_learns_river_s_model_exactly_and_deploy_takes_it(trump, tmp_path, capsys):
    out = tmp_path / "trump.pkl"
    assert main(["train", str(trump), "--target", "y", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "  gallup:          feature" in captured.err  # replay's column report
    summary = captured.out.splitlines()
    assert len(summary) == 1
    assert summary[0].startswith("learned 1,001 of 1,001 rows in ")
    assert f"with StandardScaler|LinearRegression; wrote {out} (" in summary[0]
    assert summary[0].endswith(
        f"next: streampipe deploy {out} --model NAME --signing-key deploy.key --spec '{DEFAULT}'"
    )
    model = pickle.loads(out.read_bytes())
    assert_same_parameters(model, river_default(datasets.TrumpApproval()))
    data, kind = read_model_file(out)
    assert kind == "regressor" and data == out.read_bytes()


def test_train_maps_a_classifier_s_targets_as_the_edge_does(phishing, tmp_path, capsys):
    out = tmp_path / "phishing.pkl"
    assert main(["train", str(phishing), "--target", "y", "--model", LOGISTIC, "-o", str(out)]) == 0
    river = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    for x, y in datasets.Phishing():
        river.learn_one(x, y)  # y is a bool, as 1/0 in the file becomes
    ours = pickle.loads(out.read_bytes())
    assert ours["LogisticRegression"].weights == river["LogisticRegression"].weights
    assert ours["LogisticRegression"].intercept == river["LogisticRegression"].intercept
    assert read_model_file(out)[1] == "classifier"


def test_train_learns_every_device_in_file_order_or_one_device_s_rows(fleet, tmp_path, capsys):
    path, rows = fleet
    out = tmp_path / "all.pkl"
    assert main(["train", str(path), "--target", "y", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "device ids, one model over every device's rows, in file order" in err
    assert "3 devices in the first 1,000 rows: " in err
    assert_same_parameters(
        pickle.loads(out.read_bytes()), river_default([(x, y) for _, x, y in rows])
    )

    one = tmp_path / "m2.pkl"
    assert main(["train", str(path), "--target", "y", "--device", "m2", "-o", str(one)]) == 0
    assert " of device m2 " in capsys.readouterr().out
    m2 = [(x, y) for d, x, y in rows if d == "m2"]
    assert_same_parameters(pickle.loads(one.read_bytes()), river_default(m2))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--target", "nope"],
            "streampipe train: error: target column 'nope' is not in the header",
        ),
        (
            ["--target", "y", "--model", "linear_model.Nope"],
            "streampipe train: error: 'Nope' is not a River class allowed in linear_model",
        ),
        (
            ["--target", "y", "--features", "gallup,nope"],
            "streampipe train: error: feature column 'nope' is not in the header",
        ),
        (
            ["--target", "y", "--device", "m1"],
            "streampipe train: error: --device m1: the file has no device column",
        ),
    ],
)
def test_a_train_mistake_is_one_line_and_exit_2(trump, tmp_path, capsys, args, message):
    out = tmp_path / "never.pkl"
    assert main(["train", str(trump), *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(message)
    assert not out.exists()


def table(capsys, *args: str) -> list[str]:
    assert main(["evaluate", *args]) == 0
    return capsys.readouterr().out.splitlines()


def test_evaluate_prints_river_s_progressive_val_score(trump, capsys):
    river = [metrics.MAE(), metrics.RMSE(), metrics.R2()]
    for m in river:
        evaluate.progressive_val_score(datasets.TrumpApproval(), river_default([]), m)
    lines = table(capsys, str(trump), "--target", "y")
    assert lines[0] == f"{trump}: 1,001 rows, each predicted then learned by 1 model of each spec"
    assert lines[1].split() == ["MAE", "RMSE", "R2", "scored", "refused", "µs/row", "model"]
    assert "1.314548" in lines[2].split()
    assert lines[2].split()[:5] == [f"{m.get():,.6f}" for m in river] + ["1,001", "0"]
    assert lines[2].endswith(f"  {DEFAULT}")


def test_evaluate_compares_specs_side_by_side(trump, capsys):
    other = "preprocessing.StandardScaler | linear_model.LinearRegression(l2=0.1)"
    expected = evaluate.progressive_val_score(
        datasets.TrumpApproval(),
        preprocessing.StandardScaler() | linear_model.LinearRegression(l2=0.1),
        metrics.MAE(),
    )
    lines = table(capsys, str(trump), "--target", "y", "--model", DEFAULT, "--model", other)
    assert len(lines) == 4
    assert lines[2].split()[0] == "1.314548" and lines[2].endswith(f"  {DEFAULT}")
    assert lines[3].split()[0] == f"{expected.get():,.6f}" and lines[3].endswith(f"  {other}")


def test_evaluate_a_classifier_on_phishing_as_river_does(phishing, capsys):
    river = {"Accuracy": metrics.Accuracy(), "F1": metrics.F1(), "ROCAUC": metrics.ROCAUC()}
    for m in river.values():
        model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
        evaluate.progressive_val_score(datasets.Phishing(), model, m)
    lines = table(capsys, str(phishing), "--target", "y", "--model", LOGISTIC)
    assert lines[1].split()[:3] == ["Accuracy", "F1", "ROCAUC"]
    assert lines[2].split()[:3] == [f"{m.get():.2%}" for m in river.values()]
    assert lines[2].split()[0] == "89.28%"


def test_evaluate_learns_a_model_per_device_like_the_edge_or_one_for_all(fleet, capsys):
    path, rows = fleet
    per_device, models = metrics.MAE(), {}
    for device, x, y in rows:
        model = models.setdefault(
            device, preprocessing.StandardScaler() | linear_model.LinearRegression()
        )
        per_device.update(y, model.predict_one(x))
        model.learn_one(x, y)
    lines = table(capsys, str(path), "--target", "y")
    assert "3 models (one per device)" in lines[0]
    assert lines[2].split()[0] == f"{per_device.get():,.6f}"

    one = metrics.MAE()
    evaluate.progressive_val_score([(x, y) for _, x, y in rows], river_default([]), one)
    lines = table(capsys, str(path), "--target", "y", "--one-model")
    assert "by 1 model of each spec" in lines[0]
    assert lines[2].split()[0] == f"{one.get():,.6f}"


def test_evaluate_a_device_with_no_rows_is_one_line(fleet, capsys):
    path, _ = fleet
    assert main(["evaluate", str(path), "--target", "y", "--device", "m9"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"streampipe evaluate: error: device m9 has no rows in {path}"
