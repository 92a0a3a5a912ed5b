"""Experiment trackers fed by :func:`manyheads.fit`: TensorBoard and MLflow, and a registry for more.

One small file per tracker, registered by name (``base.register``); ``base.Logger`` is the
interface (start, log_epoch, finish). Each needs its extra: ``pip install "manyheads[tensorboard]"``,
``pip install "manyheads[mlflow]"``. An object with those three methods may be passed too.

    mh.fit(net, df, run_dir="runs/faces", loggers=["tensorboard", "mlflow"])
"""

from manyheads.loggers.base import REGISTRY, Logger, Loggers, Run, add_files, create, is_logger, register
from manyheads.loggers.mlflow import MLflow
from manyheads.loggers.tensorboard import TensorBoard

__all__ = [
    "MLflow", "REGISTRY", "Logger", "Loggers", "Run", "TensorBoard", "add_files", "create", "is_logger", "register",
]  # fmt: skip
