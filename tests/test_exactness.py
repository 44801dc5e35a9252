"""Predictions over MQTT equal River's own offline progressive validation, seq by seq."""

from __future__ import annotations

import csv
import math
import signal
import subprocess
import sys
from pathlib import Path

from river import datasets, evaluate, linear_model, metrics, preprocessing

TARGET = "five_thirty_eight"


def export_trump_approval(path: Path) -> list[tuple[dict, float]]:
    rows = list(datasets.TrumpApproval())
    names = list(rows[0][0])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*names, TARGET])
        for x, y in rows:
            w.writerow([repr(x[n]) for n in names] + [repr(y)])  # repr: full precision
    return rows


def river_offline(rows: list[tuple[dict, float]]) -> list[float]:
    """River's own predict-then-learn, the order progressive_val_score uses."""
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    preds = []
    for x, y in rows:
        preds.append(model.predict_one(x))
        model.learn_one(x, y)
    return preds


def streampipe(*args: str) -> list[str]:
    return [sys.executable, "-m", "streampipe", *args]


def test_trump_approval_predictions_equal_river_offline(broker, topics, capture, tmp_path):
    rows = export_trump_approval(tmp_path / "trump.csv")
    expected = river_offline(rows)
    mae = evaluate.progressive_val_score(
        datasets.TrumpApproval(),
        preprocessing.StandardScaler() | linear_model.LinearRegression(),
        metrics.MAE(),
    )
    assert round(mae.get(), 6) == 1.314548

    url = f"mqtt://127.0.0.1:{broker.port}"
    cap = capture([topics.predictions(), topics.status(), topics.metrics()])
    edge = subprocess.Popen(
        streampipe(
            "edge",
            "--broker",
            url,
            "--stage-id",
            "exact",
            "--topic-root",
            topics.root,
            "--metrics-port",
            "-1",
            "--metrics-interval",
            "0.5",
        ),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert cap.wait(lambda: any(m.payload == b"online" for m in cap.on(topics.status()))), (
            "edge never announced online"
        )
        replay = subprocess.run(
            streampipe(
                "replay",
                str(tmp_path / "trump.csv"),
                "--broker",
                url,
                "--target",
                TARGET,
                "--topic-root",
                topics.root,
                "--batch",
                "64",
            ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert replay.returncode == 0, replay.stderr
        assert "replayed 1,001 readings" in replay.stdout
        assert "all acknowledged" in replay.stdout

        def received() -> dict[int, dict]:
            return {
                p["seq"]: p
                for body in cap.json(topics.predictions("trump"))
                for p in body["predictions"]
            }

        assert cap.wait(lambda: len(received()) == len(rows), timeout=60)
    finally:
        edge.send_signal(signal.SIGTERM)
        _, err = edge.communicate(timeout=30)
    assert edge.returncode == 0, err
    assert cap.wait(lambda: cap.on(topics.status())[-1].payload == b"offline")

    got = received()
    bodies = cap.json(topics.predictions("trump"))
    assert {b["device"] for b in bodies} == {"trump"}
    assert all(b["version"] == 1 and b["model"] for b in bodies)
    seqs = [p["seq"] for b in bodies for p in b["predictions"]]
    assert sorted(seqs) == list(range(len(rows))), "a seq was lost or predicted twice"
    for seq, (_, y) in enumerate(rows):
        assert got[seq]["y_pred"] == expected[seq], f"seq {seq} differs from River"
        assert got[seq]["y_true"] == y
    published_mae = sum(abs(got[s]["y_pred"] - y) for s, (_, y) in enumerate(rows)) / len(rows)
    assert math.isclose(published_mae, mae.get(), rel_tol=1e-12)
    final = cap.json(topics.metrics("exact"))[-1]
    assert final["predictions"] == len(rows)
    assert round(final["metrics"]["progressive"]["mae"], 6) == 1.314548
