"""Tests for manyheads.cli: train, evaluate and predict end to end; the demo; wiring of the other commands."""

import contextlib
import importlib
import io
import json
import shutil
import socket
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
from manyheads import runs
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


def test_predict_takes_folders_of_images(trained, capsys, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    sources = sorted(trained["data"].iterdir())[:4]
    for i, source in enumerate(sources):  # names out of order, an upper-case suffix, and a file that is not an image
        shutil.copy(source, folder / f"{'dcba'[i]}.{'JPG' if i == 0 else 'jpg'}")
    (folder / "notes.txt").write_text("not a picture")
    (folder / "sub").mkdir()
    single = sources[0]
    code, out, err = run_cli(capsys, "predict", trained["run"], folder, single, "--json")
    assert code == 0, err
    results = json.loads(out)
    expected = [str(folder / name) for name in ("a.jpg", "b.jpg", "c.jpg", "d.JPG")] + [str(single)]
    assert [r["image"] for r in results] == expected
    code, out, err = run_cli(capsys, "predict", trained["run"], *expected, "--json")
    assert code == 0 and json.loads(out) == results  # the folder answers as its files named one by one
    assert results[3]["predictions"] == results[4]["predictions"]  # d.JPG is a copy of the single file
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no pictures here")
    code, out, err = run_cli(capsys, "predict", trained["run"], empty)
    assert code == 2 and f"{empty} is a folder with no images in it" in err and err.count("\n") == 1
    code, out, err = run_cli(capsys, "predict", trained["run"], folder / "notes.txt")
    assert code == 2 and "notes.txt: not an image" in err and err.count("\n") == 1


def files_of(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir() if p.is_file()}


def test_train_refuses_to_replace_a_run_unless_asked(trained, capsys, tmp_path):
    run, config = trained["run"], trained["run"] / "config.yaml"
    before = files_of(run)
    half = tmp_path / "interrupted"
    half.mkdir()
    (half / "checkpoint.pt").write_bytes(b"a checkpoint")
    for out in (run, half):
        code, _, err = run_cli(capsys, "train", config, "--out", out, "--quiet")
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert f"{out} already holds a run" in err
        assert "--resume" in err and "a new --out" in err and "--overwrite" in err
    assert files_of(run) == before and (half / "checkpoint.pt").read_bytes() == b"a checkpoint"
    code, _, err = run_cli(capsys, "train", config, "--out", run, "--resume", "--overwrite")
    assert code == 2 and "pass one of them" in err and files_of(run) == before

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "notes.txt").write_text("mine")
    old = files_of(copy)
    code, out, err = run_cli(capsys, "train", config, "--out", copy, "--quiet", "--overwrite", "train.seed=2")
    assert code == 0, err
    new = files_of(copy)
    assert new["notes.txt"] == old["notes.txt"]  # the folder is not wiped: only the run's files are replaced
    for name in ("model.safetensors", "config.yaml", "history.csv", "report.md", "checkpoint.pt"):
        assert new[name][0] != old[name][0], name
    assert yaml.safe_load((copy / "config.yaml").read_text())["train"]["seed"] == 2


def test_overwrite_drops_the_old_checkpoint_so_a_killed_new_run_cannot_resume_the_old_one(
    trained, capsys, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # before the new run's first checkpoint

    monkeypatch.setattr(runs, "train", killed)
    code, _, _ = run_cli(capsys, "train", run / "config.yaml", "--out", run, "--overwrite", "--quiet")
    assert code == 130 and not (run / "checkpoint.pt").exists() and (run / "model.safetensors").is_file()
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "train", run / "config.yaml", "--out", run, "--resume", "--quiet")
    assert code == 2 and "no checkpoint.pt to resume from" in err


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
    assert calls.pop() == (trained["run"] / "model.safetensors", {"host": "127.0.0.1", "port": 9001, "docs": False})
    onnx = tmp_path / "m.onnx"
    code, out, err = run_cli(capsys, "serve", onnx, "--host", "0.0.0.0", "--max-pixels", "1000000", "--docs")
    assert calls.pop() == (onnx, {"host": "0.0.0.0", "port": 8000, "docs": True, "max_pixels": 1_000_000})


