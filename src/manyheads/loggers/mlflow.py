"""MLflow: the options as parameters, every history column as a metric per epoch, the run folder as artifacts.

The tracking store is ``MLFLOW_TRACKING_URI`` when set, else a file store ``./mlruns`` in the
current directory. MLflow 3's own default is ``sqlite:///mlflow.db``, which needs the full
``mlflow`` package; the file store also works with ``mlflow-skinny``, and recent MLflow 3
releases (3.17) refuse it unless ``MLFLOW_ALLOW_FILE_STORE=true``, which is set here when unset.
The experiment is ``MLFLOW_EXPERIMENT_NAME`` or "manyheads". The run's id and store are kept in
``run_dir/mlflow.json``, so ``fit(resume=run_dir)`` continues the same MLflow run.

    mh.fit(net, df, run_dir="runs/faces", loggers=["mlflow"])   # then: mlflow ui --backend-store-uri ./mlruns
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from manyheads import checkpoint
from manyheads.loggers.base import Logger, Run, flatten, numeric, register

if TYPE_CHECKING:
    from manyheads.result import TrainResult

RECORD = "mlflow.json"  # in the run folder: {"run_id", "tracking_uri"}
EXPERIMENT = "manyheads"
NOT_ARTIFACTS = {checkpoint.NAME, RECORD}  # the training state is not a result; the record is ours
NOT_ARTIFACT_FOLDERS = {"tensorboard", "mlruns"}
BATCH = 100  # MLflow takes at most 100 params and 1000 metrics per call


def tracking_uri(record: Mapping[str, Any] | None = None) -> str:
    """``MLFLOW_TRACKING_URI``, else the store a resumed run was started in, else ``file:`` ./mlruns (absolute)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (record or {}).get("tracking_uri")
    uri = uri or Path("mlruns").resolve().as_uri()
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # recent MLflow 3 refuses file stores without it
    return uri


@register("mlflow")
class MLflow(Logger):
    """Logs through ``mlflow.MlflowClient`` (``pip install "manyheads[mlflow]"``); no global MLflow state is set.

    MLflow(experiment="faces", tracking_uri="http://127.0.0.1:5000")  # or fit(loggers=["mlflow"])
    """

    package = "mlflow"
    extra = "mlflow"

    def __init__(self, experiment: str | None = None, tracking_uri: str | None = None, run_name: str | None = None):
        self.experiment, self.uri, self.run_name = experiment, tracking_uri, run_name
        self.client: Any = None
        self.run_id: str | None = None
        self.run = Run()

    def start(self, run: Run) -> None:
        from mlflow import MlflowClient

        self.run = run
        record = _read_record(run.run_dir) if run.resumed else None
        uri = self.uri or tracking_uri(record)
        self.client = MlflowClient(tracking_uri=uri)
        if record is not None and record.get("tracking_uri") == uri:
            self.run_id = record["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        self.run_id = self.client.create_run(self._experiment_id(), run_name=self._run_name()).info.run_id
        self._params(flatten(run.options))
        if run.run_dir is not None:
            run.run_dir.mkdir(parents=True, exist_ok=True)
            (run.run_dir / RECORD).write_text(json.dumps({"run_id": self.run_id, "tracking_uri": uri}, indent=1))

    def _experiment_id(self) -> str:
        name = self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else self.client.create_experiment(name)

    def _run_name(self) -> str | None:
        return self.run_name or (self.run.run_dir.name if self.run.run_dir is not None else None)

    def _params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:6000]) for key, value in params.items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + BATCH])

    def log_epoch(self, row: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, value, now, step) for key, value in numeric(row).items()]
        for i in range(0, len(items), 10 * BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + 10 * BATCH])

    def finish(self, result: TrainResult) -> None:
        if self.run.run_dir is not None:
            self._artifacts(self.run.run_dir)
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, error: BaseException) -> None:
        # MLflow's own words: KILLED for a run stopped by hand, FAILED for one that crashed
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")

    def _artifacts(self, run_dir: Path) -> None:
        """The run folder's files (model, history, figures, summary, config), at their paths in it."""
        for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
            relative = path.relative_to(run_dir)
            if path.name in NOT_ARTIFACTS or NOT_ARTIFACT_FOLDERS & set(relative.parts[:-1]):
                continue
            folder = relative.parent.as_posix()
            self.client.log_artifact(self.run_id, str(path), None if folder == "." else folder)

    @classmethod
    def add_files(cls, run_dir: Path, paths: list[Path]) -> None:
        """The files as artifacts of the run recorded in ``run_dir/mlflow.json`` (a finished run takes them too)."""
        from mlflow.tracking import MlflowClient

        record = _read_record(run_dir)
        if record is None:
            return
        client = MlflowClient(tracking_uri(record))
        for path in paths:
            folder = path.relative_to(run_dir).parent.as_posix()
            client.log_artifact(record["run_id"], str(path), None if folder == "." else folder)


def _read_record(run_dir: Path | None) -> dict | None:
    """The MLflow run a resumed run folder was logged to, or None (it was not)."""
    path = run_dir / RECORD if run_dir is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None
