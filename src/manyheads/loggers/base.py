"""The logger interface: what :func:`manyheads.fit` tells an experiment tracker, and the registry of trackers.

fit calls every logger three times over a run: :meth:`Logger.start` once (the options, the run
folder, whether it resumes), :meth:`Logger.log_epoch` with each epoch's history row, and
:meth:`Logger.finish` with the result once the run folder is written; or :meth:`Logger.fail` with
the exception that stopped training. Only rank 0 logs under torchrun.

    @register("printer")
    class Printer(Logger):
        def log_epoch(self, row, step): print(step, row["train/total/loss"])
"""

from __future__ import annotations

import contextlib
import importlib
import json
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from manyheads.registry import add_to

if TYPE_CHECKING:
    from manyheads.result import TrainResult

METHODS = ("start", "log_epoch", "finish")  # what an object passed as a logger must have


@dataclass
class Run:
    """What a logger is told at the start: the fit options (a JSON-safe record), the run folder (or None),
    whether the run resumes one in that folder, and the first epoch it trains (0 for a fresh run).

        Run(options_record(epochs=8), Path("runs/faces"), resumed=True, epoch=3)
    """

    options: Mapping[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    resumed: bool = False
    epoch: int = 0


class Logger:
    """An experiment tracker. Subclasses override the methods they need; each does nothing here.

    ``package`` is the module the tracker needs and ``extra`` the manyheads extra that installs it
    (``pip install "manyheads[tensorboard]"``); fit checks it is importable before any work.

        mh.fit(net, df, loggers=["tensorboard", MyLogger()])
    """

    name: str = ""  # set by @register
    package: str | None = None
    extra: str | None = None

    @classmethod
    def installed(cls) -> bool:
        """Whether ``package`` imports (True for a logger that needs none)."""
        if cls.package is None:
            return True
        try:
            importlib.import_module(cls.package)
        except ImportError:
            return False
        return True

    def start(self, run: Run) -> None:
        """The run starts (or resumes, ``run.resumed``) at epoch ``run.epoch``."""

    def log_epoch(self, row: Mapping[str, Any], step: int) -> None:
        """An epoch's history row (every column), at ``step``: the epoch number, 1 for the first."""

    def finish(self, result: TrainResult) -> None:
        """Training is over and the run folder (if any) holds the model, history and figures."""

    def fail(self, error: BaseException) -> None:
        """Training stopped with ``error`` (an exception, or Ctrl-C), which fit raises again after this."""

    @classmethod
    def add_files(cls, run_dir: Path, paths: list[Path]) -> None:
        """Files written into ``run_dir`` after the run finished (the test report), added to its tracker run."""


REGISTRY: dict[str, type[Logger]] = {}


def register(name: str) -> Callable[[type[Logger]], type[Logger]]:
    """Class decorator: make a logger known by name (``fit(loggers=[name])``, YAML ``train.log: [name]``).

    @register("tensorboard") class TensorBoard(Logger): ...
    """

    return add_to(REGISTRY, name, what="logger", attribute="name")


def is_logger(value: Any) -> bool:
    """Whether ``value`` can be passed as a logger object: it has callable start, log_epoch and finish."""
    return not isinstance(value, str | type) and all(callable(getattr(value, m, None)) for m in METHODS)


class Loggers:
    """The loggers of one run, called together; empty (doing nothing) off rank 0 or without loggers.

    trackers = create(["tensorboard"]); trackers.start(Run(options)); trackers.log_epoch(row); trackers.finish(result)
    """

    def __init__(self, loggers: Iterable[Any] = ()) -> None:
        self.loggers = list(loggers)

    def start(self, run: Run) -> None:
        for logger in self.loggers:
            logger.start(run)

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """Log a history row at its epoch number."""
        for logger in self.loggers:
            logger.log_epoch(row, int(row["epoch"]))

    def finish(self, result: TrainResult) -> None:
        for logger in self.loggers:
            logger.finish(result)

    @contextlib.contextmanager
    def running(self, run: Run) -> Iterator[Loggers]:
        """Start the loggers; if the block raises, tell each one (``fail``) before the error goes on.

        with trackers.running(Run(options, run_dir)): ...train...; trackers.finish(result)
        """
        self.start(run)
        try:
            yield self
        except BaseException as error:  # Ctrl-C too: a tracker must not show a dead run as running
            for logger in self.loggers:
                _tell_failed(logger, error)
            raise


def _tell_failed(logger: Any, error: BaseException) -> None:
    """``logger.fail(error)`` where it has one; its own errors are warned about, never raised over ``error``."""
    fail = getattr(logger, "fail", None)  # optional for logger objects: METHODS does not require it
    if not callable(fail):
        return
    try:
        fail(error)
    except Exception as own:
        warnings.warn(f"logger {type(logger).__name__}.fail raised {own!r} while fit was failing with {error!r}",
                      stacklevel=3)  # fmt: skip


def create(specs: Iterable[Any] | None, *, main: bool = True) -> Loggers:
    """The loggers for fit's ``loggers=``: registered names made into loggers, objects as they are.

    ``main=False`` (a rank other than 0 under torchrun) gives none. fit has checked the names
    (``validation.FIT_CONSTRAINTS["loggers"]``).

        create(["tensorboard", "mlflow"], main=cluster.is_main)
    """
    if not main or not specs:
        return Loggers()
    return Loggers(REGISTRY[spec]() if isinstance(spec, str) else spec for spec in specs)


def add_files(specs: Iterable[Any] | None, run_dir: Path, paths: list[Path]) -> None:
    """Give the registered trackers of a finished run the files written after it (``manyheads train``'s report).

    add_files(["mlflow"], Path("runs/faces"), [Path("runs/faces/report.md")])
    """
    for spec in specs or []:
        if isinstance(spec, str):
            REGISTRY[spec].add_files(run_dir, paths)


def flatten(options: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested options as one level, keys joined by dots; lists and None as JSON text.

    flatten({"heads": {"age": {"kind": "regression"}}, "lr": 0.001})  # {"heads.age.kind": "regression", "lr": 0.001}
    """
    flat: dict[str, str | int | float | bool] = {}
    for key, value in options.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, name + ".")
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def numeric(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's numeric columns but ``epoch`` (the step), as floats."""
    return {
        key: float(value)
        for key, value in row.items()
        if key != "epoch" and isinstance(value, numbers.Real) and not isinstance(value, bool)
    }