def test_serve_refuses_a_bad_or_busy_port_in_one_line(trained, capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        for port, words in (
            ("99999", "port 99999 is not a port number: give one from 1 to 65535"),
            ("0", "from 1 to 65535"),
            (str(busy.getsockname()[1]), f"port {busy.getsockname()[1]} on 127.0.0.1 is in use"),
        ):
            code, out, err = run_cli(capsys, "serve", trained["run"], "--port", port)
            assert code == 2 and err.startswith("manyheads: error: ") and words in err, err
            assert err.count("\n") == 1 and "Traceback" not in err
    finally:
        busy.close()
    code, out, err = run_cli(capsys, "serve", trained["run"], "--max-pixels", "0")
    assert code == 2 and "max_pixels must be a positive integer" in err


def test_compare_is_wired(trained, capsys, monkeypatch, tmp_path):
    seen = {}

    def fake_compare(net_factory, train, *, test, heads, **options):
        seen.update(net_factory=net_factory, train=train, test=test, heads=heads, options=options)
        return pd.DataFrame({"head": ["age"], "metric": ["mae"], "strategy": ["constant"], "seed": [0],
                             "joint": [1.0], "single": [2.0], "difference": [1.0]})  # fmt: skip

    module = importlib.import_module("manyheads.compare")  # mh.compare is the function, not the module
    monkeypatch.setattr(module, "compare", fake_compare)
    reports = importlib.import_module("manyheads.reports")  # where _compare takes them from
    monkeypatch.setattr(reports, "write_comparison", lambda table, out: seen.update(out=out))
    monkeypatch.setattr(reports, "summarize", lambda table: table)
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


# ---- manyheads shard, and training on the shards -------------------------------------------------------


def test_shard_splits_a_config_into_shards_that_a_webdataset_config_trains_and_reports_on(tmp_path, capsys):
    pytest.importorskip("webdataset")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "data": {"source": "utkface", "path": str(faces(tmp_path / "faces"))}}))
    code, out, err = run_cli(capsys, "shard", config, "--out", tmp_path / "shards", "--split", "--shard-size", "8",
                             "--quiet")  # fmt: skip
    assert code == 0, err
    assert "wrote 5 shards (000000.tar .. 000004.tar), 36 samples" in out  # 48 rows: 36 train, 5 validation, 7 test
    assert f'path: "{tmp_path}/shards/train/{{000000..000004}}.tar"' in out
    assert f'test: "{tmp_path}/shards/test/000000.tar"' in out and "steps_per_epoch: 2" in out
    assert (tmp_path / "shards" / "train" / "labels.jsonl").read_text().count("\n") == 36
    code, _, err = run_cli(capsys, "shard", config, "--out", tmp_path / "shards", "--split")
    assert code == 2 and "already holds shards (000000.tar" in err and "nothing was written" in err

    stream = {**TINY, "data": {"source": "webdataset", "path": f"{tmp_path}/shards/train/{{000000..000004}}.tar",
                               "validation": f"{tmp_path}/shards/validation/000000.tar",
                               "test": f"{tmp_path}/shards/test/000000.tar"},
              "train": {**TINY["train"], "steps_per_epoch": 2, "workers": 0}}  # fmt: skip
    stream.pop("split")
    (tmp_path / "stream.yaml").write_text(yaml.safe_dump(stream))
    code, out, err = run_cli(capsys, "train", tmp_path / "stream.yaml", "--out", tmp_path / "run", "--quiet")
    assert code == 0, err
    assert "test split (7 rows, never trained on)" in out
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert history["train/race/labels"].tolist() == [2 * 16] and history["val/race/labels"].tolist() == [5]
    assert json.loads((tmp_path / "run" / "split.json").read_text())["test_rows"] == 7
    code, out, err = run_cli(capsys, "evaluate", tmp_path / "run")  # the run's test rows: data.test
    assert code == 0 and "7 rows:" in out, err


def test_shard_names_a_bad_file_and_what_is_missing(tmp_path, capsys):
    pytest.importorskip("webdataset")
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(folder / f"{i}.jpg")
    (folder / "2.jpg").write_bytes((folder / "2.jpg").read_bytes()[:100])  # cut short
    pd.DataFrame({"image": ["0.jpg", "1.jpg", "2.jpg"], "age": [1, None, 3]}).to_csv(folder / "labels.csv", index=False)
    code, _, err = run_cli(capsys, "shard", folder / "labels.csv", "--out", tmp_path / "out")
    assert code == 2 and f"row 2 ({folder / '2.jpg'}): truncated JPEG" in err and "--on-bad skip" in err
    assert not list((tmp_path / "out").glob("*.tar"))  # nothing half-written is left
    code, out, err = run_cli(capsys, "shard", folder / "labels.csv", "--out", tmp_path / "out", "--on-bad", "skip")
    assert code == 0 and "2 samples" in out and "skipped 1 bad rows, e.g. row 2" in out, err
    code, _, err = run_cli(capsys, "shard", folder / "nope.csv", "--out", tmp_path / "x")
    assert code == 2 and "nope.csv not found" in err
    code, _, err = run_cli(capsys, "shard", folder, "--out", tmp_path / "x")
    assert code == 2 and "name what it is with --source" in err
