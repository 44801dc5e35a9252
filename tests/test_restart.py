"""An ordinary restart, as a user makes one: the sensors keep sending while the edge is
stopped (SIGTERM) and started again, and every reading is learned exactly once.

The frames queued for the stopped edge reach it, when it is back, before the retained
schemas that small frames name their fields by: the edge must know those schemas from
its checkpoint, and learn each device's frames in the order they came.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections import Counter

import pytest
from test_faults import STREAMPIPE, PersistentCapture, onlines, start_edge, stop

from streampipe.broker import PrivateMosquitto
from streampipe.topics import Topics
from streampipe.transport import BrokerURL, Message

DEVICES, RATE, DURATION = 20, 50, 25  # 1,000 readings/s for 25 s
DOWN = 12.0  # seconds the edge is stopped: the broker queues ~1,200 frames for it


class Predicted(PersistentCapture):
    """Also keeps the set of ``(device, seq)`` predicted so far, as they arrive."""

    def __init__(self, url: BrokerURL, topics: Topics) -> None:
        self.topics = topics
        self.predicted: set[tuple[str, int]] = set()
        self.repeated = 0
        super().__init__(
            url, [topics.predictions(), topics.status(), topics.deadletter(), topics.metrics()]
        )

    def _on(self, msg: Message) -> None:
        with self._cond:
            if msg.topic.startswith(self.topics.predictions("")):
                body = json.loads(msg.payload)
                for p in body["predictions"]:
                    key = (body["device"], p["seq"])
                    self.repeated += key in self.predicted
                    self.predicted.add(key)
            super()._on(msg)


def refused(cap: PersistentCapture, topics: Topics) -> dict[str, int]:
    """Dead letters by reason, counted in readings (messages, for whole messages)."""
    counts: Counter[str] = Counter()
    for d in cap.json(topics.deadletter()):
        counts[d["reason"]] += d.get("rejected_readings", 1)
    return dict(counts)


@pytest.mark.slow
def test_an_edge_restarted_while_sensors_send_learns_every_reading_once(tmp_path):
    topics = Topics(f"t{uuid.uuid4().hex[:6]}")
    with PrivateMosquitto(persistence=True) as broker:
        url = f"mqtt://127.0.0.1:{broker.port}"
        cap = Predicted(broker.url, topics)
        edge = start_edge(url, topics, tmp_path / "state")
        sensors = None
        try:
            assert cap.wait(lambda: onlines(cap, topics) == 1)
            sensors = subprocess.Popen(
                [*STREAMPIPE, "sensors", "--broker", url, "--topic-root", topics.root,
                 "--devices", str(DEVICES), "--rate", str(RATE), "--batch", "10",
                 "--linger", "200", "--duration", str(DURATION), "--no-faults"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert cap.wait(lambda: len(cap.predicted) >= 3 * RATE * DEVICES)  # 3 s of it
            stop(edge)  # SIGTERM: a clean stop, its last checkpoint written
            stopped_at = len(cap.predicted)
            time.sleep(DOWN)  # the edge is down; the broker queues what the sensors send
            edge = start_edge(url, topics, tmp_path / "state")
            assert cap.wait(lambda: onlines(cap, topics) == 2)
            out, err = sensors.communicate(timeout=DURATION + 60)
            assert sensors.returncode == 0, err
            published = int(out.split()[1].replace(",", ""))
            assert cap.wait(lambda: len(cap.predicted) >= published, timeout=60), (
                f"{published - len(cap.predicted)} of {published} readings never predicted; "
                f"dead letters: {refused(cap, topics)}"
            )
        finally:
            if sensors is not None and sensors.poll() is None:
                sensors.kill()
            stop(edge)  # publishes its final metrics
        cap.close()
    assert stopped_at < published - DOWN * RATE * DEVICES  # stopped mid-stream, for long
    by_device: dict[str, set[int]] = {}
    for device, seq in cap.predicted:
        by_device.setdefault(device, set()).add(seq)
    assert len(by_device) == DEVICES
    for device, got in by_device.items():
        assert got == set(range(len(got))), f"{device} is missing readings"
    assert len(cap.predicted) == published
    assert refused(cap, topics) == {}  # no duplicate, no unknown_schema, nothing
    assert cap.repeated == 0  # a clean stop commits everything: nothing predicted twice
    metrics = cap.json(topics.metrics())
    assert metrics and all(m["sequence_gaps"] == 0 for m in metrics)
