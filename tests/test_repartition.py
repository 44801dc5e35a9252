"""A stage restarted with other ``--partitions`` serves only those: its persistent
session's old readings subscription is dropped, and readings the broker had queued under
it are dead letters (``unserved_partition``), not learned by a second edge."""

from __future__ import annotations

import uuid

from faults import running

from streampipe import codec
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.readings import Batch, Reading
from streampipe.topics import partition_of
from streampipe.transport import Connection

LOW = tuple(range(32))


def test_a_stage_restarted_with_partitions_learns_only_those(broker, topics, capture):
    devices = [f"meter-{i}" for i in range(12)]
    high = [d for d in devices if partition_of(d) not in LOW]
    low = [d for d in devices if partition_of(d) in LOW]
    assert high and low
    config = {"topic_root": topics.root, "metrics_port": None}
    with running(EdgeService(EdgeConfig(broker.url, "edge-1", **config)).start()):
        pass  # all partitions: the session subscribes to every one
    cap = capture([topics.predictions(), topics.deadletter("edge-1")])
    with Connection(broker.url, f"p-{uuid.uuid4().hex[:6]}").connect() as pub:

        def send(seq: int) -> None:
            for d in devices:
                frame = codec.encode(
                    Batch.from_readings([Reading(d, seq, 1.0 + seq, {"a": 1.0}, 2.0)])
                )
                pub.publish(topics.readings(d), frame).wait_for_publish(10)

        send(0)  # queued for edge-1's session, under its subscription to every partition
        again = EdgeService(EdgeConfig(broker.url, "edge-1", partitions=LOW, **config)).start()
        with running(again):
            send(1)  # after the restart: only the low partitions' readings come at all
            assert cap.wait(lambda: len(cap.json(topics.predictions())) == 2 * len(low))
            assert cap.wait(lambda: len(cap.json(topics.deadletter("edge-1"))) == len(high))
    assert set(again.stage.learner.devices) == set(low)
    dead = cap.json(topics.deadletter("edge-1"))
    assert {b["reason"] for b in dead} == {"unserved_partition"}
    assert sorted(b["topic"] for b in dead) == sorted(topics.readings(d) for d in high)
