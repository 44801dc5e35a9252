"""``streampipe train``: learn a model from a CSV file's rows, for ``deploy``."""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from streampipe.cli.columns import add_columns
from streampipe.cli.progress import Progress
from streampipe.learn import DEFAULT_MODEL_SPEC

__all__ = ["register", "run"]

log = logging.getLogger("streampipe")

DESCRIPTION = """\
Learn a River model from a CSV file's rows, in the order of the rows, and write it to OUT
as a pickle that `streampipe deploy` takes. The columns are read as `streampipe replay`
reads them, with the same options, and what each column became is printed first (to
stderr). Rows are cleaned and refused as an edge would: a feature cell that is not a
number is left out of its row, a target that is not a label of a classifier refuses its
row (0/1 for a binary one, whole numbers for a multiclass one). A row without a target
is not learned; an anomaly detector learns every row and never its target. If the file
has a device column, one model learns every device's rows in file order, unless
--device D keeps one device's.
"""


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``streampipe train`` to the subcommands ``sub``."""
    train = sub.add_parser(
        "train",
        help="learn a model from a CSV file, for `deploy`",
        description=DESCRIPTION,
    )
    train.add_argument("file", help="CSV file with a header row")
    train.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT",
        help="file to write the pickled model to, for `streampipe deploy OUT` (required)",
    )
    train.add_argument(
        "--model",
        default=DEFAULT_MODEL_SPEC,
        metavar="SPEC",
        help="River model in River's syntax, as the edge's --model (default: %(default)s)",
    )
    add_columns(train, device_use="one model over every device's rows (or --device D)")
    train.add_argument(
        "--device",
        metavar="D",
        help="learn only device D's rows (default: every row, whatever its device)",
    )
    train.set_defaults(run=run)
    return train


def run(args: argparse.Namespace) -> int:
    from streampipe.cli.history import Refusals, open_history
    from streampipe.learn.learner import OnlineLearner
    from streampipe.learn.spec import ModelSpec
    from streampipe.models.artifact import DEFAULT_LIMITS

    spec = ModelSpec.parse(args.model)
    checked = OnlineLearner(spec)  # refuses what an edge would not run
    labels, kind = checked.labels, checked.kind
    history = open_history(args, one_model=True)
    for line in history.report:
        print(line, file=sys.stderr)
    model = spec.build()
    learn = model.learn_one
    refusals = Refusals()
    rows = learned = 0
    progress = Progress(history.rows, text=_progress_text(history.rows), log_every=10)
    start = time.monotonic()
    try:
        for batch in history.batches():
            accepted = refusals.validate(batch, labels)
            rows += len(batch)
            xs = accepted.features()
            if kind == "anomaly":  # the target is a label to evaluate it by, never learned
                for x in xs:
                    learn(x)
                learned += len(xs)
            else:
                ys = accepted.targets() if labels is None else accepted.labels(labels)
                for x, y in zip(xs, ys):
                    if y is not None:
                        learn(x, y)
                        learned += 1
            progress.update(rows)
    finally:
        progress.close()
    elapsed = time.monotonic() - start
    if history.unreadable():
        log.warning("%s", history.unreadable())
    if refusals.total:
        log.warning(
            "%s rows refused, as an edge would: %s", f"{refusals.total:,}", refusals.describe()
        )
    if not rows:
        raise ValueError(f"device {args.device} has no rows in {args.file}")
    if not learned:
        raise ValueError(
            f"no row was learned: none of the {rows:,} rows has a target an edge learns"
        )
    data = pickle.dumps(model)
    if len(data) > DEFAULT_LIMITS.max_model_bytes:
        raise ValueError(
            f"the model pickles to {len(data):,} bytes; edges accept at most "
            f"{DEFAULT_LIMITS.max_model_bytes:,}: choose a smaller model"
        )
    _write(Path(args.output), data)
    unlearned = rows - learned
    of = f" of device {args.device}" if args.device else ""
    skipped = f" ({unlearned:,} not: refused or without a target)" if unlearned else ""
    deploy = shlex.join(
        [
            "streampipe",
            "deploy",
            args.output,
            "--model",
            "NAME",
            "--signing-key",
            "deploy.key",
            "--spec",
            spec.text,
        ]
    )
    print(
        f"learned {learned:,} of {rows:,} rows{of}{skipped} in {elapsed:.2f} s with {spec.name}; "
        f"wrote {args.output} ({len(data):,} bytes); next: {deploy}"
    )
    return 0


def _progress_text(total: int) -> Any:
    def text(done: int, rate: float) -> str:
        return f"learning: {done:,}/{total:,} rows  {rate:,.0f}/s"

    return text


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temporary file, then a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
