"""The update message: what one edge stage learned, for the fleet's aggregator.

An edge with ``--fleet NAME`` publishes its update retained, QoS 1, on
``ROOT/fleet/<name>/updates/<stage_id>`` (:meth:`~streampipe.topics.Topics.fleet_updates`),
with the MQTT v5 content type :data:`CONTENT_TYPE`. Retained, so an aggregator that
starts (or restarts) later gets the latest update of every edge at once, and a newer
update replaces the older one on the broker as it does in the aggregator.

The payload is one msgpack map::

    {"v": 1, "fleet": name, "stage": stage_id, "spec": canonical spec text,
     "seq": n, "base": fleet model version the update was made from (0: none),
     "readings": readings the parameters reflect, "devices": devices they come from,
     "params": Params (see streampipe.fleet.params), "ts": Unix time of the update}

Parameters and counts only: a reading never travels in an update.

:func:`decode_update` treats its input as hostile: any bytes give an :class:`Update` or
an :class:`UpdateError` whose ``reason`` is one of :data:`REASONS`.

>>> from streampipe.fleet.params import extract
>>> from river import linear_model
>>> data = encode_update(fleet="power", stage="edge-1", spec="linear_model.LinearRegression",
...                      seq=1, base=0, readings=0, devices=0,
...                      params=extract(linear_model.LinearRegression()), ts=0.0)
>>> u = decode_update(data, fleet="power")
>>> u.stage, u.seq, u.params["weights"]
('edge-1', 1, {})
>>> decode_update(data, fleet="heat")
Traceback (most recent call last):
...
streampipe.fleet.update.UpdateError: wrong_fleet: an update for fleet 'power', not 'heat'
"""

from __future__ import annotations

import ast
import math
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from streampipe.fleet.params import DEFAULT_LIMIT, Params, refusal
from streampipe.topics import InvalidName, check_name

__all__ = [
    "CONTENT_TYPE",
    "FORMAT_VERSION",
    "MAX_UPDATE_BYTES",
    "REASONS",
    "Update",
    "UpdateError",
    "canonical_spec",
    "decode_update",
    "encode_update",
]

#: MQTT v5 content type of updates on ``ROOT/fleet/<name>/updates/<stage_id>``.
CONTENT_TYPE = "application/vnd.streampipe.fleet-update"
FORMAT_VERSION = 1
#: An update of the default model is ~50 bytes per feature; 1 MiB is ~20,000 features,
#: far more than the 1,024 a device may learn, and small beside the broker's packet limit.
MAX_UPDATE_BYTES = 1 << 20
#: Counts and versions stay below 2**53, so every JSON and msgpack reader reads them exactly.
MAX_COUNT = 1 << 53
#: A spec is at most 2,000 characters (streampipe.learn.spec.MAX_SPEC_CHARS), in UTF-8.
_MAX_STR_BYTES = 8000
_MAX_MAP_LEN = 1 << 16

#: Every :attr:`UpdateError.reason`: a bounded set, safe as a Prometheus label.
REASONS: frozenset[str] = frozenset(
    {
        "malformed",  # not msgpack, not the update's shape, or a field out of range
        "too_large",  # over max_bytes
        "wrong_fleet",  # an update for another fleet on this fleet's topic
        "wrong_spec",  # parameters of another model spec than the fleet's
        "wrong_stage",  # published on another stage's topic than the one it names
        "non_finite",  # NaN or infinity in the parameters
        "absurd",  # weights beyond the limit, negative counts or variances
    }
)
_FIELDS = ("v", "fleet", "stage", "spec", "seq", "base", "readings", "devices", "params", "ts")


