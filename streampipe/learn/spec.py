"""Model specs: River models written as text, in River's own composition syntax.

A user picks the model an edge stage learns with on the command line, e.g.
``--model "preprocessing.StandardScaler | linear_model.LinearRegression(l2=0.01)"``.
The text is parsed with :func:`ast.parse` and walked node by node; nothing is ever
evaluated, so the only code a spec can run is the constructor of an allow-listed River
class with literal arguments.

>>> spec = ModelSpec.parse("preprocessing.StandardScaler | linear_model.LinearRegression")
>>> spec.name, spec.kind
('StandardScaler|LinearRegression', 'regressor')
>>> model = spec.build()
>>> print(model)
StandardScaler | LinearRegression
>>> spec.build() is model
False

Grammar
-------
- ``a | b | c`` chains steps into a River pipeline; every step but the last must be a
  transformer, and the last one a regressor, classifier or anomaly detector.
- ``a + b`` joins transformers into a ``compose.TransformerUnion``; use parentheses,
  ``(a + b) | c``, as in Python.
- Each item is ``module.Class`` (built with its defaults) or ``module.Class(...)`` with
  positional and keyword arguments. An argument is a literal (number, string, True,
  False, None, or a tuple, list or dict of those) or another model or River object,
  e.g. ``linear_model.LinearRegression(optimizer=optim.SGD(0.01))``; a bare
  ``module.Class`` argument is built with its defaults too.
- A leading ``river.`` is allowed: ``river.preprocessing.StandardScaler``.
- Nothing else: no other names, operators, attributes, subscripts, calls on calls,
  ``*``/``**``, lambdas, comprehensions or f-strings. A spec is at most
  ``MAX_SPEC_CHARS`` long and nests at most ``MAX_NESTING`` levels deep.

The allow-list
--------------
Modules of learners and transformers: ``anomaly``, ``compose`` (``Discard``,
``Grouper``, ``Pipeline``, ``Prefixer``, ``Renamer``, ``Select``, ``Suffixer``,
``TransformerProduct``, ``TransformerUnion``; the classes that need a function or a
type are left out), ``dummy``, ``ensemble``, ``facto``, ``feature_extraction``,
``feature_selection``, ``forest``, ``imblearn``, ``linear_model``, ``model_selection``,
``multiclass``, ``naive_bayes``, ``neighbors``, ``preprocessing``, ``rules``, ``tree``.
Modules whose classes are mostly arguments of those: ``bandit``, ``drift``,
``drift.binary``, ``metrics``, ``optim``, ``optim.initializers``, ``optim.losses``,
``optim.schedulers``, ``stats``, ``tree.splitter``.

Left out on purpose: ``time_series`` (forecasters learn ``(y, x)`` and forecast a
horizon, not ``predict_one``), ``cluster``, ``reco``, ``active`` and ``conf`` (other
learning APIs than an edge stage drives), ``datasets``, ``stream`` and ``evaluate``
(they read files or the network), and ``utils``, ``misc``, ``proba``, ``covariance``,
``sketch``, ``base``, ``checks``, ``compat`` (helpers, not models). Within an allowed
module only public, concrete River classes listed in the module's ``__all__`` resolve.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Literal

from river import (
    anomaly,
    bandit,
    base,
    compose,
    drift,
    dummy,
    ensemble,
    facto,
    feature_extraction,
    feature_selection,
    forest,
    imblearn,
    linear_model,
    metrics,
    model_selection,
    multiclass,
    naive_bayes,
    neighbors,
    optim,
    preprocessing,
    rules,
    stats,
    tree,
)
from river.drift import binary as drift_binary
from river.optim import initializers as optim_initializers
from river.optim import losses as optim_losses
from river.optim import schedulers as optim_schedulers
from river.tree import splitter as tree_splitter

from streampipe.learn import DEFAULT_MODEL_SPEC

__all__ = [
    "DEFAULT_MODEL_SPEC",
    "MAX_NESTING",
    "MAX_SPEC_CHARS",
    "ModelKind",
    "ModelSpec",
    "ModelSpecError",
    "model_kind",
    "parse_model_spec",
]

# A spec is typed on a command line; anything longer is a mistake or an attack.
MAX_SPEC_CHARS = 2000
# Deepest real use is ~6 (selector > [list] > model > optimizer > scheduler > number).
MAX_NESTING = 10

ModelKind = Literal["regressor", "classifier", "anomaly"]

_MODULES: dict[str, Any] = {
    "anomaly": anomaly,
    "bandit": bandit,
    "compose": compose,
    "drift": drift,
    "drift.binary": drift_binary,
    "dummy": dummy,
    "ensemble": ensemble,
    "facto": facto,
    "feature_extraction": feature_extraction,
    "feature_selection": feature_selection,
    "forest": forest,
    "imblearn": imblearn,
    "linear_model": linear_model,
    "metrics": metrics,
    "model_selection": model_selection,
    "multiclass": multiclass,
    "naive_bayes": naive_bayes,
    "neighbors": neighbors,
    "optim": optim,
    "optim.initializers": optim_initializers,
    "optim.losses": optim_losses,
    "optim.schedulers": optim_schedulers,
    "preprocessing": preprocessing,
    "rules": rules,
    "stats": stats,
    "tree": tree,
    "tree.splitter": tree_splitter,
}
# FuncTransformer, TargetTransformRegressor and SelectType need functions or types,
# which a spec cannot express; learn_during_predict is a context manager.
_COMPOSE_CLASSES = frozenset(
    {
        "Discard",
        "Grouper",
        "Pipeline",
        "Prefixer",
        "Renamer",
        "Select",
        "Suffixer",
        "TransformerProduct",
        "TransformerUnion",
    }
)
_ALLOWED_HINT = "allowed: " + ", ".join(sorted(_MODULES))
_SYMBOLS: dict[type, str] = {ast.BitOr: "|", ast.Add: "+"}
_ANOMALY_BASES = (base.AnomalyDetector, base.SupervisedAnomalyDetector, base.AnomalyFilter)
# What a name shows; optimizers, losses, splitters, metrics and the like are left out.
_MODEL_BASES = (
    base.Regressor,
    base.Classifier,
    base.BaseTransformer,
    compose.Pipeline,
    *_ANOMALY_BASES,
)


class ModelSpecError(ValueError):
    """A model spec that cannot be turned into a River model; the message says why.

    >>> parse_model_spec("os.system")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    streampipe.learn.spec.ModelSpecError: unknown River module 'os' at column 1 of model spec: 'os.system' (allowed: anomaly, bandit, ...)
    """  # noqa: E501


def parse_model_spec(spec: str) -> base.Estimator:
    """Build a fresh, unfitted River model from ``spec``; raise :class:`ModelSpecError`.

    >>> print(parse_model_spec("preprocessing.MinMaxScaler | anomaly.HalfSpaceTrees(seed=42)"))
    MinMaxScaler | HalfSpaceTrees
    >>> parse_model_spec("linear_model.LinearRegression(nope=1)")
    Traceback (most recent call last):
    ...
    streampipe.learn.spec.ModelSpecError: cannot build linear_model.LinearRegression at column 1 of model spec: 'linear_model.LinearRegression(nope=1)' (LinearRegression.__init__() got an unexpected keyword argument 'nope')
    """  # noqa: E501
    return ModelSpec.parse(spec).build()


def model_kind(estimator: base.Estimator) -> ModelKind:
    """Say whether ``estimator`` (a pipeline is judged by its last step) is a regressor,
    a classifier or an anomaly detector; raise ValueError for anything else.

    ``"anomaly"`` includes River's supervised anomaly detectors (e.g.
    ``anomaly.GaussianScorer``), whose ``learn_one``/``score_one`` also take ``y``;
    their ``_supervised`` is True.

    River once did this with ``utils.inspect.isregressor`` and friends, which unwrap a
    pipeline and test its last step; River 0.26 dropped them in favour of ``isinstance``
    seeing through pipelines. Unwrapping here works with either.

    >>> from river import anomaly, linear_model, preprocessing
    >>> model_kind(preprocessing.StandardScaler() | linear_model.LogisticRegression())
    'classifier'
    >>> model_kind(anomaly.QuantileFilter(anomaly.HalfSpaceTrees(), q=0.95))
    'anomaly'
    """
    final = _final_step(estimator)
    if isinstance(final, _ANOMALY_BASES):
        return "anomaly"
    if isinstance(final, base.Classifier):
        return "classifier"
    if isinstance(final, base.Regressor):
        return "regressor"
    raise ValueError(f"{type(final).__name__} is not a regressor, classifier or anomaly detector")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A validated model spec: its ``text``, a short ``name`` and the model ``kind``.

    Creating one parses the text and builds the model once, so a bad spec fails here,
    at start-up; :meth:`build` then makes a new unfitted model per device, cheaply.
    ``name`` defaults to the class names joined as in the spec.

    >>> spec = ModelSpec.parse(
    ...     "anomaly.QuantileFilter(anomaly.HalfSpaceTrees(seed=42), q=0.95)"
    ... )
    >>> spec.name, spec.kind
    ('QuantileFilter(HalfSpaceTrees)', 'anomaly')
    >>> ModelSpec.parse("(preprocessing.StandardScaler + feature_extraction.PolynomialExtender)"
    ...                 " | river.linear_model.LinearRegression(l2=0.01)").name
    '(StandardScaler+PolynomialExtender)|LinearRegression'
    """

    text: str
    name: str = ""
    kind: ModelKind = field(init=False, compare=False)
    _plan: _Node = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plan = _compile(self.text)
        model = _build(plan)  # building once is the only way to see constructor errors
        try:
            kind = model_kind(model)
        except ValueError as exc:
            raise ModelSpecError(
                f"model spec must end in a regressor, classifier or anomaly detector: {exc}"
            ) from None
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "_plan", plan)
        if not self.name:
            object.__setattr__(self, "name", plan.name)

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """Validate ``text`` and return its spec; raise :class:`ModelSpecError`."""
        return cls(text)

    def build(self) -> base.Estimator:
        """Return a new, unfitted model."""
        return _build(self._plan)


