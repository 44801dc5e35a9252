"""Predictions over MQTT equal River's own offline progressive validation, seq by seq."""

from __future__ import annotations

import math

from replaying import predict_then_learn, replay_through_edge, write_csv
from river import datasets, evaluate, linear_model, metrics, preprocessing

TARGET = "five_thirty_eight"


def test_trump_approval_predictions_equal_river_offline(broker, topics, capture, tmp_path):
    rows = list(datasets.TrumpApproval())
    write_csv(tmp_path / "trump.csv", rows, target=TARGET)
    expected = predict_then_learn(rows)
    mae = evaluate.progressive_val_score(
        datasets.TrumpApproval(),
        preprocessing.StandardScaler() | linear_model.LinearRegression(),
        metrics.MAE(),
    )
    assert round(mae.get(), 6) == 1.314548

    # Replays through `streampipe replay` and `streampipe edge`, checks both exit 0, the
    # edge's online/offline status, and that every seq is predicted exactly once.
    out = replay_through_edge(
        broker, topics, capture, tmp_path / "trump.csv", device="trump", stage_id="exact",
        target=TARGET, edge_args=("--metrics-interval", "0.5"),
    )  # fmt: skip
    got = out.predictions
    assert len(got) == len(rows) == 1001
    assert {b["device"] for b in out.bodies} == {"trump"}
    assert all(b["version"] == 1 and b["model"] for b in out.bodies)
    for seq, (_, y) in enumerate(rows):
        assert got[seq]["y_pred"] == expected[seq], f"seq {seq} differs from River"
        assert got[seq]["y_true"] == y
    published_mae = sum(abs(got[s]["y_pred"] - y) for s, (_, y) in enumerate(rows)) / len(rows)
    assert math.isclose(published_mae, mae.get(), rel_tol=1e-12)
    assert out.metrics["predictions"] == len(rows)
    assert round(out.metrics["metrics"]["progressive"]["mae"], 6) == 1.314548
