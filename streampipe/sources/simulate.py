"""A deterministic fleet of simulated sensors with plausible physical signals.

Each device is a small machine in a room: it reports the room's temperature, relative
humidity and air pressure, and its own vibration and current draw; its target is the
electrical power it takes, which depends on the features (mostly linear in current and
temperature, with an I²R term and meter noise), so an online linear model learns it well.

=============  ======  ========  ==========================================================
name           unit    decimals  signal
=============  ======  ========  ==========================================================
temperature    °C      2         device baseline 18–26, daily cycle (peak mid-afternoon),
                                 slow drift, self-heating under load, noise
humidity       %RH     1         device baseline 35–60, anti-correlated with temperature,
                                 slow drift, noise; clamped to 0–100
pressure       hPa     1         ~1013 with a slow, weather-like random walk, noise
vibration      mm/s    3         rises with load, multiplicative (log-normal) noise
current        A       2         idle current plus a load that wanders over minutes and is
                                 higher during the day
power          W       1         target: V·pf·I + R·I² + k·(T − 15) + noise
=============  ======  ========  ==========================================================

Values are rounded with ``round(v, decimals)``, so each is exactly the decimal a real
sensor would print. Slow processes (drifts, pressure, load) are Ornstein–Uhlenbeck
processes in simulated time, so signals look the same whatever the reading rate;
``time_scale`` speeds simulated time up (60 makes a day pass in 24 minutes).

Faults (``faults=True``, the default) are rare and affect features only, never the
target: a *dropout* (probability 0.5 % per reading) leaves one feature out of ``x``; a
*spike* (0.2 %) multiplies one feature by a factor between 5 and 10. Faults are drawn
from their own random stream, so ``faults=False`` yields the same readings minus the
faults. One spike can throw an unguarded SGD model such as ``StandardScaler |
LinearRegression`` far off course (its error then often exceeds the target's spread), so
stages that learn from these readings need to guard against outliers.

>>> fleet = SensorFleet(3, seed=7)
>>> fleet.device_ids
('sensor-000', 'sensor-001', 'sensor-002')
>>> r = fleet.read(1, ts=1_700_000_000.0)
>>> r.device, r.seq, r.epoch, tuple(r.x) == FEATURES
('sensor-001', 0, 0, True)
>>> fleet.read(1, ts=1_700_000_001.0).seq
1
>>> again = SensorFleet(3, seed=7).read(1, ts=1_700_000_000.0)
>>> again == r
True
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from types import MappingProxyType

import numpy as np

from streampipe.readings import Reading

__all__ = [
    "DECIMALS",
    "DROPOUT_PROBABILITY",
    "FEATURES",
    "SPIKE_PROBABILITY",
    "TARGET",
    "UNITS",
    "SensorFleet",
]

FEATURES: tuple[str, ...] = ("temperature", "humidity", "pressure", "vibration", "current")
TARGET: str = "power"
UNITS = MappingProxyType(
    {
        "temperature": "°C",
        "humidity": "%RH",
        "pressure": "hPa",
        "vibration": "mm/s",
        "current": "A",
        "power": "W",
    }
)
DECIMALS = MappingProxyType(
    {"temperature": 2, "humidity": 1, "pressure": 1, "vibration": 3, "current": 2, "power": 1}
)

DROPOUT_PROBABILITY = 0.005
SPIKE_PROBABILITY = 0.002
SPIKE_FACTOR = (5.0, 10.0)

_DAY = 86400.0
_TWO_PI = 2.0 * math.pi
# Time constants (simulated seconds) and stationary spreads of the slow processes.
_TEMP_DRIFT = (6 * 3600.0, 0.7)  # °C
_RH_DRIFT = (3 * 3600.0, 3.0)  # %RH
_PRESSURE_WALK = (36 * 3600.0, 6.0)  # hPa: weather fronts take a day or two
_LOAD_WALK = (600.0, 1.2)  # logit of load: duty changes over minutes
_NORMALS_PER_READ = 10
_BLOCK_READS = 256
# A topic level must not hold wildcards, the separator or control characters.
_FORBIDDEN_IN_PREFIX = frozenset("+#/") | {chr(c) for c in range(32)} | {"\x7f"}


class _Device:
    """One simulated device: its fixed traits and the state of its slow processes."""

    __slots__ = (
        "gen",
        "i_idle",
        "i_span",
        "last_ts",
        "load_bias",
        "load_z",
        "ohms",
        "p_base",
        "p_walk",
        "pf",
        "rh_base",
        "rh_drift",
        "rh_per_c",
        "rows",
        "seq",
        "t_amp",
        "t_base",
        "t_drift",
        "t_phase",
        "vib_base",
        "volts",
        "w_per_c",
    )

    def __init__(self, gen: np.random.Generator) -> None:
        def u(low: float, high: float) -> float:
            return float(gen.uniform(low, high))

        def g(mean: float, sd: float) -> float:
            return float(gen.normal(mean, sd))

        self.gen = gen
        self.t_base = u(18.0, 26.0)
        self.t_amp = u(2.0, 6.0)
        # Peak between 13:00 and 16:00 UTC, as fractions of a day.
        self.t_phase = u(13.0, 16.0) / 24.0
        self.rh_base = u(35.0, 60.0)
        self.rh_per_c = u(1.5, 3.0)
        self.p_base = g(1013.25, 3.0)
        self.vib_base = u(0.5, 2.5)
        self.i_idle = u(0.2, 1.0)
        self.i_span = u(4.0, 12.0)
        self.volts = u(225.0, 235.0)
        self.pf = u(0.85, 0.97)
        self.w_per_c = u(5.0, 15.0)
        self.ohms = u(0.5, 1.5)
        self.load_bias = g(0.0, 0.5)
        # Start the slow processes from their stationary distributions.
        self.t_drift = g(0.0, _TEMP_DRIFT[1])
        self.rh_drift = g(0.0, _RH_DRIFT[1])
        self.p_walk = g(0.0, _PRESSURE_WALK[1])
        self.load_z = g(0.0, _LOAD_WALK[1])
        self.rows: Iterator[list[float]] = iter(())
        self.last_ts: float | None = None
        self.seq = 0

    def normals(self) -> list[float]:
        """The next read's independent N(0, 1) draws."""
        row = next(self.rows, None)
        if row is None:
            # One numpy call per block of reads: a numpy call per value would cost more
            # than the rest of a read, and random.gauss half of it.
            block = self.gen.standard_normal((_BLOCK_READS, _NORMALS_PER_READ))
            self.rows = iter(block.tolist())
            row = next(self.rows)
        return row


