"""Validation: the one place that says which option values are accepted, and how a refusal reads.

Every option of :func:`manyheads.fit` that has a constraint is declared once, in
:data:`FIT_CONSTRAINTS`, as a small declarative constraint (:class:`Interval`, :class:`Integer`,
:class:`OneOf`, :class:`Optional`, :class:`AnyOf`, :class:`MappingOf`, :class:`Predicate`).
Choices are read from the registries they come from (``optim.OPTIMIZERS``, ``optim.SCHEDULES``,
``precision.PRECISIONS``, ``balancing.STRATEGIES``, ``losses.REGISTRY``, ``heads.REGISTRY``, ``loggers.REGISTRY``),
at check time, so this module imports nothing heavy itself. Every refusal has one form::

    The 'warmup' parameter of fit must be a fraction in [0, 1); got 5.0.

The run config (:mod:`manyheads.config`) checks its fields with the same constraints; there the
file and field lead the line and the message is the ``must be ...; got ...`` part.

Resuming: :func:`options_record` turns fit's options into a JSON-safe record (kept in the
checkpoint), :func:`check_resume` refuses a resume whose options differ from the run's where it
matters, and :func:`check_config_resume` does the same for a run config (``manyheads train --resume``).

    check_fit_options(epochs=10, warmup=0.3, weights={"age": 2.0})
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

TEMPLATE = "The {name!r} parameter of {where} must be {description}; got {got}."
ON_BAD = ("error", "skip")  # what to do at a bad row (on_bad) or a NaN/inf loss (on_nonfinite)
EXTENDABLE_SCHEDULES = (None, "constant")  # schedules whose steps do not depend on epochs


class OptionError(ValueError):
    """An option value that is refused; the message names the option and the value given."""


def _registry(module: str, name: str) -> Callable[[], Any]:
    """A zero-argument function reading ``module.name`` when called (registries are imported late)."""
    return lambda: getattr(importlib.import_module(module), name)


def show(value: Any) -> str:
    """A value as a refusal shows it: ``5.0``, ``nan``, ``'cosin'``, ``<class 'Foo'>``; long ones cut."""
    text = f"<class {value.__qualname__!r}>" if isinstance(value, type) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# ---- constraints ----------------------------------------------------------------------------------


class Constraint:
    """Accepts some values; :meth:`problem` says what was wrong with one that it does not."""

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def applies(self, value: Any) -> bool:
        """Whether ``value`` is of the type this constraint is about (picks the message among alternatives)."""
        return False

    @property
    def description(self) -> str:
        raise NotImplementedError

    def problem(self, value: Any) -> str | None:
        """None when ``value`` is accepted, else what to show after "got"."""
        return None if self.accepts(value) else show(value)


class Interval(Constraint):
    """A finite real number between ``low`` and ``high`` (None: unbounded); ``closed``: which ends count.

    Interval(0, 1, closed="left", what="a fraction")  # "a fraction in [0, 1)"
    """

    def __init__(self, low: float | None, high: float | None, *, closed: str = "both", what: str = "a number"):
        if closed not in ("both", "left", "right", "neither"):
            raise ValueError(f"closed must be 'both', 'left', 'right' or 'neither', got {closed!r}")
        self.low, self.high, self.closed, self.what = low, high, closed, what

    def accepts(self, value: Any) -> bool:
        if not _is_number(value) or not math.isfinite(value):
            return False
        left, right = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.low is not None and (value < self.low or (value == self.low and not left)):
            return False
        return self.high is None or value < self.high or (value == self.high and right)

    def applies(self, value: Any) -> bool:
        return _is_number(value)

    @property
    def description(self) -> str:
        left, right = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.low is not None and self.high is not None:
            return f"{self.what} in {'[' if left else '('}{self.low:g}, {self.high:g}{']' if right else ')'}"
        if self.low is not None:
            return f"{self.what} {'>=' if left else '>'} {self.low:g}"
        if self.high is not None:
            return f"{self.what} {'<=' if right else '<'} {self.high:g}"
        return self.what


def Finite(what: str = "a finite number") -> Interval:
    """Any finite real number (not NaN, not inf)."""
    return Interval(None, None, what=what)


class Integer(Constraint):
    """An integer (not a bool) with optional bounds: ``Integer(min=1)`` reads "an integer >= 1"."""

    def __init__(self, min: int | None = None, max: int | None = None) -> None:
        self.min, self.max = min, max

    def accepts(self, value: Any) -> bool:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def applies(self, value: Any) -> bool:
        return _is_number(value)

    @property
    def description(self) -> str:
        if self.min is not None and self.max is not None:
            return f"an integer in [{self.min}, {self.max}]"
        if self.min is not None:
            return f"an integer >= {self.min}"
        return "an integer" if self.max is None else f"an integer <= {self.max}"


class OneOf(Constraint):
    """One of a registry's names (a dict's keys, a tuple, or a function returning either, read when checked).

    OneOf(_registry("manyheads.optim", "OPTIMIZERS"), ignore_case=True)  # "one of ['adam', 'adamw', 'sgd']"
    """

    def __init__(self, choices: Iterable | Callable[[], Iterable], *, ignore_case: bool = False, what: str = "one of"):
        self._choices, self.ignore_case, self.what = choices, ignore_case, what

    @property
    def choices(self) -> list:
        found = self._choices() if callable(self._choices) else self._choices
        ordered = isinstance(found, list | tuple | Mapping)  # registries keep their order; sets are sorted
        return list(found) if ordered else sorted(found, key=repr)

    def accepts(self, value: Any) -> bool:
        if isinstance(value, str) and self.ignore_case:
            value = value.strip().lower()
        try:
            return value in self.choices
        except TypeError:  # unhashable or odd values are simply not among the names
            return False

    def applies(self, value: Any) -> bool:
        return isinstance(value, str)

    @property
    def description(self) -> str:
        return f"{self.what} {self.choices!r}"


class Optional(Constraint):
    """None, or a value the inner constraint accepts."""

    def __init__(self, inner: Constraint) -> None:
        self.inner = inner

    def accepts(self, value: Any) -> bool:
        return value is None or self.inner.accepts(value)

    def applies(self, value: Any) -> bool:
        return value is None or self.inner.applies(value)

    def problem(self, value: Any) -> str | None:
        return None if value is None else self.inner.problem(value)

    @property
    def description(self) -> str:
        return _either([*_parts(self.inner), "None"])


class AnyOf(Constraint):
    """A value any of the alternatives accepts; a refusal shows what the alternative of its type found."""

    def __init__(self, *alternatives: Constraint) -> None:
        self.alternatives = alternatives

    def accepts(self, value: Any) -> bool:
        return any(c.accepts(value) for c in self.alternatives)

    def applies(self, value: Any) -> bool:
        return any(c.applies(value) for c in self.alternatives)

    def problem(self, value: Any) -> str | None:
        if self.accepts(value):
            return None
        own = next((c for c in self.alternatives if c.applies(value)), None)
        return own.problem(value) if own is not None else show(value)

    @property
    def description(self) -> str:
        return _either(_parts(self))


def _parts(constraint: Constraint) -> list[str]:
    if isinstance(constraint, AnyOf):
        return [c.description for c in constraint.alternatives]
    return [constraint.description]


def _either(parts: list[str]) -> str:
    """The alternatives as one phrase: ``a, b or c``."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


