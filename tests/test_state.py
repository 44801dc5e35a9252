"""Checkpoints at the edge: a restarted edge resumes where it stopped, with its own model.

The store itself (integrity, crash safety, locking) is tested in test_checkpoint_store.py.
"""

from __future__ import annotations

import os
import threading

import pytest
from river import datasets, linear_model, preprocessing

from streampipe import codec
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.readings import Batch, Reading
from streampipe.transport import Connection


def run_edge(broker, topics, state_dir):
    service = EdgeService(
        EdgeConfig(broker.url, "resume", topic_root=topics.root, state_dir=str(state_dir))
    ).start()
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    return service, thread


def publish(broker, topics, readings):
    conn = Connection(broker.url, "resume-pub").connect()
    try:
        for i in range(0, len(readings), 50):
            frame = codec.encode(Batch.from_readings(readings[i : i + 50]))
            conn.publish(topics.readings("d"), frame).wait_for_publish(10)
    finally:
        conn.close()


def test_restarted_edge_resumes_models_and_watermarks(broker, topics, capture, tmp_path):
    rows = list(datasets.TrumpApproval())[:400]
    readings = [Reading("d", i, float(i), x, y, epoch=5) for i, (x, y) in enumerate(rows)]
    cap = capture([topics.predictions()])

    def seqs() -> list[int]:
        return [p["seq"] for b in cap.json(topics.predictions()) for p in b["predictions"]]

    service, thread = run_edge(broker, topics, tmp_path)
    publish(broker, topics, readings[:200])
    assert cap.wait(lambda: len(seqs()) == 200)
    service.stop()
    thread.join(30)
    assert (tmp_path / "resume.checkpoint.sqlite").exists()
    assert os.stat(tmp_path / "checkpoint.key").st_mode & 0o777 == 0o600

    service, thread = run_edge(broker, topics, tmp_path)
    try:
        publish(broker, topics, readings[150:])  # 50 already learned: a redelivery
        assert cap.wait(lambda: len(seqs()) == 400)
    finally:
        service.stop()
        thread.join(30)
    assert sorted(seqs()) == list(range(400)), "nothing lost, nothing learned twice"
    assert service.stats.rejected == {"duplicate": 50}
    model = preprocessing.StandardScaler() | linear_model.LinearRegression()
    got = {p["seq"]: p["y_pred"] for b in cap.json(topics.predictions()) for p in b["predictions"]}
    for i, (x, y) in enumerate(rows):
        assert got[i] == model.predict_one(x), f"seq {i} differs from River offline"
        model.learn_one(x, y)


def test_checkpoint_of_another_model_is_refused(broker, topics, tmp_path):
    service, thread = run_edge(broker, topics, tmp_path)
    service.stop()
    thread.join(30)
    other = EdgeService(
        EdgeConfig(
            broker.url,
            "resume",
            topic_root=topics.root,
            model="linear_model.LinearRegression",
            state_dir=str(tmp_path),
        )
    )
    with pytest.raises(ValueError, match="same --model"):
        other.start()
    other.conn.close()
