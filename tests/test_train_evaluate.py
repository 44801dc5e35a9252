"""`streampipe train`: models from history, equal to River's own over the same rows."""

from __future__ import annotations

import pickle
import random

import pytest
from replaying import write_csv
from river import datasets, linear_model, preprocessing

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