class UpdateError(ValueError):
    """An update refused: ``reason`` is one of :data:`REASONS`, ``detail`` says why.

    >>> str(UpdateError("too_large", "2,000,000 bytes"))
    'too_large: 2,000,000 bytes'
    """

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise AssertionError(f"unknown update error reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[UpdateError], tuple[str, str]]:
        return UpdateError, (self.reason, self.detail)


def canonical_spec(text: str) -> str:
    """The one spelling of a model spec that updates carry: validated, then re-printed
    from its syntax tree, so spacing and quotes do not make two specs differ.

    >>> canonical_spec("preprocessing.StandardScaler|linear_model.LinearRegression( l2=0.1 )")
    'preprocessing.StandardScaler | linear_model.LinearRegression(l2=0.1)'
    """
    from streampipe.learn.spec import ModelSpec  # imports River

    spec = ModelSpec.parse(text)  # raises ModelSpecError, naming what is wrong
    return ast.unparse(ast.parse(spec.text.strip(), mode="eval"))


def _malformed(detail: str) -> UpdateError:
    return UpdateError("malformed", detail)


def _count(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise _malformed(f"{what} must be a whole number in 0..2**53, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Update:
    """One edge stage's model update; creating one checks every field.

    ``params`` are checked by :func:`~streampipe.fleet.params.refusal` with ``limit``
    as |weight| bound (:data:`~streampipe.fleet.params.DEFAULT_LIMIT` unless decoded
    with another).
    """

    fleet: str
    stage: str
    spec: str
    seq: int
    base: int
    readings: int
    devices: int
    params: Params
    ts: float
    v: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.v != FORMAT_VERSION or type(self.v) is not int:
            raise _malformed(f"update format {self.v!r}; this build reads {FORMAT_VERSION}")
        try:
            check_name(self.fleet, "fleet name")
            check_name(self.stage, "stage id")
        except InvalidName as exc:
            raise _malformed(str(exc)) from None
        if not isinstance(self.spec, str) or not 0 < len(self.spec) <= 2000:
            raise _malformed("spec must be a string of 1 to 2,000 characters")
        for what in ("seq", "base", "readings", "devices"):
            _count(getattr(self, what), what)
        ts = self.ts
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            raise _malformed("ts must be a finite number (Unix time)")

    def check_params(self, limit: float = DEFAULT_LIMIT) -> None:
        """Raise :class:`UpdateError` if the parameters are malformed, non-finite or absurd."""
        why = refusal(self.params, limit)
        if why is not None:
            raise UpdateError(*why)

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _FIELDS}

    def encode(self) -> bytes:
        return msgpack.packb(self.to_dict(), use_bin_type=True)


def encode_update(
    *,
    fleet: str,
    stage: str,
    spec: str,
    seq: int,
    base: int,
    readings: int,
    devices: int,
    params: Params,
    ts: float | None = None,
) -> bytes:
    """The payload of an update (``spec`` as :func:`canonical_spec` gives it).

    Raises :class:`UpdateError` for fields an aggregator would refuse, params included.
    """
    update = Update(
        fleet=fleet,
        stage=stage,
        spec=spec,
        seq=seq,
        base=base,
        readings=readings,
        devices=devices,
        params=params,
        ts=time.time() if ts is None else ts,
    )
    update.check_params()
    data = update.encode()
    if len(data) > MAX_UPDATE_BYTES:
        raise UpdateError("too_large", f"{len(data):,} bytes, over {MAX_UPDATE_BYTES:,}")
    return data


def decode_update(
    data: bytes,
    max_bytes: int = MAX_UPDATE_BYTES,
    *,
    fleet: str | None = None,
    spec: str | None = None,
    stage: str | None = None,
    limit: float = DEFAULT_LIMIT,
) -> Update:
    """Decode and check an untrusted update; raise :class:`UpdateError`.

    ``fleet``, ``spec`` (canonical) and ``stage`` (the topic's level), when given, must be
    what the update says (``wrong_fleet``, ``wrong_spec``, ``wrong_stage``).
    """
    if len(data) > max_bytes:
        raise UpdateError("too_large", f"{len(data):,} bytes, over {max_bytes:,}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=_MAX_STR_BYTES,
            max_bin_len=0,
            max_array_len=0,
            max_map_len=_MAX_MAP_LEN,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # ExtraData, FormatError, StackError, bad UTF-8 and over-limit lengths land here.
        raise _malformed(f"not msgpack an update can be: {exc}") from None
    if not isinstance(obj, dict):
        raise _malformed("an update is a msgpack map")
    missing = [f for f in _FIELDS if f not in obj]
    if missing:
        raise _malformed(f"the update lacks {', '.join(missing)}")
    fields = {f: obj[f] for f in _FIELDS}  # unknown keys: from a newer writer, ignored
    if type(fields["ts"]) is int:
        fields["ts"] = float(fields["ts"])
    update = Update(**fields)
    if fleet is not None and update.fleet != fleet:
        raise UpdateError("wrong_fleet", f"an update for fleet {update.fleet!r}, not {fleet!r}")
    if stage is not None and update.stage != stage:
        raise UpdateError(
            "wrong_stage", f"an update of stage {update.stage!r} on stage {stage!r}'s topic"
        )
    if spec is not None and update.spec != spec:
        raise UpdateError(
            "wrong_spec", f"an update of model {update.spec!r}; the fleet learns {spec!r}"
        )
    update.check_params(limit)
    return update
