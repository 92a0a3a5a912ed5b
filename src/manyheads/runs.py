"""Runs: a config's data loaded and split, trained into a run folder, and read back from it.

A run folder holds what :func:`manyheads.fit` writes (model.safetensors, history.csv,
learning_curves.png, summary.json, checkpoint.pt), the resolved ``config.yaml``, ``split.json``
(which rows are the held-out test split) and the evaluation report on that split (report.md,
metrics.json, plots). The test rows are chosen before training and never trained on.

    result, report = train(load_config("examples/utkface.yaml"), "runs/faces")
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from manyheads import datasets
from manyheads.config import DataConfig, ModelConfig, RunConfig, SplitConfig, load_config, parse_config

# The generated-shapes demo: small enough to train in seconds on a laptop CPU.
DEMO = parse_config(
    {
        "data": {"source": "shapes", "limit": 480},
        "heads": {
            "size": {"kind": "regression", "loss": "mae"},
            "filled": {"kind": "binary"},
            "shape": {"kind": "categorical", "labels": list(datasets.SHAPES)},
        },
        "model": {"backbone": "resnet18", "pretrained": False, "image_size": 24},
        "train": {"epochs": 4, "batch_size": 32, "lr": 1e-3, "augment": False, "seed": 0},
        "split": {"test": 0.15, "validation": 0.1, "seed": 0},
    },
    "the built-in shapes demo",
)


def is_main() -> bool:
    """Whether this process may write files and print (rank 0 under torchrun, or a single process)."""
    from manyheads.distributed import Cluster

    return Cluster.is_main_process()


def default_run_dir(name: str, root: str | os.PathLike = "runs") -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>``, made unique if that folder exists."""
    base = Path(root) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


def missing_data(data: DataConfig) -> Path | None:
    """The data path when it does not exist (None when it does, or for generated data); of shards, a missing one."""
    if data.source == "shapes" or data.path is None:
        return None
    if data.is_stream():
        from manyheads import shards

        missing = [url for url in shards.expand(data.path) if shards.is_local(url) and not Path(url).exists()]
        return Path(missing[0]) if missing else None
    path = Path(data.path).expanduser()
    return None if path.exists() else path


def load_table(cfg: RunConfig) -> Any:
    """The config's data as a DataFrame with an ``image`` column and one column per label (``manyheads.sources``);
    for a stream source (webdataset), the :class:`manyheads.streams.Stream` to train on."""
    from manyheads import sources

    return sources.load(cfg.data, image_size=cfg.model.image_size, seed=cfg.split.seed)


def load_rows(cfg: RunConfig) -> pd.DataFrame:
    """All of the config's data as a table, to evaluate on: a stream source's shards are read whole."""
    from manyheads import sources

    if cfg.data.is_stream():
        return sources.load_held_out(cfg.data.path, cfg.data, "data.path")
    return load_table(cfg)


@dataclass
class Split:
    """Row positions of the three parts of a table (sorted); validation and test may be empty."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    calibration: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @classmethod
    def of(cls, n: int, split: SplitConfig) -> Split:
        """Seeded random split of ``n`` rows by the config's test and validation fractions.

        The rows come from :func:`manyheads.encoding.seeded_parts` (the permutation ``fit``'s
        ``validation=<fraction>`` uses too): test first, then validation, the rest trains.
        """
        from manyheads import encoding

        n_test, n_val = encoding.held_out(n, split.test), encoding.held_out(n, split.validation)
        n_cal = encoding.held_out(n, split.calibration)
        if n - n_test - n_val - n_cal < 1:
            raise ValueError(f"{n} rows leave none to train on after a {split.test} test, {split.validation} "
                             f"validation and {split.calibration} calibration split; use more data or smaller "
                             f"fractions")  # fmt: skip
        # calibration rows come after the others: without them, every other part is the same as before
        test, validation, calibration, train = encoding.seeded_parts(n, [n_test, n_val, n_cal], split.seed)
        return cls(train, validation, test, calibration)

    def parts(self, df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
        """(train, validation or None, test or None) as DataFrames."""

        def take(rows: np.ndarray) -> pd.DataFrame | None:
            return df.iloc[rows].reset_index(drop=True) if len(rows) else None

        return take(self.train), take(self.validation), take(self.test)

    def calibration_part(self, df: pd.DataFrame) -> pd.DataFrame | None:
        """The calibration rows as a DataFrame, or None when the split keeps none."""
        return df.iloc[self.calibration].reset_index(drop=True) if len(self.calibration) else None


def _image_keys(cfg: RunConfig, paths: pd.Series) -> list[str]:
    """Image paths relative to the data's folder, so a moved data folder still names the same files."""
    data = cfg.data
    root = Path(data.path) if data.source == "utkface" else Path(data.images or Path(data.path).parent)
    return [os.path.relpath(p, root.expanduser().resolve()) for p in paths]


