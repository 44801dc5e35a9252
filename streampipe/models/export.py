"""``streampipe export-model``: one device's learned model, out of an edge checkpoint.

The model is written as a plain pickle, the format ``streampipe deploy`` takes, so a
model learned at one edge can be deployed to others. It is the model as of the stage's
last checkpoint (every ``--checkpoint-interval`` seconds, and on a clean stop).

A running stage may hold its checkpoint store locked; the store then refuses to open,
and export says so instead of reading a checkpoint that is being written.

>>> import pickle, tempfile
>>> from river import linear_model
>>> from streampipe.learn.learner import DeviceState
>>> from streampipe.state import CheckpointStore
>>> state_dir, out = tempfile.mkdtemp(), tempfile.mktemp()
>>> store = CheckpointStore(state_dir, "edge-1")
>>> store.save({"spec": "linear_model.LinearRegression"},
...            {"d1": DeviceState(linear_model.LinearRegression(), 0, 41, 42)})
>>> store.close()
>>> done = export_model(state_dir, "edge-1", "d1", out)
>>> done.learned, done.seq, type(pickle.load(open(out, "rb"))).__name__
(42, 41, 'LinearRegression')
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

from streampipe.state import CheckpointError, CheckpointStore
from streampipe.topics import check_name

__all__ = ["ExportError", "Exported", "export_model"]


class ExportError(ValueError):
    """The model cannot be exported; ``str()`` says why."""


@dataclass(frozen=True, slots=True)
class Exported:
    """What :func:`export_model` wrote."""

    path: Path
    device: str
    spec: str
    version: int
    learned: int  # readings the model learned at this stage
    epoch: int
    seq: int  # the device's watermark: the last reading the model learned
    size: int


def export_model(
    state_dir: str | os.PathLike[str],
    stage_id: str,
    device: str,
    out: str | os.PathLike[str],
) -> Exported:
    """Write ``device``'s model from stage ``stage_id``'s checkpoint in ``state_dir`` to ``out``."""
    check_name(stage_id, "stage id")
    directory = Path(state_dir)
    if not directory.is_dir():
        raise ExportError(f"state directory {directory} does not exist")
    # Both checkpoint formats are named <stage_id>.checkpoint*; opening a store that has
    # none would create an empty one (and a key) for a mistyped stage id.
    if not any(directory.glob(f"{stage_id}.checkpoint*")):
        raise ExportError(f"{directory} holds no checkpoint of stage {stage_id!r}")
    try:
        store = CheckpointStore(directory, stage_id)
    except CheckpointError as exc:
        raise ExportError(
            f"cannot open the checkpoint of stage {stage_id!r}: {exc} (a running stage "
            "holds its checkpoint: stop it, then export)"
        ) from None
    try:
        loaded = store.load()
    finally:
        store.close()
    if loaded is None:
        raise ExportError(f"{directory} holds no checkpoint of stage {stage_id!r}")
    meta, devices = loaded
    st = devices.get(device)
    if st is None:
        known = sorted(devices)
        listed = ", ".join(known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
        raise ExportError(
            f"stage {stage_id!r} has no model for device {device!r}"
            + (f"; it has: {listed}" if known else "; it has none yet")
        )
    data = pickle.dumps(st.model, protocol=pickle.HIGHEST_PROTOCOL)
    path = Path(out)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # never a half-written model file under the name deploy reads
    return Exported(
        path=path,
        device=device,
        spec=str(meta.get("spec", "")),
        version=getattr(st, "version", 1),
        learned=st.learned,
        epoch=st.epoch,
        seq=st.seq,
        size=len(data),
    )
