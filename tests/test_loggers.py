"""Tests for manyheads.loggers: TensorBoard and MLflow fed by fit, resumed runs, missing packages, the YAML key."""

import sys
from pathlib import Path

import pytest
import yaml

import manyheads as mh
from conftest import make_net, make_table
from manyheads import encoding, loggers
from manyheads.config import ConfigError, load_config
from manyheads.loggers.tensorboard import tag
from manyheads.validation import OptionError

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

FAST = {"validation": 0.25, "batch_size": 64, "lr": 3e-3, "seed": 0, "progress": False}
HEADS = {"age": {"kind": "regression"}, "gender": {"kind": "binary", "labels": ["male", "female"]}}


class Recorder(loggers.Logger):
    """A logger object passed to fit: it writes down every call."""

    def __init__(self) -> None:
        self.calls = []

    def start(self, run):
        self.calls.append(("start", run))

    def log_epoch(self, row, step):
        self.calls.append(("log_epoch", step, dict(row)))

    def finish(self, result):
        self.calls.append(("finish", result))

    def fail(self, error):
        self.calls.append(("fail", error))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A clean MLflow setting: the working directory is a fresh folder (./mlruns goes there), no MLflow variables."""
    folder = tmp_path_factory.mktemp("tracking")
    with pytest.MonkeyPatch.context() as patch:
        clean_mlflow_setting(patch, folder)
        yield folder


def clean_mlflow_setting(patch: pytest.MonkeyPatch, folder: Path) -> None:
    """Work in ``folder`` without MLflow's variables (and remove the one the logger sets, afterwards)."""
    patch.chdir(folder)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        patch.setenv(name, "")  # recorded, so the undo removes what the loggers set
        patch.delenv(name)


@pytest.fixture(scope="module")
def tracked(store):
    """One 3-epoch run with both trackers and a recorder."""
    recorder = Recorder()
    trackers = ["tensorboard", "mlflow", recorder]
    result = mh.fit(make_net(), make_table(200), epochs=3, run_dir=store / "run", loggers=trackers, **FAST)
    return result, recorder


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar in a TensorBoard folder: tag -> {step: value}; a step logged twice fails."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    found = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}
    twice = {t: steps for t, steps in found.items() if len(dict(steps)) != len(steps)}
    assert not twice, f"steps logged twice: {twice}"
    return {t: dict(steps) for t, steps in found.items()}


def history_by_tag(result) -> dict[str, dict[int, float]]:
    history = result.history
    columns = [c for c in history.columns if c != "epoch"]
    return {tag(c): dict(zip(history["epoch"].astype(int), history[c].astype(float), strict=True)) for c in columns}


