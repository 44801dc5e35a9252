"""``streampipe demo``: broker, simulated sensors and an edge stage in one command.

Starts a private Mosquitto (unless ``--broker`` is given), an edge stage and a fleet
of simulated sensors, then prints predictions and rolling metrics as they arrive on
MQTT — the same messages any MQTT client sees — until Ctrl-C or ``--duration``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import signal
import sys
import textwrap
import threading
import time
from typing import Any, TextIO

from streampipe.broker import PrivateMosquitto
from streampipe.edge import EdgeConfig, EdgeService
from streampipe.sources.simulate import FEATURES, TARGET, UNITS, SensorFleet
from streampipe.topics import Topics
from streampipe.transport import BrokerURL, Connection, Message

__all__ = ["run_demo"]

#: A terminal's width: no line the demo prints is longer.
COLUMNS = 80
#: The labels of the lines that say what the demo runs ("model:   ...").
LABEL_WIDTH = 10
STAGE_ID = "demo-edge"
#: The id of the ingest gateway of ``--format``: its status and dead letters.
INGEST_ID = "demo-ingest"
#: Seconds between the edge's metrics messages, and so the demo's metrics lines.
METRICS_EVERY = 3.0

#: The edge's clean stop waits at most ~10 s for an unreachable broker, then gives up;
#: so does the gateway's.
EDGE_STOP_TIMEOUT = 15.0
#: What a prediction line holds besides the device id, which gets the rest of a line.
_PREDICTION_WIDTH = 53


class _Watcher:
    """Subscribes to predictions and metrics and prints them as short lines: one
    prediction a second, and the edge's metrics as they come."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.lock = threading.Lock()  # the watcher's network thread and run_demo print
        self.predictions = 0
        self._last_print = 0.0

    def on_message(self, msg: Message) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if not isinstance(body, dict):  # a retained last value (edge --last-value): 512.3
            return
        with self.lock:
            if "/predictions/" in msg.topic:
                predictions = body.get("predictions") or []
                self.predictions += len(predictions)
                now = time.monotonic()
                if predictions and now - self._last_print >= 1.0:
                    self._last_print = now
                    self.print(prediction_line(body["device"], predictions[-1]))
            elif "/metrics/" in msg.topic and body.get("readings"):
                self.print(metrics_line(body))

    def print(self, line: str) -> None:
        print(line, file=self.out, flush=True)


def prediction_line(device: str, p: dict[str, Any]) -> str:
    """One prediction of the target and its true value; a long device id loses its start.

    >>> prediction_line("sensor-003", {"seq": 1234, "y_pred": 512.34, "y_true": 509.8})
    'sensor-003  seq   1234  predicted    512.3 W  actual    509.8 W'
    >>> prediction_line("streampipe.sensors.sensor-003", {"seq": 1})[:24]
    '…sensors.sensor-003  seq'
    """
    unit = UNITS[TARGET]
    device = _fit(device, COLUMNS - _PREDICTION_WIDTH)
    return (
        f"{device:<10}  seq {p.get('seq', '-'):>6}  "
        f"predicted {_value(p.get('y_pred'))} {unit}  actual {_value(p.get('y_true'))} {unit}"
    )


def _fit(device: str, width: int) -> str:
    """``device`` in ``width`` characters: leading dotted parts (Sparkplug's group,
    then node) go first, as the end names the device.

    >>> _fit("streampipe.sensors.sensor-003", 27), _fit("z" * 30, 27)[:3]
    ('…sensors.sensor-003', '…zz')
    """
    if len(device) <= width:
        return device
    while "." in device and len(device) + 1 > width:
        device = device.split(".", 1)[1]
    return "…" + device[-(width - 1) :]


def metrics_line(m: dict[str, Any]) -> str:
    """What the edge has learned so far, from its metrics message.

    >>> metrics_line({"stage": "demo-edge", "readings": 12345, "devices": 5, "rejected": 0,
    ...     "metrics": {"progressive": {"mae": 3.214}, "rolling": {"mae": 2.87},
    ...                 "window": 200}})
    'edge demo-edge: 12,345 readings, 5 devices, MAE 3.21 W (last 200: 2.87 W)'
    """
    met = m.get("metrics") or {}
    progressive, rolling = met.get("progressive") or {}, met.get("rolling") or {}
    parts = [f"{m.get('readings', 0):,} readings", f"{m.get('devices', 0):,} devices"]
    if m.get("rejected"):
        parts.append(f"{m['rejected']:,} rejected")
    name = next((n for n in ("mae", "accuracy") if n in progressive), None)
    if name is not None:
        unit = f" {UNITS[TARGET]}" if name == "mae" else ""
        parts.append(
            f"{name.upper()} {_short(progressive[name])}{unit} "
            f"(last {met.get('window')}: {_short(rolling.get(name))}{unit})"
        )
    return f"edge {m.get('stage')}: " + ", ".join(parts)


def _value(v: Any) -> str:
    return f"{v:8.1f}" if isinstance(v, int | float) else f"{'-':>8}"


def _short(v: Any) -> str:
    """Three significant digits or so, without an exponent.

    >>> _short(3.214), _short(51.26), _short(1301.95), _short(None)
    ('3.21', '51.3', '1,302', '-')
    """
    if not isinstance(v, int | float):
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _say(label: str, text: str) -> list[str]:
    """``label`` and ``text`` in lines of at most :data:`COLUMNS`, wrapped under the text.

    >>> for line in _say("from:", ", ".join(f"feature-{i} (unit)" for i in range(6))):
    ...     print(line)
    from:     feature-0 (unit), feature-1 (unit), feature-2 (unit), feature-3
              (unit), feature-4 (unit), feature-5 (unit)
    """
    return textwrap.wrap(
        text,
        COLUMNS,
        initial_indent=f"{label:<{LABEL_WIDTH}}",
        subsequent_indent=" " * LABEL_WIDTH,
        break_on_hyphens=False,
    )