def _record(cfg: RunConfig, df: pd.DataFrame, split: Split) -> dict[str, Any]:
    record = {"rows": len(df), **cfg.split.model_dump(), "test_rows": split.test.tolist()}
    column = df[cfg.data.inputs]
    if len(split.test) and isinstance(column.iloc[0], str):  # files: name the test images themselves
        record["test_images"] = _image_keys(cfg, column.iloc[split.test])
    return record


def check_offline(model: ModelConfig) -> None:
    """Refuse pretrained weights that are not cached already: runs never download."""
    if not model.pretrained:
        return
    import torch
    import torchvision

    from manyheads import backbones

    if model.backbone.startswith("timm:") or model.backbone not in torchvision.models.list_models(torchvision.models):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm then reads the Hugging Face cache only
        return

    weights = backbones._torchvision_weights(model.backbone, model.pretrained)
    if not backbones._cached(weights):
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        accepted = [weights] if isinstance(model.pretrained, str) else list(type(weights))
        files = " or ".join(os.path.basename(w.url) for w in accepted)
        raise ValueError(
            f"could not load pretrained weights for {model.backbone} (not in the cache; runs never download); "
            f"put {files} into {folder} to work offline, or set model.pretrained=false"
        )


@dataclass
class Parts:
    """A run's data as ``fit`` and the report take it: training data, validation, test and calibration rows,
    what ``split.json`` records, and what the test report says of its rows."""

    train: Any
    validation: pd.DataFrame | None
    test: pd.DataFrame | None
    calibration: pd.DataFrame | None
    record: dict[str, Any]
    note: str


def parts(cfg: RunConfig) -> Parts:
    """The config's data in its parts: a table split by ``split`` (test rows first), or a stream and the
    held-out tables ``data.validation`` and ``data.test`` (a stream is never split)."""
    if cfg.data.is_stream():
        return _stream_parts(cfg)
    df = load_table(cfg)
    split = Split.of(len(df), cfg.split)
    train_df, val_df, test_df = split.parts(df)
    calibration = split.calibration_part(df) if cfg.calibration_rows() == "calibration" else None
    where = (
        "generated shapes" if cfg.data.source == "shapes" else f"{cfg.data.source} data at {cfg.resolved().data.path}"
    )
    note = (f"Test split: {len(test_df) if test_df is not None else 0} of {len(df)} rows ({cfg.split.test:.0%}) of "
            f"{where}, split seed {cfg.split.seed}; held out before training, never trained on.")  # fmt: skip
    return Parts(train_df, val_df, test_df, calibration, _record(cfg, df, split), note)


def _stream_parts(cfg: RunConfig) -> Parts:
    from manyheads import sources

    data = cfg.resolved().data
    held = {key: sources.load_held_out(path, data, f"data.{key}") if (path := getattr(data, key)) else None
            for key in ("validation", "test")}  # fmt: skip
    test = held["test"]
    record = {"stream": data.path, "validation": data.validation, "test": data.test,
              "test_rows": 0 if test is None else len(test)}  # fmt: skip
    note = (f"Test rows: the {record['test_rows']} rows of {data.test}, held out from the training stream "
            f"{data.path}; never trained on.")  # fmt: skip
    return Parts(load_table(cfg), held["validation"], test, None, record, note)