def _ou_coefficients(dt: float) -> tuple[float, ...]:
    """(decay, noise scale) of each slow process for an exact Ornstein–Uhlenbeck step."""
    out: list[float] = []
    for tau, sigma in (_TEMP_DRIFT, _RH_DRIFT, _PRESSURE_WALK, _LOAD_WALK):
        a = math.exp(-dt / tau)
        out += (a, sigma * math.sqrt(1.0 - a * a))
    return tuple(out)


class SensorFleet:
    """Simulated sensors ``<prefix>-000``, ``<prefix>-001``, … with reproducible readings.

    Device ``i`` draws everything from generators seeded with ``[seed, i]``, so the same
    seed and the same sequence of :meth:`read` calls give identical readings, and a
    device's readings do not depend on how reads of other devices are interleaved.
    ``read`` is not thread-safe; give each thread its own fleet.
    """

    def __init__(
        self,
        devices: int = 10,
        *,
        seed: int = 0,
        epoch: int = 0,
        prefix: str = "sensor",
        time_scale: float = 1.0,
        faults: bool = True,
    ) -> None:
        if devices < 1:
            raise ValueError(f"a fleet needs at least one device, not {devices}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, not {seed}")
        if not prefix or not _FORBIDDEN_IN_PREFIX.isdisjoint(prefix):
            raise ValueError(f"prefix {prefix!r} is not a valid MQTT topic level")
        if not (time_scale > 0 and math.isfinite(time_scale)):
            raise ValueError(f"time_scale must be positive and finite, not {time_scale}")
        self.epoch = epoch
        self.time_scale = float(time_scale)
        self.faults = faults
        width = max(3, len(str(devices - 1)))
        self.device_ids: tuple[str, ...] = tuple(f"{prefix}-{i:0{width}d}" for i in range(devices))
        self._devices: list[_Device] = []
        self._fault_rngs: list[random.Random] = []
        for i in range(devices):
            signals, faults_seq = np.random.SeedSequence([seed, i]).spawn(2)
            self._devices.append(_Device(np.random.default_rng(signals)))
            state = faults_seq.generate_state(4, dtype=np.uint32)
            self._fault_rngs.append(random.Random(int.from_bytes(state.tobytes(), "little")))
        self._dt = 0.0
        self._ou = _ou_coefficients(0.0)

    def __len__(self) -> int:
        return len(self._devices)

    def read(self, index: int, ts: float) -> Reading:
        """The next reading of device ``index``, made at wall-clock time ``ts``."""
        if not 0 <= index < len(self._devices):
            raise IndexError(f"device index {index} is outside 0..{len(self._devices) - 1}")
        if not math.isfinite(ts):
            raise ValueError(f"ts must be finite, not {ts}")
        d = self._devices[index]
        scale = self.time_scale
        dt = 0.0 if d.last_ts is None else max(0.0, (ts - d.last_ts) * scale)
        d.last_ts = ts
        if dt != self._dt:  # readings usually come at a steady rate: compute once
            self._dt, self._ou = dt, _ou_coefficients(dt)
        a_t, s_t, a_rh, s_rh, a_p, s_p, a_load, s_load = self._ou
        z_t, z_rh, z_p, z_load, n_t, n_rh, n_p, n_vib, n_i, n_w = d.normals()

        d.t_drift = t_drift = d.t_drift * a_t + s_t * z_t
        d.rh_drift = rh_drift = d.rh_drift * a_rh + s_rh * z_rh
        d.p_walk = p_walk = d.p_walk * a_p + s_p * z_p
        d.load_z = load_z = d.load_z * a_load + s_load * z_load

        day = math.sin(_TWO_PI * ((ts * scale / _DAY) % 1.0 - d.t_phase + 0.25))
        load = 1.0 / (1.0 + math.exp(-(d.load_bias + 0.8 * day + load_z)))
        temp = d.t_base + d.t_amp * day + t_drift + 1.5 * load
        rh = d.rh_base - d.rh_per_c * (temp - d.t_base) + rh_drift + 0.4 * n_rh
        amps = d.i_idle + d.i_span * load
        watts = d.volts * d.pf * amps + d.ohms * amps * amps + d.w_per_c * (temp - 15.0)

        x = {
            "temperature": round(temp + 0.05 * n_t, 2),
            "humidity": round(min(100.0, max(0.0, rh)), 1),
            "pressure": round(d.p_base + p_walk + 0.08 * n_p, 1),
            "vibration": round(d.vib_base * (0.15 + load) * math.exp(0.3 * n_vib), 3),
            "current": round(max(0.0, amps + 0.03 * n_i), 2),
        }
        y = round(watts + 4.0 * n_w, 1)

        if self.faults:
            # A separate stream, so faults=False changes only the readings faults hit.
            fr = self._fault_rngs[index]
            u = fr.random()
            if u < DROPOUT_PROBABILITY + SPIKE_PROBABILITY:
                name = FEATURES[fr.randrange(len(FEATURES))]
                if u < DROPOUT_PROBABILITY:
                    del x[name]
                else:
                    x[name] = round(x[name] * fr.uniform(*SPIKE_FACTOR), DECIMALS[name])

        seq = d.seq
        d.seq = seq + 1
        return Reading(self.device_ids[index], seq, ts, x, y, self.epoch)
