"""``streampipe export-model``: a device's model out of an edge checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register", "run"]


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``streampipe export-model`` to the subcommands ``sub``."""
    export = sub.add_parser(
        "export-model",
        help="write a device's learned model out of an edge checkpoint, for `deploy`",
        description="Write the model that stage ID learned for device D, as of its last "
        "checkpoint, to OUT as a pickle that `streampipe deploy` takes. The stage must "
        "not be running (it holds its checkpoint).",
    )
    export.add_argument("out", metavar="OUT", help="file to write the pickled model to")
    export.add_argument("--stage-id", required=True, help="the edge stage's --stage-id")
    export.add_argument("--state-dir", required=True, help="the edge stage's --state-dir")
    export.add_argument("--device", required=True, metavar="D", help="device id")
    export.set_defaults(run=run)
    return export


def run(args: argparse.Namespace) -> int:
    from streampipe.models.export import export_model

    done = export_model(args.state_dir, args.stage_id, args.device, args.out)
    print(
        f"exported device {done.device}'s model from stage {args.stage_id} to {done.path} "
        f"({done.size:,} bytes): {done.spec or 'model'} version {done.version}, "
        f"{done.learned:,} readings learned, up to seq {done.seq} of epoch {done.epoch}"
    )
    return 0
