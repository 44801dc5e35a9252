"""Per-sender bounds of an edge stage, with the reason for each (issue 18).

Each is an :class:`~streampipe.stage.EdgeStage` and
:class:`~streampipe.edge.EdgeConfig` parameter; the README's *Limits* table gives
the flag and the reason a refusal is counted under. Exceeding one costs only the
sender that exceeded it. Kept apart (no River, no numpy) so the CLI can show them.
"""

from __future__ import annotations

__all__ = [
    "MAX_CLOCK_AHEAD",
    "MAX_DEVICES",
    "MAX_FEATURES",
    "MAX_HELD_BYTES",
    "MAX_HELD_BYTES_PER_DEVICE",
    "MAX_HELD_PER_DEVICE",
    "MAX_SEQ_JUMP",
]

#: Devices with a model on one stage. Beyond it a new device is refused
#: (``too_many_devices``) rather than an idle one evicted: eviction would make the
#: devices already learned pay for whoever invents ids. ~6 KB each for the default model.
MAX_DEVICES = 10_000
#: Feature names one device's model may learn. Beyond it a reading that brings a new
#: name is refused (``too_many_features``): models grow with every name (and each
#: checkpoint of a device pickles its whole model), so this keeps both small.
MAX_FEATURES = 1024
#: How far past its device's watermark a reading's seq may go (in one boot epoch). A
#: reading beyond it is refused (``seq_jump``) unless the device's next batch follows
#: on from it, as a real jump would: one stray seq (2**63-1, say) cannot make the
#: device's next readings ``duplicate`` nor add 9e18 to the gaps counter.
MAX_SEQ_JUMP = 1_000_000
#: Seconds a reading's timestamp, or its boot epoch read as milliseconds since 1970 (as
#: ``streampipe sensors`` makes it; boot counters stay far below), may be ahead of the
#: edge's clock (``future_timestamp``, ``future_epoch``): room for clocks set by hand,
#: yet a forged epoch locks a device with ms boot times out (``stale_epoch``) for at
#: most this long, until its real reboots' epochs pass it.
MAX_CLOCK_AHEAD = 3600.0
#: Held frames of one device: a sensor publishes its schema before its frames, so a few
#: at most wait for it; a device naming a schema nobody published holds no more, and
#: so no more of the receive window (held frames are not acknowledged).
MAX_HELD_PER_DEVICE = 16
#: Bytes of held frames, in all and per device: frames are kept whole (up to 4 MiB
#: each), and a frame that names a schema is small (fewer than 32 readings).
MAX_HELD_BYTES = 32 << 20
MAX_HELD_BYTES_PER_DEVICE = 1 << 20