def mlflow_run(store: Path, monkeypatch):
    """The one MLflow run in ./mlruns, found by mlflow.search_runs, and a client on that store."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (store / "mlruns").as_uri())
    runs = mlflow.search_runs(experiment_names=["manyheads"], output_format="list")
    assert len(runs) == 1
    return runs[0], mlflow.MlflowClient()


def test_tags_group_history_columns_by_head():
    assert tag("val/age/mae") == "age/val/mae"
    assert tag("train/total/loss") == "total/train/loss"
    assert tag("weight/gender") == "gender/weight"
    assert tag("lr") == "lr" and tag("seconds") == "seconds"


def test_tensorboard_holds_every_history_column_for_every_epoch(tracked, store):
    result, _ = tracked
    found = scalars(store / "run" / "tensorboard")
    expected = history_by_tag(result)
    assert set(found) == set(expected)
    for name, values in expected.items():
        assert found[name] == pytest.approx(values, rel=1e-6), name  # float32 in the event file


def test_tensorboard_holds_the_options_and_the_figures(tracked, store):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(store / "run" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "figures/learning_curves" in events.Tags()["images"]
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    start = HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["epochs"].number_value == 3
    assert start.hparams["heads.gender.kind"].string_value == "binary"


def test_mlflow_run_holds_params_metrics_per_step_and_artifacts(tracked, store, monkeypatch):
    result, _ = tracked
    run, client = mlflow_run(store, monkeypatch)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["epochs"] == "3" and params["lr"] == "0.003" and params["heads.age.kind"] == "regression"
    assert params["losses.race"] == "cross_entropy"
    history = result.history
    columns = [c for c in history.columns if c != "epoch"]
    assert set(run.data.metrics) == set(columns)
    for column in columns:
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, column)}
        assert logged == dict(zip(history["epoch"].astype(int), history[column].astype(float), strict=True)), column
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.safetensors", "history.csv", "learning_curves.png", "summary.json"} <= artifacts
    assert "checkpoint.pt" not in artifacts and "tensorboard" not in artifacts


def test_a_logger_object_is_told_the_start_each_epoch_and_the_end(tracked, store):
    result, recorder = tracked
    kinds = [call[0] for call in recorder.calls]
    assert kinds == ["start", "log_epoch", "log_epoch", "log_epoch", "finish"]
    run = recorder.calls[0][1]
    assert run.run_dir == store / "run" and not run.resumed and run.epoch == 0 and run.options["epochs"] == 3
    assert [call[1] for call in recorder.calls[1:4]] == [1, 2, 3]
    assert recorder.calls[1][2] == result.history.iloc[0].to_dict()
    assert recorder.calls[-1][1] is result


def test_a_resumed_run_adds_to_the_same_tracker_runs(tmp_path, monkeypatch):
    clean_mlflow_setting(monkeypatch, tmp_path)
    table, run_dir = make_table(200), tmp_path / "run"
    mh.fit(make_net(), table, epochs=2, run_dir=run_dir, loggers=["tensorboard", "mlflow"], **FAST)
    first_id = (run_dir / loggers.mlflow.RECORD).read_text()
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(run_dir / "tensorboard") as crashed:  # epoch 3 logged, then a crash before its checkpoint
        crashed.add_scalar("age/train/loss", 999.0, global_step=3)
    result = mh.fit(make_net(), table, epochs=4, resume=run_dir, loggers=["tensorboard", "mlflow"], **FAST)
    assert (run_dir / loggers.mlflow.RECORD).read_text() == first_id
    run, client = mlflow_run(tmp_path, monkeypatch)  # one run, not two
    assert run.info.status == "FINISHED"
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/age/loss")}
    assert logged == dict(enumerate(result.history["train/age/loss"], start=1))
    found, expected = scalars(run_dir / "tensorboard"), history_by_tag(result)
    assert set(found) == set(expected)
    for name, values in expected.items():  # steps 1..4, across both event files
        assert found[name] == pytest.approx(values, rel=1e-6), name


def crash_at(epoch: int, error: BaseException):
    """A callback that raises ``error`` after the given epoch's row."""

    def callback(row):
        if row["epoch"] == epoch:
            raise error

    return callback