# The compiled form of a spec: what to construct, already resolved and checked.


@dataclass(frozen=True, slots=True)
class _Const:
    value: Any  # an immutable literal: number, string, bool or None

    @property
    def name(self) -> str:
        return ""


@dataclass(frozen=True, slots=True)
class _Container:
    kind: type  # tuple, list or dict; built afresh each time so models never share one
    items: tuple[_Node, ...]
    keys: tuple[Any, ...] = ()

    @property
    def name(self) -> str:
        return ",".join(n for n in (item.name for item in self.items) if n)


@dataclass(frozen=True, slots=True)
class _Call:
    cls: type
    label: str  # as written, without "river.": "optim.losses.Squared"
    args: tuple[_Node, ...]
    kwargs: tuple[tuple[str, _Node], ...]
    where: str

    @property
    def name(self) -> str:
        # Show wrapped models (QuantileFilter(HalfSpaceTrees)) but not optimizers etc.
        inner = [n for n in (v.name for v in (*self.args, *(v for _, v in self.kwargs))) if n]
        if not issubclass(self.cls, _MODEL_BASES):
            return ""
        return self.cls.__name__ + (f"({','.join(inner)})" if inner else "")


@dataclass(frozen=True, slots=True)
class _Chain:
    symbol: str  # "|" or "+"
    items: tuple[_Node, ...]
    where: str

    @property
    def name(self) -> str:
        return self.symbol.join(
            f"({item.name})" if isinstance(item, _Chain) else item.name for item in self.items
        )