class MappingOf(Constraint):
    """A mapping whose every value the inner constraint accepts; a refusal names the key (``keys``: what keys are)."""

    def __init__(self, values: Constraint, *, keys: str = "head") -> None:
        self.values, self.keys = values, keys

    def accepts(self, value: Any) -> bool:
        return self.problem(value) is None

    def applies(self, value: Any) -> bool:
        return isinstance(value, Mapping)

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, Mapping):
            return show(value)
        for key, item in value.items():
            if not isinstance(key, str):
                return f"the key {show(key)} (a {self.keys} name is a string)"
            found = self.values.problem(item)
            if found is not None:
                return f"{found} for {self.keys} {key!r}"
        return None

    @property
    def description(self) -> str:
        return f"a mapping {self.keys} -> {self.values.description}"


class ListOf(Constraint):
    """A list or tuple whose every item the inner constraint accepts; a refusal shows the item."""

    def __init__(self, items: Constraint) -> None:
        self.items = items

    def accepts(self, value: Any) -> bool:
        return self.problem(value) is None

    def applies(self, value: Any) -> bool:
        return isinstance(value, list | tuple)

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, list | tuple):
            return show(value)
        return next((found for item in value if (found := self.items.problem(item)) is not None), None)

    @property
    def description(self) -> str:
        return f"a list of ({self.items.description})"