def _command(label: str, words: list[str]) -> list[str]:
    """A shell command to copy, continued on the next line (``\\``) where it is long."""
    lines, line = [], f"{label:<{LABEL_WIDTH}}{words[0]}"
    for word in words[1:]:
        if len(line) + len(f" {word} \\") > COLUMNS:
            lines.append(line + " \\")
            line = " " * (LABEL_WIDTH + 2) + word
        else:
            line += " " + word
    return [*lines, line]


def _header(
    args: argparse.Namespace, broker: BrokerURL, private: bool, topics: Topics, metrics_port: int
) -> list[str]:
    """What the demo runs and learns, and how to watch it, in short lines."""
    rate = "as fast as they can" if math.isinf(args.rate) else f"{args.rate:g} readings/s each"
    ids = SensorFleet(args.devices).device_ids
    fleet = ids[0] + (f" to {ids[-1]}" if len(ids) > 1 else "")
    watch = ["mosquitto_sub", "-h", broker.host, "-p", str(broker.port)]
    if broker.username:
        watch += ["-u", broker.username, "-P", "PASSWORD"]
    if broker.tls:
        watch += ["--capath", "/etc/ssl/certs"]
    lines = [
        *_say("broker:", f"{'a private Mosquitto at ' if private else ''}{broker}"),
        *_say("sensors:", f"{args.devices} simulated machines ({fleet}), {rate}"),
        *_ingest_lines(args.format),
        *_say("learns:", f"{TARGET} ({UNITS[TARGET]}), the electrical power a machine draws"),
        *_say("from:", ", ".join(f"{f} ({UNITS[f]})" for f in FEATURES)),
        *_say("model:", args.model),
        *_say("", "one per sensor: it predicts each reading, then learns from it"),
        *_command("watch:", [*watch, "-t", f"'{topics.predictions()}'", "-v"]),
    ]
    if metrics_port:
        lines += _say("metrics:", f"http://127.0.0.1:{metrics_port}/metrics (Prometheus)")
    return [*lines, "Ctrl-C to stop.", ""]


def _ingest_lines(fmt: str) -> list[str]:
    """How the sensors publish with ``--format``, and who maps it (nothing if native)."""
    if fmt == "native":
        return []
    from streampipe.sources.formats import DEVICES

    return _say(
        "ingest:",
        f"sensors publish as {DEVICES[fmt]}; streampipe ingest maps them to readings "
        f"(examples/ingest/{fmt}.toml)",
    )


def _start_ingest(
    args: argparse.Namespace, broker: BrokerURL, stack: contextlib.ExitStack, edge: EdgeService
) -> None:
    """An ingest gateway with the shipped mapping of ``args.format``, on a thread,
    subscribed before the sensors publish (a Sparkplug birth must not be missed)."""
    from streampipe.ingest.gateway import Gateway, GatewayConfig
    from streampipe.ingest.mapping import shipped_mapping

    gateway = Gateway(
        GatewayConfig(
            broker=broker,
            gateway_id=INGEST_ID,
            sources=shipped_mapping(args.format),
            topic_root=args.topic_root,
            batch=10,
            linger=0.2,
            session_expiry=0,  # nothing of the demo's stays on a broker it was given
        )
    ).start()
    thread = threading.Thread(target=gateway.run, name="ingest", daemon=True)
    thread.start()
    stack.callback(thread.join, EDGE_STOP_TIMEOUT)
    # Both stop at once: each takes up to half a second to notice, and one after the
    # other would keep Ctrl-C waiting for both (the last readings need not be learned).
    stack.callback(edge.stop)
    stack.callback(gateway.stop)


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
        # The edge's and the gateway's INFO lines (online, subscribed, stopped) say what
        # the demo's lines say.
        for name in ("streampipe.edge", "streampipe.ingest"):
            quiet = logging.getLogger(name)
            quiet.addFilter(_not_info)
            stack.callback(quiet.removeFilter, _not_info)
        broker_url = args.broker
        if broker_url is None:
            broker_url = stack.enter_context(PrivateMosquitto()).url
        topics = Topics(args.topic_root)
        watcher = _Watcher(out)
        watch = Connection(
            broker_url, f"streampipe-demo-watch-{id(watcher):x}", on_message=watcher.on_message
        ).connect()
        stack.callback(watch.close)
        watch.subscribe([topics.predictions(), topics.metrics()], qos=0)
        edge = EdgeService(
            EdgeConfig(
                broker=broker_url,
                stage_id=STAGE_ID,
                model=args.model,
                topic_root=args.topic_root,
                metrics_port=None if args.metrics_port < 0 else args.metrics_port,
                metrics_interval=METRICS_EVERY,
                window=200,
            )
        ).start()
        edge_thread = threading.Thread(target=edge.run, name="edge", daemon=True)
        edge_thread.start()
        stack.callback(edge_thread.join, EDGE_STOP_TIMEOUT)
        stack.callback(edge.stop)
        if args.format != "native":
            _start_ingest(args, broker_url, stack, edge)
        with watcher.lock:  # before the first prediction line
            for line in _header(
                args, broker_url, args.broker is None, topics, edge.metrics_port or 0
            ):
                watcher.print(line)
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
            format=args.format,
        )
    n = watcher.predictions
    print(f"demo stopped: {n:,} prediction{'' if n == 1 else 's'}", file=out, flush=True)
    return 0


def _not_info(record: logging.LogRecord) -> bool:
    return record.levelno != logging.INFO
