"""Bytes per reading and encode/decode speed of streampipe's codec against the obvious
alternatives, on one reference sensor profile, all measured in the same run.

    python benchmarks/codec.py [--readings 20000] [--repeat 5]

Reference profile (a simulated boiler-room sensor, one device, one boot epoch):

* device id ``"boiler-1"``; seq consecutive from 864000 (one day after boot at 10 Hz);
* ts: wall clock at 10 Hz from 1795732390.0, each stamp jittered by a whole number of
  milliseconds in [-3, 3] and held to the millisecond (``round(t, 3)``);
* features at their sensors' natural precision:
  temperature C, 2 decimals: 21.5 + 2 sin(daily) + N(0, 0.03);
  humidity %RH, 1 decimal: 45 - 5 sin(daily) + N(0, 0.1);
  pressure hPa, 1 decimal: 1013.2 + slow drift + N(0, 0.05);
  vibration mm/s, 3 decimals: 2.3 + N(0, 0.05);
  current A, 2 decimals: 5.2 + 0.3 sin(hourly) + N(0, 0.05);
* target power W, 1 decimal: (230 + N(0, 1)) x current.

Encoders start from what a publisher holds: a list of reading dicts for JSON and
msgpack, a :class:`~streampipe.readings.Batch` for streampipe; decoders end there too.
Speeds are readings per second on one core, the median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import statistics
import time
from collections.abc import Callable

import msgpack
import numpy as np
import zstandard as zstd

from streampipe.codec import SchemaRegistry, decode, encode, schema_frame
from streampipe.readings import Batch

FEATURES = ("temperature", "humidity", "pressure", "vibration", "current")
DEVICE = "boiler-1"


def profile(n: int, seed: int = 0) -> Batch:
    """``n`` consecutive readings of the reference profile."""
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    jitter = rng.integers(-3, 4, n) / 1000
    ts = np.round(1795732390.0 + i / 10 + jitter, 3)
    day = 2 * np.pi * ts / 86400
    hour = 2 * np.pi * ts / 3600
    current = np.round(5.2 + 0.3 * np.sin(hour) + rng.normal(0, 0.05, n), 2)
    values = np.column_stack(
        [
            np.round(21.5 + 2 * np.sin(day) + rng.normal(0, 0.03, n), 2),
            np.round(45 - 5 * np.sin(day) + rng.normal(0, 0.1, n), 1),
            np.round(1013.2 + 0.5 * np.sin(day / 3) + rng.normal(0, 0.05, n), 1),
            np.round(2.3 + rng.normal(0, 0.05, n), 3),
            current,
        ]
    )
    power = np.round((230 + rng.normal(0, 1, n)) * current, 1)
    return Batch(DEVICE, 0, 864_000 + i, ts, FEATURES, values, target=power)


def split(batch: Batch, size: int) -> list[Batch]:
    out = []
    for s in range(0, len(batch) - size + 1, size):
        sl = slice(s, s + size)
        out.append(
            Batch(
                batch.device, batch.epoch, batch.seq[sl], batch.ts[sl], batch.features,
                batch.values[sl], target=batch.target[sl],
            )
        )  # fmt: skip
    return out


def as_dicts(batch: Batch) -> list[dict]:
    return [
        {"device": r.device, "seq": r.seq, "ts": r.ts, "x": r.x, "y": r.y} for r in batch.readings()
    ]


# Each codec: name -> (prepare one batch, encode it, decode it).
_cctx = zstd.ZstdCompressor(level=3)
_dctx = zstd.ZstdDecompressor()


def _json_encode(rows: list[dict]) -> list[bytes]:
    return [json.dumps(r, separators=(",", ":")).encode() for r in rows]


def _json_decode(msgs: list[bytes]) -> list[dict]:
    return [json.loads(m) for m in msgs]


def _codecs(registry: SchemaRegistry) -> dict[str, tuple[Callable, Callable, Callable]]:
    return {
        "JSON per reading": (as_dicts, _json_encode, _json_decode),
        "JSON+gzip batch": (
            as_dicts,
            lambda rows: [gzip.compress(json.dumps(rows, separators=(",", ":")).encode(), 6)],
            lambda msgs: json.loads(gzip.decompress(msgs[0])),
        ),
        "msgpack+zstd rows": (
            as_dicts,
            lambda rows: [_cctx.compress(msgpack.packb(rows))],
            lambda msgs: msgpack.unpackb(_dctx.decompress(msgs[0])),
        ),
        "streampipe": (lambda b: b, lambda b: [encode(b)], lambda msgs: decode(msgs[0])),
        "streampipe+schema id": (
            lambda b: b,
            lambda b: [encode(b, schema_id=True)],
            lambda msgs: decode(msgs[0], registry),
        ),
    }


def measure(readings: int, repeat: int) -> list[tuple]:
    full = profile(readings)
    registry = SchemaRegistry()
    registry.add_frame(schema_frame(full)[1])
    rows = []
    for size in (1, 10, 100, 1000):
        batches = split(full, size)
        n = len(batches) * size
        for name, (prepare, enc, dec) in _codecs(registry).items():
            items = [prepare(b) for b in batches]
            frames = [enc(x) for x in items]
            nbytes = sum(len(m) for msgs in frames for m in msgs)
            if name.startswith("streampipe"):
                assert all(dec(f).same_as(b) for f, b in zip(frames, batches))
            enc_t, dec_t = [], []
            for _ in range(repeat):
                t = time.perf_counter()
                for x in items:
                    enc(x)
                enc_t.append(time.perf_counter() - t)
                t = time.perf_counter()
                for f in frames:
                    dec(f)
                dec_t.append(time.perf_counter() - t)
            rows.append(
                (size, name, nbytes / n, n / statistics.median(enc_t), n / statistics.median(dec_t))
            )
    return rows


def cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readings", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = measure(args.readings, args.repeat)
    print(f"# {cpu()}, Python {platform.python_version()}, {args.readings} readings")
    print(f"{'batch':>5}  {'codec':<22}{'bytes/reading':>14}{'encode/s':>13}{'decode/s':>13}")
    for size, name, bpr, enc, dec in rows:
        print(f"{size:>5}  {name:<22}{bpr:>14.2f}{enc:>13,.0f}{dec:>13,.0f}")


if __name__ == "__main__":
    main()
