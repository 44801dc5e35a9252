"""How a reading's target becomes what a model learns and is scored against.

Targets travel as float64 (the codec has no other type), so a stage decides from its
model what a target means:

=============================  ===============  =========================================
model                          ``label_kind``   target on the wire → what the model sees
=============================  ===============  =========================================
regressor                      ``None``         the number itself
binary classifier (e.g.        ``"binary"``     0 → ``False``, 1 → ``True`` (River's
``LogisticRegression``)                         binary classifiers and datasets use bools)
multiclass classifier (e.g.    ``"integer"``    a whole number → ``int`` (3.0 → 3)
``HoeffdingTreeClassifier``)
anomaly detector               ``"binary"``     0 → ``False`` (normal), 1 → ``True``
                                                (anomaly): an *evaluation label only*,
                                                never learned; scored with ROC AUC
=============================  ===============  =========================================

Anything else (0.5 for a classifier, 2 for a binary one) is refused as
``invalid_label`` by :func:`streampipe.validate.validate`. A classifier is binary when
River says it is not multiclass (``_multiclass`` of its last step).

>>> from river import anomaly, linear_model, tree
>>> label_kind(linear_model.LogisticRegression()), label_kind(tree.HoeffdingTreeClassifier())
('binary', 'integer')
>>> label_kind(linear_model.LinearRegression()) is None, label_kind(anomaly.HalfSpaceTrees())
(True, 'binary')
"""

from __future__ import annotations

from typing import Any, Literal

from streampipe.learn.spec import _final_step, model_kind

__all__ = ["LabelKind", "label_kind", "stricter"]

LabelKind = Literal["binary", "integer"]


def label_kind(model: Any) -> LabelKind | None:
    """What the targets of ``model`` must be: ``None`` for numbers (a regressor)."""
    kind = model_kind(model)
    if kind == "regressor":
        return None
    if kind == "anomaly":
        return "binary"
    return "integer" if getattr(_final_step(model), "_multiclass", False) else "binary"


def stricter(a: LabelKind | None, b: LabelKind | None) -> LabelKind | None:
    """The labels two models learning the same readings both accept.

    >>> stricter("integer", "binary"), stricter(None, None)
    ('binary', None)
    """
    if "binary" in (a, b):
        return "binary"
    return a or b