class Installed(Constraint):
    """A name in a registry whose class's ``installed()`` is true; a refusal names the extra to install.

    Installed(_registry("manyheads.loggers", "REGISTRY"))  # got 'mlflow', whose package ... pip install "..."
    """

    def __init__(self, registry: Callable[[], Mapping[str, Any]]) -> None:
        self.registry, self.names = registry, OneOf(registry)

    def accepts(self, value: Any) -> bool:
        return self.problem(value) is None

    def applies(self, value: Any) -> bool:
        return isinstance(value, str)

    def problem(self, value: Any) -> str | None:
        if not self.names.accepts(value):
            return show(value)
        cls = self.registry()[value]
        if cls.installed():
            return None
        return f'{show(value)}, whose package {cls.package!r} is not installed: pip install "manyheads[{cls.extra}]"'

    @property
    def description(self) -> str:
        return self.names.description


class Predicate(Constraint):
    """A value ``test`` accepts; ``kind`` says which values it is about (for the message among alternatives)."""

    def __init__(
        self,
        test: Callable[[Any], bool],
        description: str | Callable[[], str],
        kind: Callable[[Any], bool] | None = None,
    ) -> None:
        self.test, self._description, self.kind = test, description, kind

    def accepts(self, value: Any) -> bool:
        return bool(self.test(value))

    def applies(self, value: Any) -> bool:
        return bool(self.kind(value)) if self.kind is not None else False

    @property
    def description(self) -> str:
        return self._description() if callable(self._description) else self._description


# ---- what the registries accept -----------------------------------------------------------------


