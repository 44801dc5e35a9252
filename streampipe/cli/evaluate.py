"""``streampipe evaluate``: River's progressive validation of model specs over a CSV file."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from streampipe.cli.columns import add_columns
from streampipe.cli.progress import Progress
from streampipe.learn import DEFAULT_MODEL_SPEC

__all__ = ["register", "run"]

log = logging.getLogger("streampipe")

DESCRIPTION = """\
Score model specs on a CSV file's rows before deploying one: each row is predicted, then
learned, as River's progressive_val_score does and as an edge does, and River's metrics
of those predictions are printed as a table, a row per spec: MAE, RMSE and R2 for a
regressor; Accuracy, F1 and ROCAUC for a binary classifier (Accuracy and MacroF1 for a
multiclass one); ROCAUC of the scores for an anomaly detector (the target is its label).
Each row also says how many rows were scored, how many an edge would refuse, and the
time to validate, predict and learn a row (noisy on a busy machine). Give --model
several times to compare specs over the same rows. The columns are read
as `streampipe replay` reads them, with the same options, and rows are cleaned and
refused as an edge would. Like an edge, evaluate learns one model per device if the file
has a device column (the metrics cover every device's predictions); --one-model learns
every row with one model, in file order, as `streampipe train` does.
"""


def register(sub: Any) -> argparse.ArgumentParser:
    """Add ``streampipe evaluate`` to the subcommands ``sub``."""
    evaluate = sub.add_parser(
        "evaluate",
        help="score model specs on a CSV file (progressive validation)",
        description=DESCRIPTION,
    )
    evaluate.add_argument("file", help="CSV file with a header row")
    evaluate.add_argument(
        "--model",
        action="append",
        metavar="SPEC",
        help="River model in River's syntax, as the edge's --model; repeat it to compare "
        f"specs (default: {DEFAULT_MODEL_SPEC})",
    )
    add_columns(evaluate)
    devices = evaluate.add_mutually_exclusive_group()
    devices.add_argument(
        "--one-model",
        action="store_true",
        help="one model learns every row, in file order (default: one model per device, "
        "as an edge)",
    )
    devices.add_argument(
        "--device",
        metavar="D",
        help="score only device D's rows (default: every device's)",
    )
    evaluate.set_defaults(run=run)
    return evaluate


@dataclass
class _Scored:
    """One spec's learner, River's metrics of its predictions and its refusals."""

    spec: Any
    learner: Any
    metrics: list[Any]
    refusals: Any
    proba: bool = False  # a metric of the probability of True (ROCAUC of a classifier)
    scored: int = 0
    seconds: float = 0.0
    columns: list[str] = field(default_factory=list)


def _metrics_for(kind: str, labels: str | None) -> tuple[list[Any], bool]:
    from river import metrics

    if kind == "regressor":
        return [metrics.MAE(), metrics.RMSE(), metrics.R2()], False
    if kind == "anomaly":
        return [metrics.ROCAUC()], False
    if labels == "binary":
        return [metrics.Accuracy(), metrics.F1(), metrics.ROCAUC()], True
    return [metrics.Accuracy(), metrics.MacroF1()], False


def run(args: argparse.Namespace) -> int:
    from streampipe.cli.history import Refusals, open_history
    from streampipe.learn.learner import OnlineLearner
    from streampipe.learn.spec import ModelSpec

    texts = args.model or [DEFAULT_MODEL_SPEC]
    scored = []
    for text in texts:
        spec = ModelSpec.parse(text)
        learner = OnlineLearner(spec)  # exact: predict, score, learn, reading by reading
        metrics, proba = _metrics_for(learner.kind, learner.labels)
        scored.append(_Scored(spec, learner, metrics, Refusals(), proba))
    history = open_history(args, one_model=args.one_model)
    for line in history.report:
        print(line, file=sys.stderr)
    rows = 0
    progress = Progress(history.rows, text=_progress_text(history.rows), log_every=10)
    try:
        for batch in history.batches():
            rows += len(batch)
            for s in scored:
                start = time.perf_counter()
                accepted = s.refusals.validate(batch, s.learner.labels)
                result = s.learner.process(accepted)
                s.seconds += time.perf_counter() - start
                _score(s, result)
            progress.update(rows)
    finally:
        progress.close()
    if history.unreadable():
        log.warning("%s", history.unreadable())
    for s in scored:
        if s.refusals.total:
            log.warning(
                "%s: %s rows refused, as an edge would: %s",
                s.spec.text,
                f"{s.refusals.total:,}",
                s.refusals.describe(),
            )
    if not rows:
        raise ValueError(f"device {args.device} has no rows in {args.file}")
    devices = len({d for s in scored for d in s.learner.devices})
    models = "1 model" if devices == 1 else f"{devices:,} models (one per device)"
    print(f"{args.file}: {rows:,} rows, each predicted then learned by {models} of each spec")
    print("\n".join(_table(scored, rows)))
    return 0


def _score(s: _Scored, result: Any) -> None:
    """River's metrics of the predictions in ``result`` that have a target."""
    p_true = result.p_true if s.proba else None
    for i, (y, p) in enumerate(zip(result.y_true, result.y_pred)):
        if y is None or p is None:  # River's progressive_val_score skips these too
            continue
        s.scored += 1
        for m in s.metrics:
            if p_true is not None and m.requires_labels is False:
                m.update(y, p_true[i])
            else:
                m.update(y, p)


def _table(scored: list[_Scored], rows: int) -> list[str]:
    """A row per spec: its metrics (River's formats), then the rows it scored, the rows an
    edge would refuse, microseconds per row, and the spec."""
    names: list[str] = []
    for s in scored:
        names += [type(m).__name__ for m in s.metrics if type(m).__name__ not in names]
    header = [*names, "scored", "refused", "µs/row", "model"]
    body = []
    for s in scored:
        values = {type(m).__name__: _shown(m) for m in s.metrics}
        body.append(
            [
                *(values.get(n, "-") for n in names),
                f"{s.scored:,}",
                f"{s.refusals.total:,}",
                f"{s.seconds / max(rows, 1) * 1e6:,.1f}",
                s.spec.text,
            ]
        )
    widths = [max(len(r[j]) for r in (header, *body)) for j in range(len(header) - 1)]
    return [
        "  ".join(cell.rjust(w) for cell, w in zip(r, widths)) + "  " + r[-1]
        for r in (header, *body)
    ]


def _shown(metric: Any) -> str:
    """A metric's value as River prints it, unless it is too large to read so (a model
    that diverged): then in six significant digits."""
    value = metric.get()
    if abs(value) >= 1e9:
        return f"{value:.6g}"
    return f"{value:{metric._fmt}}"


def _progress_text(total: int) -> Any:
    def text(done: int, rate: float) -> str:
        return f"evaluating: {done:,}/{total:,} rows  {rate:,.0f}/s"

    return text
