"""``streampipe ingest --record FILE``: what the gateway published, as a CSV that
``streampipe replay`` takes.

Readings go to ``FILE.jsonl`` as they are published (one JSON object a line, flushed at
every commit), and when the gateway stops the CSV is written from it: its columns are
known only then (devices bring features as they come). Columns: ``device``, ``time``
(Unix seconds, the reading's timestamp), every feature in name order, and ``target``
(empty where a reading had none). An empty feature cell is a value the reading did not
carry. Replay it with::

    streampipe replay FILE --target target --device-column device --time-column time

>>> import tempfile, pathlib
>>> from streampipe.readings import Reading
>>> path = pathlib.Path(tempfile.mkdtemp()) / "rec.csv"
>>> rec = Recorder(path)
>>> rec.add(Reading("a", 0, 10.5, {"v": 230.0}, y=1.5))
>>> rec.add(Reading("b", 0, 11.0, {"i": 0.25}))
>>> rec.close()
>>> print(path.read_text(), end="")
device,time,i,v,target
a,10.5,,230.0,1.5
b,11.0,0.25,,
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import orjson

from streampipe.readings import Reading

__all__ = ["Recorder"]


class Recorder:
    """Appends published readings to ``path.jsonl``; writes ``path`` (CSV) on close."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lines = self.path.with_name(self.path.name + ".jsonl")
        self._f = open(self.lines, "ab")  # noqa: SIM115 (closed in close())

    def add(self, r: Reading) -> None:
        self._f.write(orjson.dumps([r.device, r.ts, r.x, r.y]) + b"\n")

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        names: set[str] = set()
        with open(self.lines, "rb") as f:
            for line in f:
                names.update(orjson.loads(line)[2])
        features = sorted(names - {"device", "time", "target"})
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as out, open(self.lines, "rb") as f:
            w = csv.writer(out)
            w.writerow(["device", "time", *features, "target"])
            for line in f:
                device, ts, x, y = orjson.loads(line)
                w.writerow(
                    [device, repr(float(ts)), *(_cell(x.get(k)) for k in features), _cell(y)]
                )
        tmp.replace(self.path)


def _cell(v: float | None) -> str:
    return "" if v is None else repr(float(v))