def _is_strategy(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    from manyheads.balancing import STRATEGIES

    key = value.strip().lower()
    return key in STRATEGIES or (key.startswith("jd:") and len(key) > 3)


def _strategies() -> str:
    from manyheads.balancing import STRATEGIES

    return f"a balancing strategy (one of {sorted(STRATEGIES)!r}, or 'jd:<torchjd aggregator>')"


def _is_aggregator(value: Any) -> bool:
    from manyheads.balancing import _is_aggregator

    return _is_aggregator(value)


def _is_optimizer_class(value: Any) -> bool:
    import torch

    return isinstance(value, type) and issubclass(value, torch.optim.Optimizer)


def _is_loss_name(value: Any) -> bool:
    from manyheads.losses import REGISTRY

    return isinstance(value, str) and canonical_loss(value) in REGISTRY


def _is_logger(value: Any) -> bool:
    from manyheads.loggers import is_logger

    return is_logger(value)


def _loss_names() -> str:
    from manyheads.losses import REGISTRY

    return f"a registered loss in {sorted(REGISTRY)!r}"


STRATEGY = Predicate(_is_strategy, _strategies, kind=lambda v: isinstance(v, str))
AGGREGATOR = Predicate(_is_aggregator, "a torchjd aggregator", kind=lambda v: not isinstance(v, str | Mapping))
OPTIMIZER_NAME = OneOf(_registry("manyheads.optim", "OPTIMIZERS"), ignore_case=True)
OPTIMIZER = AnyOf(
    OPTIMIZER_NAME,
    Predicate(_is_optimizer_class, "a torch optimizer class", kind=lambda v: isinstance(v, type)),
)
SCHEDULE = OneOf(_registry("manyheads.optim", "SCHEDULES"))
PRECISION = OneOf(_registry("manyheads.precision", "PRECISIONS"))
HEAD_KIND = OneOf(_registry("manyheads.heads", "REGISTRY"))
TTA = OneOf(_registry("manyheads.net", "TTA_MODES"))
LOSS = AnyOf(
    Predicate(_is_loss_name, _loss_names, kind=lambda v: isinstance(v, str)),
    Predicate(callable, "a callable (output, target) -> loss", kind=callable),
)
WEIGHT = Interval(0, None, closed="left", what="a finite number")
FRACTION = Interval(0, 1, closed="left", what="a fraction")
LOGGER_NAME = OneOf(_registry("manyheads.loggers", "REGISTRY"))  # the run config's train.log
LOGGER = AnyOf(
    Installed(_registry("manyheads.loggers", "REGISTRY")),
    Predicate(_is_logger, "an object with start, log_epoch and finish", kind=lambda v: not isinstance(v, str)),
)

FIT_CONSTRAINTS: dict[str, Constraint] = {
    "epochs": Integer(min=1),
    "steps_per_epoch": Optional(Integer(min=1)),  # a stream's epoch; a table's is one pass (check_data_options)
    "batch_size": Integer(min=1),
    "lr": Interval(0, None, closed="left", what="a finite number"),  # 0: evaluate without learning
    "trunk_lr": Optional(Interval(0, None, closed="left", what="a finite number")),
    "weight_decay": Optional(Interval(0, None, closed="left", what="a finite number")),
    "optimizer": OPTIMIZER,
    "schedule": SCHEDULE,
    "warmup": FRACTION,
    "freeze_trunk_epochs": Integer(min=0),
    "ema": Optional(Interval(0, 1, closed="left", what="a decay")),
    "precision": PRECISION,
    "losses": Optional(MappingOf(LOSS)),
    "weights": Optional(AnyOf(MappingOf(WEIGHT), STRATEGY, AGGREGATOR)),
    "monitor": Optional(
        AnyOf(
            Predicate(lambda v: isinstance(v, str), "a history column", kind=lambda v: isinstance(v, str)),
            MappingOf(Finite(), keys="column"),
        )
    ),
    "patience": Optional(Integer(min=1)),
    "seed": Optional(Integer()),
    "on_bad": OneOf(ON_BAD),
    "on_nonfinite": OneOf(ON_BAD),
    "checkpoint_every": Optional(Integer(min=1)),
    "workers": Optional(Integer(min=0)),
    "image_size": Optional(Integer(min=1)),
    "loggers": Optional(ListOf(LOGGER)),
    "calibration": Optional(
        AnyOf(  # the table first: "validation" in [...] would compare a DataFrame elementwise
            Predicate(
                lambda v: not isinstance(v, str | bool | int | float),
                "a table of labelled rows",
                kind=lambda v: not isinstance(v, str | bool | int | float),
            ),
            OneOf(["validation"]),
            Interval(0, 1, closed="neither", what="a fraction of the training rows"),
        )
    ),
    "coverage": Interval(0, 1, closed="neither", what="a fraction"),
    "interval": OneOf(_registry("manyheads.calibration", "INTERVALS")),
    "abstain": Optional(MappingOf(Interval(0, None, closed="neither", what="a threshold"))),
}


def _is_finite_table(value: Any) -> bool:
    """A table of rows: not a name, a number or a stream (streams are torch IterableDatasets, Hugging Face's too)."""
    if isinstance(value, str | bool | int | float | os.PathLike):
        return False
    import torch

    return not isinstance(value, torch.utils.data.IterableDataset)


_TABLE = Predicate(_is_finite_table, "a table of labelled rows", kind=lambda v: not isinstance(v, str | int | float))
# What the options that depend on the training data's kind accept, for a stream and for a table.
STREAM_CONSTRAINTS: dict[str, Constraint] = {
    "steps_per_epoch": Integer(min=1),
    "validation": Optional(
        Predicate(_is_finite_table, "a table of labelled rows (a stream cannot be split off a validation fraction)")
    ),
    "calibration": Optional(AnyOf(_TABLE, OneOf(["validation"]))),
}
TABLE_CONSTRAINTS: dict[str, Constraint] = {
    "steps_per_epoch": Predicate(
        lambda v: v is None, "None for a table (its epoch is one pass over its rows; steps_per_epoch is for streams)"
    ),
}


def check_data_options(streaming: bool, **options: Any) -> None:
    """Check the options whose meaning depends on the training data: a stream (``streaming``) or a table.

    A stream has no length and cannot be split: it needs ``steps_per_epoch``, and ``validation`` and
    ``calibration`` must be tables (or ``calibration="validation"``); a table takes no ``steps_per_epoch``.

        check_data_options(True, steps_per_epoch=None)  # The 'steps_per_epoch' parameter of fit must be ...
    """
    constraints = STREAM_CONSTRAINTS if streaming else TABLE_CONSTRAINTS
    if streaming and options.get("steps_per_epoch", 0) is None:  # say why, beside the template's "got None"
        raise OptionError(message("steps_per_epoch", "fit", constraints["steps_per_epoch"],
                                  "None (a stream has no length: say how many steps make an epoch)"))  # fmt: skip
    check_options("fit", options, constraints)


def problem(constraint: Constraint, value: Any) -> str | None:
    """``"must be ...; got ..."`` when ``constraint`` refuses ``value``, else None (the config's form)."""
    got = constraint.problem(value)
    return None if got is None else f"must be {constraint.description}; got {got}"


def message(name: str, where: str, constraint: Constraint, got: str) -> str:
    """The one refusal line: ``The 'warmup' parameter of fit must be a fraction in [0, 1); got 5.0.``"""
    return TEMPLATE.format(name=name, where=where, description=constraint.description, got=got)


def check_option(name: str, value: Any, where: str = "fit", constraint: Constraint | None = None) -> None:
    """Refuse ``value`` for option ``name`` (constraint: ``FIT_CONSTRAINTS[name]`` unless given)."""
    constraint = constraint if constraint is not None else FIT_CONSTRAINTS[name]
    got = constraint.problem(value)
    if got is not None:
        raise OptionError(message(name, where, constraint, got))


def check_options(where: str, options: Mapping[str, Any], constraints: Mapping[str, Constraint] = FIT_CONSTRAINTS):
    """Check every option that has a constraint; others are left to their users."""
    for name, value in options.items():
        if name in constraints:
            check_option(name, value, where, constraints[name])


def check_fit_options(**options: Any) -> None:
    """Check :func:`manyheads.fit`'s options by their keyword names; names without a constraint are ignored.

    check_fit_options(epochs=epochs, batch_size=batch_size, warmup=warmup, weights=weights, ...)
    """
    check_options("fit", options)


def check_compare_options(
    strategies: Iterable, seeds: Iterable, fit_options: dict[str, Any], not_options: Mapping[str, str]
) -> tuple:
    """Check :func:`manyheads.compare`'s arguments before any model trains; returns the strategies.

    ``not_options`` maps the fit options compare sets itself to what to use instead; a
    ``weights=`` in ``fit_options`` is taken out of it (in place) as the one strategy.
    """
    for key, use in not_options.items():
        if key in fit_options:
            raise ValueError(f"compare sets {key!r} itself; use {use}")
    check_options("compare", fit_options)
    strategies, seeds = tuple(strategies), tuple(seeds)
    for strategy in strategies:
        check_option("strategies", strategy, "compare", FIT_CONSTRAINTS["weights"])
    for seed in seeds:
        check_option("seeds", seed, "compare", Integer())
    if "weights" in fit_options:
        weights = fit_options.pop("weights")
        if strategies != ("constant",):
            raise ValueError("pass either weights= or strategies=, not both (weights= is one strategy)")
        strategies = (weights if weights is not None else "constant",)
    if not strategies or not seeds:
        raise ValueError("compare needs at least one strategy and one seed")
    return strategies


# ---- losses, head kinds and backbones, shared with the run config --------------------------------


def canonical_loss(name: str) -> str:
    """A loss name as the registry knows it: ``"L1"`` -> ``"mae"``."""
    from manyheads.losses import canonical_name

    return canonical_name(name.strip())


def suitable_losses(kind: str) -> frozenset[str]:
    """The registered losses that suit a head kind (its class's ``losses``)."""
    from manyheads.heads import REGISTRY

    return frozenset(REGISTRY[kind].losses)


def check_loss(loss: str, kind: str | None = None) -> str:
    """The registered key of a loss name; refuses an unknown one, or one that does not suit ``kind``."""
    from manyheads.losses import REGISTRY

    key = canonical_loss(loss)
    if key not in REGISTRY:
        raise ValueError(f"unknown loss {loss!r}; must be one of {sorted(REGISTRY)!r}")
    if kind is not None:
        suits = suitable_losses(kind)
        if key not in suits:
            raise ValueError(f"loss {loss!r} does not fit a {kind} head; must be one of {sorted(suits)!r}")
    return key


def smoothable_losses(head: Any) -> frozenset[str]:
    """The registered losses that take the soft targets of ``label_smoothing`` on this head."""
    return frozenset(head.smoothable)


def check_backbone(name: str) -> str:
    """Refuse a backbone name that is neither torchvision's nor ``timm:NAME``."""
    import torchvision

    if not name.startswith("timm:") and name not in torchvision.models.list_models(torchvision.models):
        from manyheads.backbones import available

        raise ValueError(f"unknown backbone {name!r}; e.g. {available()} (or 'timm:NAME' with timm installed)")
    return name


# ---- resuming --------------------------------------------------------------------------------------

SAFE_ON_RESUME = frozenset(
    {"progress", "callbacks", "device", "workers", "cache_dir", "run_dir", "resume", "checkpoint_every", "loggers"}
)
# a moved data folder (split.json still pins the test rows); trackers (train.log) may be added or dropped
SAFE_IN_CONFIG = frozenset({"data.path", "data.images", "train.log"})
_ABSENT = "(not set)"


def _name_of(obj: Any) -> str:
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__qualname__
    return f"{module}.{qualname}" if module and module != "builtins" else qualname


def _record(value: Any) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else repr(float(value))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _record(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_record(v) for v in value]
    if isinstance(value, type) or inspect.isfunction(value) or inspect.ismethod(value) or inspect.isbuiltin(value):
        return _name_of(value)
    if dataclasses.is_dataclass(value):
        fields = {f.name: _record(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"type": _name_of(type(value)), **fields}
    if type(value).__name__ == "device":  # torch.device, without importing torch here
        return str(value)
    return _name_of(type(value))  # modules, tensors, aggregators, tables: by their type


def options_record(**fit_options: Any) -> dict[str, Any]:
    """A JSON-safe record of fit's options: numbers and names as they are, callables and classes by
    qualified name, dataclasses (an ``Augment``) by their fields, anything else (a loss module, a
    tensor, a torchjd aggregator, a table) by its type's name. :func:`check_resume` compares two.

        options_record(epochs=8, optimizer=torch.optim.SGD, losses={"age": nn.L1Loss()})
    """
    return {name: _record(value) for name, value in fit_options.items()}


def _refusal(where: Any, changes: list[tuple[str, Any, Any]], why: str = "") -> str:
    before = ", ".join(f"{key}={_shown(old)}" for key, old, _ in changes)
    after = ", ".join(f"{key}={_shown(new)}" for key, _, new in changes)
    return (f"resume: the run in {where} was trained with {before}; this call has {after}.{why} "
            f"Resume with the run's own settings, or start a new run.")  # fmt: skip


def _shown(value: Any) -> str:
    return value if value is _ABSENT else show(value)


def _epochs_note(old: Any, new: Any, schedule: Any) -> str | None:
    """None when changing epochs old -> new is safe; else why not (may be empty)."""
    if _is_number(old) and _is_number(new) and new > old:
        if schedule in EXTENDABLE_SCHEDULES:
            return None
        return (f" With schedule={schedule!r} the rate at every step depends on epochs, so only runs with "
                f"schedule None or 'constant' can be extended.")  # fmt: skip
    return ""


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], where: Any) -> None:
    """Refuse to resume the run in ``where`` (trained with ``saved``) with options that change it.

    ``saved`` and ``current`` are :func:`options_record` records of fit's options. Refused: any
    change of an option that shapes the model, the data or the optimisation (image_size, heads,
    losses, weights, batch_size, lr, trunk_lr, optimizer, schedule, warmup, precision, ema, seed,
    augment, normalize, monitor, patience, ...): every option not listed as safe. Safe, so
    allowed: ``progress``, ``callbacks``, ``device``, ``workers``, ``cache_dir``, ``run_dir``,
    ``resume``, ``checkpoint_every`` and ``loggers``; ``seed=None`` (take the run's own); and more ``epochs``
    when the run's schedule is None or ``"constant"`` (a cosine or one-cycle schedule spans the
    epochs it was started with, so extending it is refused). Options one record lacks (a
    checkpoint from before an option existed) are not compared.

        check_resume(state["options"], options_record(**options), run_dir)
    """
    changes, why = [], ""
    for key, old in saved.items():
        if key in SAFE_ON_RESUME or key not in current:
            continue
        new = current[key]
        if old == new or (key == "seed" and new is None):
            continue
        if key == "epochs":
            note = _epochs_note(old, new, saved.get("schedule"))
            if note is None:
                continue
            why = why or note
        changes.append((key, old, new))
    if changes:
        raise ValueError(_refusal(where, changes, why))


