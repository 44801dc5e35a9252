"""``streampipe sensors``: a simulated fleet of sensors publishing readings."""

from __future__ import annotations

import argparse
import logging
import math
import threading
import time
from typing import Any

from streampipe.cli.options import (
    DEFAULT_BROKER,
    add_batching,
    add_broker,
    client_id,
    on_signals,
    positive_int,
    rate,
    refused_summary,
)
from streampipe.cli.progress import Progress
from streampipe.topics import Topics
from streampipe.transport import BrokerURL, MQTTError

__all__ = ["register", "run", "run_sensors"]

log = logging.getLogger("streampipe")

DESCRIPTION = (
    "Simulate a fleet of sensors and publish their readings, batched per device, on "
    "ROOT/readings/PARTITION/DEVICE (QoS 1), with field-name schemas retained on "
    "ROOT/schemas/ID. Each device (PREFIX-000, PREFIX-001, …) is a small machine in a room: "
    "it reports temperature, humidity, pressure, vibration and current, and its target is "
    "the electrical power it takes. Readings are spread evenly over time; while the broker "
    "is away they are kept in a bounded backlog, and what overflows it is dropped and "
    "counted. Reports progress on stderr, and how many readings it published when it "
    "stops (after --duration, or on Ctrl-C)."
)

#: Seconds between two progress lines in the log, when stderr is not a terminal.
LOG_EVERY = 10.0


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``streampipe sensors`` to the subcommands ``sub``."""
    sensors = sub.add_parser("sensors", help="simulate a fleet of sensors", description=DESCRIPTION)
    add_broker(sensors, DEFAULT_BROKER)
    sensors.add_argument(
        "--devices",
        type=positive_int,
        default=10,
        metavar="N",
        help="number of sensors (default: %(default)s)",
    )
    sensors.add_argument(
        "--rate",
        type=rate,
        default=1.0,
        help="readings per second per device, or 'max' (default: %(default)s)",
    )
    sensors.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="seconds to run (default: until Ctrl-C)",
    )
    sensors.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed: the same seed makes the same readings (default: %(default)s)",
    )
    sensors.add_argument(
        "--prefix", default="sensor", help="device id prefix (default: %(default)s)"
    )
    sensors.add_argument(
        "--format",
        choices=["native", "z2m", "tasmota", "shelly", "esphome", "sparkplug"],
        default="native",
        metavar="FORMAT",
        help="native, z2m, tasmota, shelly, esphome or sparkplug: publish as streampipe "
        "readings, or as Zigbee2MQTT, Tasmota, Shelly Gen2, "
        "ESPHome or Sparkplug B devices do, for `streampipe ingest` (examples/ingest/"
        "FORMAT.toml maps them back; default: %(default)s)",
    )
    sensors.add_argument(
        "--no-faults",
        dest="faults",
        action="store_false",
        help="no dropouts and spikes (by default 0.5%% of readings miss a value, 0.2%% spike)",
    )
    add_batching(sensors, batch=10, linger_ms=1000)
    sensors.set_defaults(run=run)
    return sensors


def run_sensors(
    broker: BrokerURL,
    topics: Topics,
    *,
    devices: int,
    rate: float,
    duration: float | None,
    seed: int,
    batch: int,
    linger: float,
    prefix: str = "sensor",
    faults: bool = True,
    stop: threading.Event | None = None,
    progress: bool = False,
    format: str = "native",
) -> int:
    """Publish simulated readings until ``duration`` passes or ``stop`` is set; with
    ``progress``, say how many so far on stderr (:class:`~streampipe.cli.progress.Progress`)."""
    from streampipe.publish import ReadingPublisher
    from streampipe.sources.simulate import SensorFleet
    from streampipe.transport import Connection

    stop = stop or threading.Event()
    fleet = SensorFleet(
        devices, seed=seed, epoch=int(time.time() * 1000), prefix=prefix, faults=faults
    )
    conn = Connection(broker, client_id("sensors")).connect()
    # Live readings cannot wait for a broker that is away: keep a bounded backlog and
    # count what overflows it (the edge sees those as sequence gaps).
    pub: Any = ReadingPublisher(
        conn, topics, batch_size=batch, linger=linger, overflow="drop_oldest"
    )
    if format != "native":  # as a vendor's devices publish, one message per reading
        from streampipe.sources.formats import FormatPublisher, encoder

        pub = FormatPublisher(conn, encoder(format))
    stats = pub.stats

    def published() -> int:
        return stats.readings - stats.dropped_readings

    shown = None
    if progress:
        shown = Progress(
            text=lambda n, per_s: (
                f"published {n:,} readings from {devices:,} sensors "
                f"({per_s:,.0f}/s), {stats.dropped_readings:,} dropped"
            ),
            log_every=LOG_EVERY,
        )
    # Independent sensors do not tick in step: device i reads at i/devices of each
    # period, so the fleet's readings are spread evenly over time, not sent in bursts.
    # While readings wait for their linger bound anyway, the loop sleeps until then and
    # makes the readings that fell due meanwhile, each stamped with the time it was
    # due: one wake-up per flush instead of one per reading, and no reading held
    # longer than the bound.
    step = 1.0 / (rate * devices) if math.isfinite(rate) else 0.0
    start = time.monotonic()
    wall = time.time() - start  # monotonic -> Unix time
    made = 0
    try:
        while not stop.is_set():
            now = time.monotonic()
            if duration is not None and now - start >= duration:
                break
            # Every reading due by now (at rate "max", one round of the fleet per pass).
            for _ in range(devices if step == 0 else max(0, int((now - start) / step) + 1 - made)):
                due = start + made * step
                if due > now:
                    break
                pub.add(fleet.read(made % devices, wall + due))
                made += 1
            pub.flush_due()
            if shown is not None:
                shown.update(published())
            if step == 0 and conn.connected:
                continue  # rate "max": the next round at once (publish waits for acks)
            wake = pub.next_due()
            if wake is None:
                wake = start + made * step
            stop.wait(max(0.0, wake - time.monotonic()))
        pub.wait_acked(30)
        if shown is not None:
            shown.update(published(), force=True)
    finally:
        if shown is not None:
            shown.close()
        conn.close()
    if stats.dropped_readings:
        log.warning(
            "%d readings dropped: the broker was unreachable and the backlog was full",
            stats.dropped_readings,
        )
    if conn.refused:
        raise MQTTError(
            f"the broker refused {refused_summary(conn)}: is this account allowed to "
            f"publish on {topics.root}/readings/# (and {topics.root}/schemas/+)?"
        )
    return published()


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    on_signals(stop.set)
    n = run_sensors(
        args.broker,
        Topics(args.topic_root),
        devices=args.devices,
        rate=args.rate,
        duration=args.duration,
        seed=args.seed,
        batch=args.batch,
        linger=args.linger / 1000,
        prefix=args.prefix,
        faults=args.faults,
        stop=stop,
        progress=True,
        format=args.format,
    )
    print(f"published {n:,} readings from {args.devices} simulated sensors")  # dropped: logged
    return 0
