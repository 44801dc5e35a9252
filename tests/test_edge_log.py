"""What a running edge says in its log after ``online``: a one-line summary now and then."""

from __future__ import annotations

import itertools
import logging
import re
import threading
import uuid

from streampipe import codec
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.readings import Batch, Reading
from streampipe.transport import Connection


class Lines(logging.Handler):
    """The messages logged to a logger, with a wait for a condition on them."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[float, str]] = []  # (when, message)
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._cond:
            self.records.append((record.created, record.getMessage()))
            self._cond.notify_all()

    def starting(self, prefix: str) -> list[tuple[float, str]]:
        with self._cond:
            return [(t, m) for t, m in self.records if m.startswith(prefix)]

    def wait(self, condition, timeout: float = 30.0) -> bool:
        with self._cond:
            return self._cond.wait_for(condition, timeout)


def test_a_running_edge_logs_what_it_did_every_summary_interval(broker, topics, caplog):
    caplog.set_level(logging.INFO, logger="streampipe.edge")
    lines = Lines()
    logging.getLogger("streampipe.edge").addHandler(lines)
    config = EdgeConfig(broker.url, "chatty", topic_root=topics.root, summary_interval=0.5)
    service = EdgeService(config).start()
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    pub = Connection(broker.url, f"pub-{uuid.uuid4().hex[:8]}").connect()
    try:
        for start in range(0, 40, 10):
            data = [
                Reading("d1", s, 1e9 + s, {"a": s % 7}, 2.0 * (s % 7))
                for s in range(start, start + 10)
            ]
            frame = codec.encode(Batch.from_readings(data))
            pub.publish(topics.readings("d1"), frame, qos=1).wait_for_publish(10)
        pub.publish(topics.readings("d1"), b"garbage", qos=1).wait_for_publish(10)

        def all_in() -> bool:
            return any("40 readings" in m and "refused" in m for _, m in lines.starting("chatty: "))

        assert lines.wait(all_in), lines.records
    finally:
        pub.close()
        service.stop()
        thread.join(30)
        logging.getLogger("streampipe.edge").removeHandler(lines)
    assert not thread.is_alive()
    summaries = lines.starting("chatty: ")
    line = next(m for _, m in summaries if "40 readings" in m)
    assert re.fullmatch(
        r"chatty: 40 readings \([\d.,]+/s\), 40 predicted, 1 device, "
        r"1 refused \(bad_magic 1\), rolling MAE [\d.e+-]+, queue 0",
        line,
    ), line
    # No more often than the interval; the last one is the edge's at its stop.
    times = [t for t, _ in summaries]
    assert all(b - a > 0.45 for a, b in itertools.pairwise(times[:-1])), times
    assert summaries[-1][1].startswith("chatty: 40 readings")
