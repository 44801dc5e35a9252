"""``streampipe demo``: broker, simulated sensors and an edge stage in one command.

Starts a private Mosquitto (unless ``--broker`` is given), an edge stage and a fleet
of simulated sensors, then prints predictions and rolling metrics as they arrive on
MQTT — the same messages any MQTT client sees — until Ctrl-C or ``--duration``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from typing import Any, TextIO

from streampipe.broker import PrivateMosquitto
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.topics import Topics
from streampipe.transport import Connection, Message

__all__ = ["run_demo"]

#: The edge's clean stop waits at most ~10 s for an unreachable broker, then gives up.
EDGE_STOP_TIMEOUT = 15.0


class _Watcher:
    """Subscribes to predictions and metrics and prints a readable summary."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lock = threading.Lock()
        self.predictions = 0
        self._last_print = 0.0

    def on_message(self, msg: Message) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        with self.lock:
            if "/predictions/" in msg.topic:
                self.predictions += len(body.get("predictions", []))
                now = time.monotonic()
                if now - self._last_print >= 1.0 and body.get("predictions"):
                    self._last_print = now
                    p = body["predictions"][-1]
                    self._print(
                        f"prediction  {body['device']:<12} seq {p['seq']:>6}  "
                        f"y_pred {_num(p['y_pred'])}  y_true {_num(p['y_true'])}"
                    )
            elif "/metrics/" in msg.topic:
                self._print(_metrics_line(body))

    def _print(self, line: str) -> None:
        print(line, file=self.out, flush=True)


def _num(v: Any) -> str:
    return f"{v:9.2f}" if isinstance(v, int | float) else f"{'-':>9}"


def _metrics_line(m: dict[str, Any]) -> str:
    met = m.get("metrics") or {}
    prog, roll = met.get("progressive") or {}, met.get("rolling") or {}
    parts = [
        f"metrics     {m.get('stage')}: {m.get('readings', 0):,} readings",
        f"{m.get('predictions', 0):,} predictions",
        f"{m.get('rejected', 0):,} rejected",
        f"{m.get('devices', 0)} devices",
    ]
    for name in ("mae", "rmse", "r2", "accuracy"):
        if name in prog:
            parts.append(
                f"{name.upper()} {_short(prog[name])} (last {met.get('window')}: "
                f"{_short(roll.get(name))})"
            )
    return " | ".join(parts)


def _short(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, int | float) else "-"


def _stop_on_signals(stop: threading.Event, stack: contextlib.ExitStack) -> None:
    """Ctrl-C (or SIGTERM) sets ``stop``, and the demo stops in order; a second one
    interrupts at once."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        stop.set()
        for sig, was in previous.items():
            signal.signal(sig, was)

    for sig, was in previous.items():
        signal.signal(sig, handler)
        stack.callback(signal.signal, sig, was)


def run_demo(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from streampipe.cli.sensors import run_sensors

    stop = threading.Event()
    # The stack stops what it holds last-started first: sensors (below), then the edge,
    # the watcher and the broker, each still reachable by those before it.
    with contextlib.ExitStack() as stack:
        _stop_on_signals(stop, stack)
        broker_url = args.broker
        if broker_url is None:
            broker = stack.enter_context(PrivateMosquitto())
            broker_url = broker.url
            print(f"started a private Mosquitto at {broker_url}", file=out, flush=True)
        topics = Topics(args.topic_root)
        watcher = _Watcher(out)
        watch = Connection(
            broker_url, f"streampipe-demo-watch-{id(watcher):x}", on_message=watcher.on_message
        ).connect()
        stack.callback(watch.close)
        watch.subscribe([topics.predictions(), topics.metrics()], qos=0)
        stage_id = "demo-edge"
        edge = EdgeService(
            EdgeConfig(
                broker=broker_url,
                stage_id=stage_id,
                model=args.model,
                topic_root=args.topic_root,
                metrics_port=None if args.metrics_port < 0 else args.metrics_port,
                metrics_interval=2.0,
                window=200,
            )
        ).start()
        edge_thread = threading.Thread(target=edge.run, name="edge", daemon=True)
        edge_thread.start()
        stack.callback(edge_thread.join, EDGE_STOP_TIMEOUT)
        stack.callback(edge.stop)
        print(
            f"edge stage {stage_id!r} learning {args.model!r}; "
            + (
                f"Prometheus metrics on http://127.0.0.1:{edge.metrics_port}/metrics; "
                if edge.metrics_port
                else ""
            )
            + f"try: mosquitto_sub -h {broker_url.host} -p {broker_url.port} "
            f"-t '{topics.predictions()}' -v   (Ctrl-C to stop)",
            file=out,
            flush=True,
        )
        run_sensors(
            broker_url,
            topics,
            devices=args.devices,
            rate=args.rate,
            duration=args.duration,
            seed=0,
            batch=10,
            linger=0.2,
            faults=False,  # a spike ×5–10 throws plain SGD regression far off course
            stop=stop,
        )
    print(f"demo stopped: {watcher.predictions:,} predictions received", file=out, flush=True)
    return 0