def _dump(config: Any) -> dict:
    return config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
        return [] if old == new else [(prefix, old, new)]
    found = []
    for key in list(old) + [k for k in new if k not in old]:
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in old or key not in new:
            found.append((path, old.get(key, _ABSENT), new.get(key, _ABSENT)))
        else:
            found += _differences(old[key], new[key], path)
    return found


def config_changes(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    """The changes from run config ``old`` to ``new`` that a resume refuses: (dotted key, old value, new value).

    Allowed, so not listed: the safe fit options under ``train.`` (see :func:`check_resume`),
    ``data.path`` and ``data.images`` (a moved data folder: ``split.json`` still pins the test
    images), and more ``train.epochs`` under schedule None or ``"constant"``. Accepts
    :class:`~manyheads.config.RunConfig` objects or their dumps.
    """
    old, new = _dump(old), _dump(new)
    safe = SAFE_IN_CONFIG | {f"train.{key}" for key in SAFE_ON_RESUME}
    schedule = old.get("train", {}).get("schedule")
    return [
        (key, a, b)
        for key, a, b in _differences(old, new)
        if key not in safe and not (key == "train.epochs" and _epochs_note(a, b, schedule) is None)
    ]


def check_config_resume(old: Any, new: Any, where: Any) -> None:
    """Refuse to resume the run in ``where`` (its config ``old``) with config ``new`` if a change matters.

    One line names every refused key with its old and new value; see :func:`config_changes`.
    """
    changes = config_changes(old, new)
    if changes:
        schedule = _dump(old).get("train", {}).get("schedule")
        why = next((_epochs_note(a, b, schedule) for key, a, b in changes if key == "train.epochs"), "") or ""
        raise ValueError(_refusal(where, changes, why))
