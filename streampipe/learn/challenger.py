"""Champion and challenger: when a second model has earned the right to serve.

A stage started with ``--challenger SPEC`` learns a second model per device on the
same readings, in the same predict-then-learn order, and publishes only the
champion's predictions. :class:`Duel` keeps the errors both models made on the last
``after`` readings that both predicted and that carried a target — absolute errors
for regressors (their mean is the MAE), 0/1 errors for classifiers (the error rate) —
and :meth:`Duel.verdict` says when the challenger's mean error is lower than the
champion's by at least ``better_by`` percent. The stage then promotes it for every
device (see :meth:`streampipe.stage.EdgeStage.promote`).

>>> duel = Duel(PromotionRule(better_by=10, after=4))
>>> duel.update([1.0, 2.0, 3.0], [1.5, 2.5, 3.5], [1.0, 2.0, 3.25], classifier=False)
>>> duel.verdict() is None  # three readings scored: not enough yet
True
>>> duel.update([4.0], [4.5], [4.25], classifier=False)
>>> duel.verdict()  # MAE 0.5 against 0.125: better by 75 %
(0.5, 0.125)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["PROMOTE_AFTER", "Duel", "PromotionRule"]

#: Readings a challenger must have scored before it may serve: the rule's window, and
#: what a promotion by command needs unless it is forced (``--promote-after``).
PROMOTE_AFTER = 1000


@dataclass(frozen=True, slots=True)
class PromotionRule:
    """Promote the challenger once its mean error over the last ``after`` scored
    readings is at least ``better_by`` percent below the champion's."""

    better_by: float
    after: int = PROMOTE_AFTER

    def __post_init__(self) -> None:
        if not 0 <= self.better_by < 100:
            raise ValueError("--promote-if-better takes a percentage from 0 up to 100")
        if self.after < 1:
            raise ValueError("--promote-after must be at least 1")


class Duel:
    """The two models' errors on the same readings, over the rule's window."""

    def __init__(self, rule: PromotionRule) -> None:
        self.rule = rule
        self.count = 0  # readings scored for both, ever
        self._champion = np.zeros(rule.after)
        self._challenger = np.zeros(rule.after)
        self._next = 0

    def update(
        self,
        y_true: Sequence[Any],
        champion: Sequence[Any],
        challenger: Sequence[Any],
        *,
        classifier: bool,
    ) -> None:
        """Record both models' errors on one batch (readings without a target, or
        without a prediction from either model, are left out)."""
        pairs = [
            (float(a != y), float(b != y)) if classifier else (abs(y - a), abs(y - b))
            for y, a, b in zip(y_true, champion, challenger)
            if y is not None and a is not None and b is not None
        ]
        for a, b in pairs[-self.rule.after :]:
            self._champion[self._next] = a
            self._challenger[self._next] = b
            self._next = (self._next + 1) % self.rule.after
        self.count += len(pairs)

    def errors(self) -> tuple[float, float] | None:
        """Mean errors of champion and challenger over the window, once it is full."""
        if self.count < self.rule.after:
            return None
        return float(self._champion.mean()), float(self._challenger.mean())

    def verdict(self) -> tuple[float, float] | None:
        """``(champion_error, challenger_error)`` if the challenger has won, else None."""
        errors = self.errors()
        if errors is None:
            return None
        champion, challenger = errors
        if challenger < champion * (1 - self.rule.better_by / 100):
            return errors
        return None