_Node = _Const | _Container | _Call | _Chain


def _compile(text: str) -> _Node:
    if not isinstance(text, str):
        raise ModelSpecError(f"model spec must be a string, not {type(text).__name__}")
    if len(text) > MAX_SPEC_CHARS:
        raise ModelSpecError(
            f"model spec is {len(text)} characters long; the limit is {MAX_SPEC_CHARS}"
        )
    text = text.strip()
    if not text:
        raise ModelSpecError("model spec is empty; e.g. " + DEFAULT_MODEL_SPEC)
    try:
        tree_ = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        place = f" at column {exc.offset}" if exc.lineno == 1 and exc.offset else ""
        raise ModelSpecError(f"model spec is not valid syntax{place}: {exc.msg}") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # null bytes, parser limits
        raise ModelSpecError(f"model spec is not valid syntax: {exc}") from None
    return _Compiler(text).model(tree_.body, depth=0)


class _Compiler:
    """Walks the AST of one spec, accepting only the grammar in the module docstring."""

    def __init__(self, text: str) -> None:
        self.text = text

    def where(self, node: ast.AST) -> str:
        segment = ast.get_source_segment(self.text, node) or ""
        if len(segment) > 60:
            segment = segment[:57] + "..."
        line = self.text.splitlines()[node.lineno - 1]  # type: ignore[attr-defined]
        # col_offset counts UTF-8 bytes; users count characters.
        col = len(line.encode()[: node.col_offset].decode(errors="ignore")) + 1  # type: ignore[attr-defined]
        place = f"column {col}" if node.lineno == 1 else f"line {node.lineno} column {col}"  # type: ignore[attr-defined]
        return f"{place} of model spec: {segment!r}"

    def fail(self, node: ast.AST, problem: str, hint: str = "") -> ModelSpecError:
        return ModelSpecError(f"{problem} at {self.where(node)}" + (f" ({hint})" if hint else ""))

    def model(self, node: ast.expr, depth: int) -> _Node:
        """A model: ``a | b``, ``a + b`` or a constructor."""
        if depth > MAX_NESTING:
            raise self.fail(node, f"model spec is nested more than {MAX_NESTING} levels deep")
        if isinstance(node, ast.BinOp) and type(node.op) in _SYMBOLS:
            symbol = _SYMBOLS[type(node.op)]
            where = self.where(node)
            # a | b | c is left-nested in the AST; flatten it without recursing, so a
            # long pipeline does not count as nesting.
            operands: list[ast.expr] = []
            while isinstance(node, ast.BinOp) and _SYMBOLS.get(type(node.op)) == symbol:
                operands.append(node.right)
                node = node.left
            operands.append(node)
            items = tuple(self.model(item, depth + 1) for item in reversed(operands))
            return _Chain(symbol, items, where)
        if isinstance(node, ast.BinOp):
            raise self.fail(node, "only '|' (pipeline) and '+' (union) may join models")
        return self.constructor(node, depth)

    def constructor(self, node: ast.expr, depth: int) -> _Call:
        """``module.Class`` or ``module.Class(args)``."""
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Call):
                raise self.fail(node, "a call on a call is not allowed")
            if not isinstance(node.func, ast.Name | ast.Attribute):
                raise self.fail(node, f"only module.Class may be called, not {_what(node.func)}")
            cls, label = self.resolve(node.func)
            args = []
            for i, arg in enumerate(node.args, start=1):
                if isinstance(arg, ast.Starred):
                    raise self.fail(arg, "starred arguments are not allowed")
                args.append(self.value(arg, depth + 1, f"argument {i} of {label}"))
            kwargs = []
            for kw in node.keywords:
                if kw.arg is None:
                    raise self.fail(kw.value, "'**' arguments are not allowed")
                owner = f"argument {kw.arg!r} of {label}"
                kwargs.append((kw.arg, self.value(kw.value, depth + 1, owner)))
            return _Call(cls, label, tuple(args), tuple(kwargs), self.where(node))
        if isinstance(node, ast.Name | ast.Attribute):
            cls, label = self.resolve(node)
            return _Call(cls, label, (), (), self.where(node))
        raise self.fail(node, f"expected module.Class or module.Class(...), found {_what(node)}")

    def value(self, node: ast.expr, depth: int, owner: str) -> _Node:
        """An argument: a literal, a container of values, or a model."""
        if depth > MAX_NESTING:
            raise self.fail(node, f"model spec is nested more than {MAX_NESTING} levels deep")
        if isinstance(node, ast.Constant):
            if node.value is None or isinstance(node.value, bool | int | float | str):
                return _Const(node.value)
            raise self.fail(node, f"{type(node.value).__name__} literals are not allowed")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            number = node.operand
            if (
                isinstance(number, ast.Constant)
                and isinstance(number.value, int | float)
                and not isinstance(number.value, bool)
            ):
                return _Const(-number.value if isinstance(node.op, ast.USub) else number.value)
            raise self.fail(node, "a sign may only precede a number")
        if isinstance(node, ast.Tuple | ast.List):
            items = tuple(self.value(item, depth + 1, owner) for item in node.elts)
            return _Container(tuple if isinstance(node, ast.Tuple) else list, items)
        if isinstance(node, ast.Dict):
            keys = []
            for key in node.keys:
                if key is None:
                    raise self.fail(node, "'**' in a dict is not allowed")
                const = self.value(key, depth + 1, owner)
                if not isinstance(const, _Const):
                    raise self.fail(key, "dict keys must be literals")
                keys.append(const.value)
            values = tuple(self.value(v, depth + 1, owner) for v in node.values)
            return _Container(dict, values, tuple(keys))
        if isinstance(node, ast.BinOp) and any(
            isinstance(side, ast.Constant | ast.UnaryOp) for side in (node.left, node.right)
        ):
            raise self.fail(node, f"arithmetic in {owner}", "write the value itself")
        if isinstance(node, ast.Name):
            raise self.fail(
                node,
                f"bare name {node.id!r} as {owner}",
                "argument values must be literals or module.Class(...)",
            )
        return self.model(node, depth)

    def resolve(self, node: ast.Name | ast.Attribute) -> tuple[type, str]:
        """Resolve a dotted name to an allow-listed River class."""
        parts: list[str] = []
        current: ast.expr = node
        while isinstance(current, ast.Attribute):
            parts.append(current.attr)
            current = current.value
        if not isinstance(current, ast.Name):
            raise self.fail(node, f"expected module.Class, found {_what(current)}")
        parts.append(current.id)
        parts.reverse()
        for part in parts:
            if part.startswith("_"):
                raise self.fail(node, f"private or dunder name {part!r} is not allowed")
        if parts[0] == "river" and len(parts) > 1:
            parts = parts[1:]
        if len(parts) == 1:
            raise self.fail(
                node,
                f"bare name {parts[0]!r} is not allowed",
                "write module.Class, e.g. preprocessing.StandardScaler",
            )
        # Longest allow-listed module prefix: tree.splitter before tree.
        for split in range(len(parts) - 1, 0, -1):
            module_name = ".".join(parts[:split])
            if module_name in _MODULES:
                break
        else:
            hint = _did_you_mean(parts[0], list(_MODULES)) or _ALLOWED_HINT
            raise self.fail(node, f"unknown River module {parts[0]!r}", hint)
        if split != len(parts) - 1:
            raise self.fail(
                node,
                f"{'.'.join(parts)!r} goes deeper than module.Class",
                "attributes and methods of a class are not allowed",
            )
        class_name = parts[-1]
        cls = _allowed_class(module_name, class_name)
        if cls is None:
            names = sorted(
                n for n in _MODULES[module_name].__all__ if _allowed_class(module_name, n)
            )
            raise self.fail(
                node,
                f"{class_name!r} is not a River class allowed in {module_name}",
                _did_you_mean(class_name, names) or "allowed: " + ", ".join(names),
            )
        return cls, f"{module_name}.{class_name}"