def train(cfg: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True):
    """Split, train into ``out_dir`` and report on the test split; returns (TrainResult, report or None).

    Under torchrun every process trains; only rank 0 writes files and gets a report.

    ``resume=True`` continues the run from its checkpoint; the config must be the run's own
    ``config.yaml`` but for the safe changes (:func:`manyheads.validation.config_changes`: more
    epochs under schedule None or "constant", device, workers, cache_dir, checkpoint_every, a
    moved data folder). Any other change is refused before anything is written.
    """
    from manyheads import checkpoint
    from manyheads.reports import evaluate_report
    from manyheads.training import fit
    from manyheads.validation import check_config_resume

    out = Path(out_dir)
    if resume and not (out / checkpoint.NAME).is_file():
        raise ValueError(f"{out}: no {checkpoint.NAME} to resume from (train without --resume first)")
    if resume and (out / "config.yaml").is_file():  # before anything is written: the run's own config decides
        check_config_resume(load_config(out / "config.yaml"), cfg.resolved(), out)
    check_offline(cfg.model)
    data = parts(cfg)
    record = data.record
    if resume and (out / "split.json").is_file():
        before = json.loads((out / "split.json").read_text())
        if before.get("test_images", before["test_rows"]) != record.get("test_images", record["test_rows"]):
            raise ValueError(f"{out}: the data or split settings changed since this run started; its test split "
                             f"would leak into training. Resume with the run's own config.yaml")  # fmt: skip
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.resolved().to_yaml())
        (out / "split.json").write_text(json.dumps(record, indent=1))
    if cfg.train.seed is not None:
        torch.manual_seed(cfg.train.seed)  # the head layers' initial weights too: a config reruns the same
    options = cfg.fit_kwargs()
    if cfg.calibration_rows() == "calibration":
        options["calibration"] = data.calibration
    result = fit(
        cfg.build_net(), data.train, validation=data.validation, run_dir=out, resume=out if resume else None,
        progress=progress, **options,
    )  # fmt: skip
    if not is_main() or data.test is None:
        return result, None
    written = time.time()
    report = evaluate_report(result.net, data.test, out, inputs=cfg.data.inputs, title="Test report", note=data.note)
    from manyheads import loggers

    loggers.add_files(cfg.train.log, out, [p for p in out.rglob("*") if p.is_file() and p.stat().st_mtime >= written])
    return result, report


def model_file(run: str | os.PathLike) -> Path:
    """The model of a run folder (or a .safetensors file itself)."""
    path = Path(run)
    model = path / "model.safetensors" if path.is_dir() else path
    if not model.is_file():
        raise FileNotFoundError(f"no model at {model}: give a run folder made by `manyheads train` or a .safetensors")
    return model


def load_test_split(run: str | os.PathLike) -> tuple[RunConfig, pd.DataFrame]:
    """A run's config and its test rows, reloaded from the data the run recorded."""
    run = Path(run)
    for name in ("config.yaml", "split.json"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run / name} not found: is {run} a run folder made by `manyheads train`?")
    cfg = load_config(run / "config.yaml")
    record = json.loads((run / "split.json").read_text())
    if "stream" in record:  # trained on a stream: its test rows are data.test
        if not cfg.data.test:
            raise ValueError(f"{run} has no test rows (data.test was not set); evaluate with --data PATH")
        from manyheads import sources

        return cfg, sources.load_held_out(cfg.data.test, cfg.data, "data.test")
    df = load_table(cfg)
    if "test_images" in record:  # select by file, so images added to the folder since do not matter
        wanted = record["test_images"]
        test = df[np.isin(_image_keys(cfg, df[cfg.data.inputs]), wanted)].reset_index(drop=True)
        if len(test) != len(wanted):
            raise ValueError(f"{len(wanted) - len(test)} of the run's {len(wanted)} test images are gone from "
                             f"{cfg.data.path}; evaluate on another set with --data PATH")  # fmt: skip
    else:
        if len(df) != record["rows"]:
            raise ValueError(f"the regenerated data has {len(df)} rows, the run had {record['rows']}")
        test = df.iloc[record["test_rows"]].reset_index(drop=True)
    if test.empty:
        raise ValueError(f"{run} has no test split (split.test was 0); evaluate with --data PATH")
    return cfg, test