@pytest.mark.parametrize(("error", "status"), [(RuntimeError("disk full"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_a_run_that_raises_is_marked_so_in_the_trackers_and_the_error_goes_on(error, status, tmp_path, monkeypatch):
    clean_mlflow_setting(monkeypatch, tmp_path)
    recorder = Recorder()
    with pytest.raises(type(error)):
        mh.fit(make_net(), make_table(200), epochs=3, run_dir=tmp_path / "run", callbacks=[crash_at(2, error)],
               loggers=["tensorboard", "mlflow", recorder], **FAST)  # fmt: skip
    assert [call[0] for call in recorder.calls] == ["start", "log_epoch", "log_epoch", "fail"]
    assert recorder.calls[-1][1] is error
    run, client = mlflow_run(tmp_path, monkeypatch)
    assert run.info.status == status  # not RUNNING for ever
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/age/loss")] == [1, 2]
    assert set(scalars(tmp_path / "run" / "tensorboard")["age/train/loss"]) == {1, 2}  # flushed by fail


def test_a_logger_whose_fail_raises_does_not_hide_the_error(tmp_path):
    class Broken(Recorder):
        def fail(self, error):
            raise OSError("tracker unreachable")

    class Plain:  # a logger object without fail: it is optional
        start = log_epoch = finish = staticmethod(lambda *args: None)

    with pytest.warns(UserWarning, match="Broken.fail raised OSError"), pytest.raises(RuntimeError, match="boom"):
        mh.fit(make_net(), make_table(200), epochs=2, callbacks=[crash_at(1, RuntimeError("boom"))],
               loggers=[Broken(), Plain()], **FAST)  # fmt: skip


def test_the_mlflow_store_is_the_variable_else_the_runs_own_else_mlruns_here(tmp_path, monkeypatch):
    from manyheads.loggers.mlflow import tracking_uri

    clean_mlflow_setting(monkeypatch, tmp_path)
    assert tracking_uri() == (tmp_path / "mlruns").as_uri()
    assert tracking_uri({"tracking_uri": "file:///elsewhere/mlruns"}) == "file:///elsewhere/mlruns"  # a resume
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri({"tracking_uri": "file:///elsewhere/mlruns"}) == "http://127.0.0.1:5000"


def test_only_rank_0_logs():
    assert loggers.create(["tensorboard", Recorder()], main=False).loggers == []
    assert [type(x) for x in loggers.create(["tensorboard", Recorder()]).loggers] == [loggers.TensorBoard, Recorder]


@pytest.mark.parametrize("name", ["tensorboard", "mlflow"])
def test_a_missing_package_is_named_with_its_extra_before_any_work(name, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` now fails as if it were not installed

    def no_work(*args, **kwargs):
        raise AssertionError("the data stage ran")

    monkeypatch.setattr(encoding, "prepare", no_work)
    with pytest.raises(OptionError, match=rf"'loggers' parameter of fit .*pip install \"manyheads\[{name}\]\""):
        mh.fit(make_net(), make_table(50), epochs=1, loggers=[name], progress=False)


def test_unknown_logger_names_and_objects_are_refused():
    with pytest.raises(OptionError, match=r"one of \['mlflow', 'tensorboard'\].*got 'tensorbord'"):
        mh.fit(make_net(), make_table(50), loggers=["tensorbord"], progress=False)
    with pytest.raises(OptionError, match=r"an object with start, log_epoch and finish.*got 3"):
        mh.fit(make_net(), make_table(50), loggers=[3], progress=False)


def test_yaml_train_log_takes_registered_names(tmp_path, monkeypatch):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"heads": HEADS, "train": {"log": ["tensorboard"]}}))
    assert load_config(path).fit_kwargs()["loggers"] == ["tensorboard"]
    assert load_config(path, ["train.log=[tensorboard, mlflow]"]).fit_kwargs()["loggers"] == ["tensorboard", "mlflow"]
    with pytest.raises(ConfigError, match=r"train.log.*one of \['mlflow', 'tensorboard'\]; got 'wandb'"):
        load_config(path, ["train.log=[wandb]"])
    monkeypatch.setitem(loggers.REGISTRY, "wandb", Recorder)  # the names come from the registry
    assert load_config(path, ["train.log=[wandb]"]).train.log == ["wandb"]


def test_a_config_run_gives_its_trackers_the_test_report_written_after_fit(tmp_path, monkeypatch):
    import mlflow

    from manyheads import runs
    from manyheads.config import parse_config

    clean_mlflow_setting(monkeypatch, tmp_path)
    cfg = parse_config({"data": {"source": "shapes", "limit": 120, "inputs": "image"},
                        "model": {"backbone": "resnet18", "image_size": 24}, "heads": {"size": {"kind": "regression"}},
                        "train": {"epochs": 1, "log": ["mlflow", "tensorboard"]}})  # fmt: skip
    runs.train(cfg, tmp_path / "run", progress=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    run = mlflow.search_runs(experiment_names=["manyheads"], output_format="list")[0]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"report.md", "metrics.json", "size_errors.png", "model.safetensors"} <= artifacts
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "figures/size_errors" in events.Tags()["images"]