def _allowed_class(module_name: str, class_name: str) -> type | None:
    """The public, concrete River class ``module_name.class_name``, if it is allowed."""
    module = _MODULES[module_name]
    cls = getattr(module, class_name, None) if class_name in module.__all__ else None
    if (
        inspect.isclass(cls)
        and issubclass(cls, base.Base)
        and cls.__module__.startswith("river.")
        and not inspect.isabstract(cls)
        and (module_name != "compose" or class_name in _COMPOSE_CLASSES)
    ):
        return cls
    return None


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"did you mean {close[0]!r}?" if close else ""


def _what(node: ast.AST) -> str:
    names = {
        ast.Lambda: "a lambda",
        ast.Subscript: "a subscript",
        ast.JoinedStr: "an f-string",
        ast.ListComp: "a comprehension",
        ast.SetComp: "a comprehension",
        ast.DictComp: "a comprehension",
        ast.GeneratorExp: "a comprehension",
        ast.Call: "a call",
        ast.Constant: "a literal",
    }
    return names.get(type(node), f"a {type(node).__name__} expression")


def _build(plan: _Node) -> Any:
    if isinstance(plan, _Const):
        return plan.value
    if isinstance(plan, _Container):
        items = [_build(item) for item in plan.items]
        if plan.kind is dict:
            return dict(zip(plan.keys, items, strict=True))
        return plan.kind(items)
    if isinstance(plan, _Call):
        args = [_build(arg) for arg in plan.args]
        kwargs = {key: _build(value) for key, value in plan.kwargs}
        try:
            return plan.cls(*args, **kwargs)
        except Exception as exc:  # River's own message is the helpful part
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise ModelSpecError(f"cannot build {plan.label} at {plan.where} ({message})") from None
    items = [_build(item) for item in plan.items]
    transformers = items if plan.symbol == "+" else items[:-1]
    for item in transformers:
        if not isinstance(_final_step(item), base.BaseTransformer):
            role = "joined with '+'" if plan.symbol == "+" else "before the last '|' step"
            raise ModelSpecError(
                f"{type(_final_step(item)).__name__} is not a transformer, so it cannot be "
                f"{role} at {plan.where}"
            )
    combine = operator.or_ if plan.symbol == "|" else operator.add
    model = items[0]
    for item in items[1:]:
        model = combine(model, item)
    return model


def _final_step(estimator: Any) -> Any:
    while isinstance(estimator, compose.Pipeline):
        estimator = list(estimator.steps.values())[-1]
    return estimator
