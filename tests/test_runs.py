"""Tests for manyheads.runs: data loading, the seeded split, the demo config, offline weights, rank 0."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from manyheads import runs
from manyheads.config import SplitConfig, load_config, parse_config

EXAMPLES = Path(__file__).parents[1] / "examples"
WEIGHTS = Path(__file__).parents[2] / "shared/weights/mobilenet_v2-b0353104.pth"


def test_split_is_seeded_disjoint_and_complete():
    split = runs.Split.of(100, SplitConfig(test=0.15, validation=0.1, seed=3))
    parts = [split.train, split.validation, split.test]
    assert [len(p) for p in parts] == [75, 10, 15]
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    again = runs.Split.of(100, SplitConfig(test=0.15, validation=0.1, seed=3))
    assert again.test.tolist() == split.test.tolist()
    other = runs.Split.of(100, SplitConfig(test=0.15, validation=0.1, seed=4))
    assert other.test.tolist() != split.test.tolist()
    none = runs.Split.of(10, SplitConfig(test=0.2, validation=0.0))
    assert len(none.validation) == 0 and none.parts(pd.DataFrame({"a": range(10)}))[1] is None
    with pytest.raises(ValueError, match="leave none to train on"):
        runs.Split.of(2, SplitConfig(test=0.3, validation=0.3))


def test_demo_matches_the_example_file():
    assert load_config(EXAMPLES / "shapes.yaml") == runs.DEMO


def test_load_table_sources(tmp_path):
    shapes = runs.load_table(parse_config({"data": {"limit": 20}, "heads": {"shape": {"kind": "binary"}}}))
    assert len(shapes) == 20 and shapes["image"][0].shape[:2] == (128, 128)
    (tmp_path / "labels.csv").write_text("file,score\n" + "".join(f"p{i}.png,{i}\n" for i in range(10)))
    cfg = parse_config(
        {
            "data": {"source": "csv", "path": str(tmp_path / "labels.csv"), "image_column": "file", "limit": 4},
            "heads": {"score": {"kind": "regression"}},
        }
    )
    table = runs.load_table(cfg)
    assert table["score"].tolist() == [0, 3, 6, 9]  # evenly spaced rows
    assert table["image"][0] == str(tmp_path / "p0.png")
    missing = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(tmp_path / "nope.csv")})})
    assert runs.missing_data(missing.data) == tmp_path / "nope.csv" and runs.missing_data(cfg.data) is None
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        runs.load_table(missing)


def test_pretrained_weights_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cfg = parse_config({"heads": {"a": {"kind": "binary"}}, "model": {"backbone": "mobilenet_v2", "pretrained": True}})
    with pytest.raises(ValueError, match=r"put .*mobilenet_v2-b0353104.pth.* into .*hub/checkpoints to work offline"):
        runs.check_offline(cfg.model)
    runs.check_offline(cfg.model.model_copy(update={"pretrained": False}))
    if WEIGHTS.is_file():
        (tmp_path / "hub/checkpoints").mkdir(parents=True)
        (tmp_path / "hub/checkpoints" / WEIGHTS.name).symlink_to(WEIGHTS)
        runs.check_offline(cfg.model)


def test_only_rank_0_writes(tmp_path, monkeypatch):
    calls = []

    def fake_fit(net, train, **options):
        calls.append(options["run_dir"])
        return type("Result", (), {"net": net})()

    monkeypatch.setattr("manyheads.training.fit", fake_fit)
    monkeypatch.setenv("RANK", "1")
    result, report = runs.train(runs.DEMO, tmp_path / "run", progress=False)
    assert calls == [tmp_path / "run"] and report is None  # trains, but writes and reports nothing
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_changed_test_split(tmp_path, monkeypatch):
    monkeypatch.setattr("manyheads.training.fit", lambda net, train, **options: type("R", (), {"net": net})())
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    (run / "split.json").write_text(json.dumps({"test_rows": [0, 1, 2]}))
    with pytest.raises(ValueError, match="test split would leak into training"):
        runs.train(runs.DEMO, run, resume=True, progress=False)
    with pytest.raises(ValueError, match="no checkpoint.pt to resume from"):
        runs.train(runs.DEMO, tmp_path / "fresh", resume=True, progress=False)


def test_a_config_starts_from_the_same_weights_whatever_ran_before(tmp_path, monkeypatch):
    initial = []

    def fake_fit(net, train, **options):
        initial.append({k: v.clone() for k, v in net.state_dict().items()})
        return type("Result", (), {"net": net})()

    monkeypatch.setattr("manyheads.training.fit", fake_fit)
    monkeypatch.setenv("RANK", "1")  # rank 1 trains but writes no files
    for before in (1, 2):
        torch.manual_seed(before)  # whatever the caller's random state, the run's seed decides
        runs.train(runs.DEMO, tmp_path / "run", progress=False)
    first, second = initial
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any("head_layers" in k for k in first)  # the head layers, built before fit seeds, are compared too


def test_resume_refuses_a_changed_config_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr("manyheads.training.fit", lambda net, train, **options: type("R", (), {"net": net})())
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    (run / "config.yaml").write_text(runs.DEMO.resolved().to_yaml())
    before = (run / "config.yaml").read_text()
    changed = runs.DEMO.model_copy(update={"model": runs.DEMO.model.model_copy(update={"image_size": 48})})
    with pytest.raises(ValueError, match=rf"the run in {run} was trained with model.image_size=24; this call has "):
        runs.train(changed, run, resume=True, progress=False)
    assert (run / "config.yaml").read_text() == before and sorted(p.name for p in run.iterdir()) == [
        "checkpoint.pt", "config.yaml"
    ]  # fmt: skip
