"""Tests for manyheads.cli: train, evaluate and predict end to end; the demo; wiring of the other commands."""

import contextlib
import importlib
import io
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import manyheads as mh
from manyheads.cli import main

REAL_UTKFACE = Path(__file__).parents[2] / "shared/data/utkface"
REPORT_FILES = [
    "model.safetensors", "history.csv", "learning_curves.png", "summary.json", "config.yaml", "split.json",
    "report.md", "metrics.json", "age_errors.png", "gender_confusion.png", "race_confusion.png",
    "fairness_by_gender.png", "fairness_by_race.png",
]  # fmt: skip
TINY = {
    "data": {"source": "utkface"},
    "heads": {
        "age": {"kind": "regression", "loss": "mae"},
        "gender": {"kind": "binary", "labels": ["male", "female"]},
        "race": {"kind": "categorical", "labels": mh.datasets.UTKFACE_RACES},
    },
    "model": {"backbone": "mobilenet_v3_small", "pretrained": False, "image_size": 64},
    "train": {"epochs": 1, "batch_size": 16, "augment": False},
    "split": {"test": 0.15, "validation": 0.1, "seed": 0},
}


def faces(folder: Path, n: int = 48) -> Path:
    """``n`` UTKFace images in ``folder``: links to real ones when present, else generated ones."""
    folder.mkdir()
    if REAL_UTKFACE.is_dir():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a few real file names are malformed
            table = mh.datasets.utkface(REAL_UTKFACE, limit=n)
        for path in table["image"]:
            (folder / Path(path).name).symlink_to(path)
    else:
        rng = np.random.default_rng(0)
        for i, image in enumerate(mh.datasets.shapes(n, size=64)["image"]):
            Image.fromarray(image).save(folder / f"{rng.integers(1, 90)}_{i % 2}_{i % 5}_2017{i:06d}.jpg")
    return folder


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training run through the command line, shared by the tests that read it."""
    root = tmp_path_factory.mktemp("cli")
    data = faces(root / "faces")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "data": {"source": "utkface", "path": str(data)}}))
    out, err = io.StringIO(), io.StringIO()  # capsys is per test: capture by hand
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", str(config), "--out", str(root / "run"), "--quiet", "train.seed=1"])
    return {"code": code, "out": out.getvalue(), "err": err.getvalue(), "run": root / "run", "data": data}


def test_train_writes_the_run_folder_and_prints_where(trained):
    assert trained["code"] == 0, trained["err"]
    run = trained["run"]
    assert [name for name in REPORT_FILES if not (run / name).is_file()] == []
    assert f"run folder: {run}" in trained["out"]
    assert "test split (7 rows, never trained on): age mae" in trained["out"]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["seed"] == 1  # the override is in the resolved config
    assert config["data"]["path"] == str(trained["data"])
    split = json.loads((run / "split.json").read_text())
    assert len(split["test_images"]) == 7 and split["rows"] == 48
    history = pd.read_csv(run / "history.csv")
    assert len(history) == 1 and "val/age/mae" in history
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["rows"] == 7 and set(metrics["heads"]) == {"age", "gender", "race"}
    assert "## Fairness" in (run / "report.md").read_text()


def test_evaluate_rewrites_the_report_on_the_test_split(trained, capsys):
    run = trained["run"]
    before = json.loads((run / "metrics.json").read_text())
    (run / "report.md").unlink()
    code, out, err = run_cli(capsys, "evaluate", run)
    assert code == 0, err
    assert (run / "report.md").is_file() and f"report: {run / 'report.md'}" in out
    after = json.loads((run / "metrics.json").read_text())
    assert after["heads"]["age"]["metrics"]["mae"] == pytest.approx(before["heads"]["age"]["metrics"]["mae"], 1e-4)
    code, out, err = run_cli(capsys, "evaluate", run, "--data", trained["data"], "--out", run.parent / "all")
    assert code == 0, err
    assert json.loads((run.parent / "all" / "metrics.json").read_text())["rows"] == 48


def test_evaluate_with_flip_tta_writes_its_own_report_and_leaves_the_runs_alone(trained, capsys):
    run = trained["run"]
    before = (run / "metrics.json").read_text()
    code, out, err = run_cli(capsys, "evaluate", run, "--tta", "flip")
    assert code == 0, err
    report = run / "eval-tta-flip"
    assert f"report: {report / 'report.md'}" in out and "(tta: flip)" in (report / "report.md").read_text()
    assert (run / "metrics.json").read_text() == before
    assert json.loads((report / "metrics.json").read_text())["rows"] == json.loads(before)["rows"]
    code, out, err = run_cli(capsys, "evaluate", run, "--tta", "none")  # the model's own setting: the run's folder
    assert code == 0 and f"report: {run / 'report.md'}" in out


def test_evaluate_notices_missing_test_images(trained, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    data = tmp_path / "faces"
    shutil.copytree(trained["data"], data, symlinks=True)
    (data / json.loads((run / "split.json").read_text())["test_images"][0]).unlink()
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["path"] = str(data)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    code, out, err = run_cli(capsys, "evaluate", run)
    assert code == 2 and "1 of the run's 7 test images are gone" in err


def test_predict_prints_every_head_for_every_image(trained, capsys):
    images = sorted(trained["data"].iterdir())[:3]
    code, out, err = run_cli(capsys, "predict", trained["run"], *images, "--json")
    assert code == 0, err
    results = json.loads(out)
    assert [r["image"] for r in results] == [str(p) for p in images]
    for result in results:
        assert set(result["predictions"]) == {"age", "gender", "race"}
        assert isinstance(result["predictions"]["age"], float)
        assert result["predictions"]["race"] in mh.datasets.UTKFACE_RACES
        assert sum(result["probabilities"]["race"].values()) == pytest.approx(1, abs=1e-4)
        assert set(result["probabilities"]["gender"]) == {"male", "female"}
    code, out, err = run_cli(capsys, "predict", trained["run"], images[0])
    assert code == 0 and out.startswith(str(images[0])) and "  race" in out and "  age" in out


def test_demo_when_the_data_is_missing(tmp_path, capsys, monkeypatch):
    config = tmp_path / "faces.yaml"
    config.write_text(yaml.safe_dump({**TINY, "data": {"source": "utkface", "path": str(tmp_path / "absent")}}))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "train", config, "--quiet")
    assert code == 0, err
    assert out.startswith(f"note: {tmp_path / 'absent'} not found") and "generated shapes" in out
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("shapes-demo-")
    assert list(yaml.safe_load((run / "config.yaml").read_text())["heads"]) == ["size", "filled", "shape"]
    assert (run / "report.md").is_file() and (run / "size_errors.png").is_file()
    assert "size mae" in out


def test_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    bad = {
        **TINY,
        "data": {"source": "utkface", "path": "faces"},
        "heads": {"age": {"kind": "regression", "loss": "maee"}},
    }
    config.write_text(yaml.safe_dump(bad))
    for args, words in [
        (["train", config], f"error: {config}: heads.age.loss: unknown loss 'maee'"),
        (["train", tmp_path / "none.yaml"], "config file not found"),
        (["train", config, "--resume"], f"{config}"),
        (["evaluate", tmp_path], "no model at"),
        (["predict", tmp_path, "x.jpg"], "no model at"),
    ]:
        code, out, err = run_cli(capsys, *args)
        assert code == 2 and err.startswith("manyheads: error: ") and words in err
        assert err.count("\n") == 1 and "Traceback" not in err
    config.write_text(yaml.safe_dump(TINY | {"data": {"source": "shapes"}}))
    code, out, err = run_cli(capsys, "train", config, "--resume")
    assert code == 2 and "--resume needs --out" in err


def test_python_dash_m_runs_the_cli(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("heads: {age: {kind: regresion}}\n")
    done = subprocess.run([sys.executable, "-m", "manyheads", "train", str(config)], capture_output=True, text=True)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"manyheads: error: {config}: heads.age.kind: ") and "'regresion'" in line


def test_export_and_serve_are_wired(trained, capsys, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("manyheads.export.export_onnx", lambda net, path: calls.append((net, path)) or Path(path))
    monkeypatch.setattr("manyheads.serving.serve", lambda model, **kw: calls.append((model, kw)))
    code, out, err = run_cli(capsys, "export", trained["run"], "--onnx", tmp_path / "m.onnx")
    assert code == 0, err
    net, path = calls.pop()
    assert isinstance(net, mh.MultiHeadNet) and set(net.heads) == {"age", "gender", "race"}
    assert path == str(tmp_path / "m.onnx") and f"wrote {path}" in out
    code, out, err = run_cli(capsys, "serve", trained["run"], "--port", "9001")
    assert code == 0, err
    assert calls.pop() == (trained["run"] / "model.safetensors", {"host": "127.0.0.1", "port": 9001})
    onnx = tmp_path / "m.onnx"
    code, out, err = run_cli(capsys, "serve", onnx, "--host", "0.0.0.0")
    assert calls.pop() == (onnx, {"host": "0.0.0.0", "port": 8000})


def test_compare_is_wired(trained, capsys, monkeypatch, tmp_path):
    seen = {}

    def fake_compare(net_factory, train, *, test, heads, **options):
        seen.update(net_factory=net_factory, train=train, test=test, heads=heads, options=options)
        return pd.DataFrame({"head": ["age"], "metric": ["mae"], "strategy": ["constant"], "seed": [0],
                             "joint": [1.0], "single": [2.0], "difference": [1.0]})  # fmt: skip

    module = importlib.import_module("manyheads.compare")  # mh.compare is the function, not the module
    monkeypatch.setattr(module, "compare", fake_compare)
    monkeypatch.setattr(module, "write_comparison", lambda table, out: seen.update(out=out))
    monkeypatch.setattr(module, "summarize", lambda table: table)
    config = trained["run"] / "config.yaml"
    code, out, err = run_cli(capsys, "compare", config, "--out", tmp_path, "--strategies", "constant,dwa", "--quiet")
    assert code == 0, err
    assert set(seen["heads"]) == {"age", "gender", "race"} and seen["out"] == tmp_path
    test_images = {
        str(trained["data"] / name) for name in json.loads((trained["run"] / "split.json").read_text())["test_images"]
    }
    assert set(seen["test"]["image"]) == test_images and not test_images & set(seen["train"]["image"])
    options = seen["options"]
    assert options["strategies"] == ("constant", "dwa") and "weights" not in options and options["seeds"] == (1,)
    assert len(options["validation"]) == 5 and options["epochs"] == 1 and options["losses"] == {"age": "mae"}
    net = seen["net_factory"]({"age": mh.Regression()})
    assert net.backbone == "mobilenet_v3_small" and net.image_size == 64 and list(net.heads) == ["age"]
