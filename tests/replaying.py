"""Helpers for end-to-end tests: a CSV file, `streampipe replay` → Mosquitto → `streampipe edge`."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from river import linear_model, preprocessing


def streampipe(*args: str) -> list[str]:
    return [sys.executable, "-m", "streampipe", *args]


def write_csv(path: Path, rows: Iterable[tuple[dict, Any]], target: str = "y") -> None:
    """Rows of (features, target) as CSV, every number at full precision (repr); a bool
    target is written as 1 or 0, as a device would send it."""
    rows = list(rows)
    names = list(rows[0][0])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*names, target])
        for x, y in rows:
            w.writerow([repr(x[n]) for n in names] + [repr(int(y) if isinstance(y, bool) else y)])


def predict_then_learn(rows: list[tuple[dict[str, float], float]], model: Any = None) -> list:
    """River's own predict-then-learn on ``rows``, from ``model``'s current state (by
    default a new ``StandardScaler | LinearRegression``, the edge's default model)."""
    if model is None:
        model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    expected = []
    for x, y in rows:
        expected.append(model.predict_one(x))
        model.learn_one(x, y)
    return expected


def start_replay(url: str, topics: Any, path: Path, *options: str) -> subprocess.Popen:
    """``streampipe replay path`` of target column ``y`` to ``url`` in the background,
    with ``options`` (e.g. ``--rate``, ``--batch``); its output is piped, as text."""
    return subprocess.Popen(
        streampipe(
            "replay",
            str(path),
            "--broker",
            url,
            "--target",
            "y",
            "--topic-root",
            topics.root,
            *options,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@dataclass
class Replayed:
    predictions: dict[int, dict]  # by seq
    bodies: list[dict]
    metrics: dict  # the last metrics message, published on the edge's clean stop
    events: list[dict]


def replay_through_edge(
    broker: Any,
    topics: Any,
    capture: Any,
    csv_path: Path,
    *,
    device: str,
    stage_id: str,
    edge_args: tuple[str, ...] = (),
    target: str = "y",
) -> Replayed:
    """Start an edge, replay ``csv_path`` to it, wait for every prediction, stop it cleanly."""
    expected = len(csv_path.read_text().splitlines()) - 1
    url = f"mqtt://127.0.0.1:{broker.port}"
    root = ("--topic-root", topics.root)
    cap = capture(
        [topics.predictions(), topics.status(), topics.metrics(), topics.events(stage_id)]
    )
    edge = subprocess.Popen(
        streampipe(
            "edge",
            "--broker",
            url,
            "--stage-id",
            stage_id,
            *root,
            "--metrics-port",
            "-1",
            *edge_args,
        ),
        stderr=subprocess.PIPE,
        text=True,
    )

    def received() -> dict[int, dict]:
        return {p["seq"]: p for b in cap.json(topics.predictions(device)) for p in b["predictions"]}

    try:
        assert cap.wait(lambda: any(m.payload == b"online" for m in cap.on(topics.status()))), (
            "edge never announced online"
        )
        replay_args = ("--target", target, "--device-id", device, *root, "--batch", "64")
        replay = subprocess.run(
            streampipe("replay", str(csv_path), "--broker", url, *replay_args),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert replay.returncode == 0, replay.stderr
        assert "all acknowledged" in replay.stdout
        assert cap.wait(lambda: len(received()) == expected, timeout=60), (
            f"{len(received())} of {expected} predictions arrived"
        )
    finally:
        edge.send_signal(signal.SIGTERM)
        _, err = edge.communicate(timeout=30)
    assert edge.returncode == 0, err
    assert cap.wait(lambda: cap.on(topics.status())[-1].payload == b"offline")
    bodies = cap.json(topics.predictions(device))
    seqs = sorted(p["seq"] for b in bodies for p in b["predictions"])
    assert seqs == list(range(expected)), "a seq was lost or predicted twice"
    metrics = cap.json(topics.metrics(stage_id))[-1]
    return Replayed(received(), bodies, metrics, cap.json(topics.events(stage_id)))
