"""compare: joint vs single-head models on one held-out split, and the written report."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import manyheads as mh
from manyheads.encoding import split
from manyheads.reports import summarize

FIT = dict(epochs=2, batch_size=32, lr=1e-2, progress=False, augment=False)
HEADS = {"size": mh.Regression(), "flag": mh.Binary(), "kind": mh.Categorical(["a", "b", "c"])}


def _table(n: int = 160) -> dict:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5)).astype("float32")
    size = (3 * x[:, 0] + x[:, 1]).tolist()
    size[::7] = [None] * len(size[::7])  # partial labels: every 7th row has no size
    return {
        "x": list(x),
        "size": size,
        "flag": (x[:, 2] > 0).astype(int).tolist(),
        "kind": [["a", "b", "c"][i] for i in np.digitize(x[:, 3], [-0.5, 0.5])],
    }


def _factory(heads):
    return mh.MultiHeadNet(nn.Sequential(nn.Linear(5, 12), nn.ReLU()), heads)


def _trunk_params() -> int:
    return 5 * 12 + 12


def test_compare_one_row_per_head_with_joint_single_and_costs(capsys):
    table = mh.compare(_factory, _table(), heads=HEADS, test_fraction=0.25, **FIT)
    assert list(table["head"]) == list(HEADS)
    assert list(table["metric"]) == ["mae", "accuracy", "accuracy"]  # each kind's primary metric
    assert set(table["strategy"]) == {"constant"} and set(table["seed"]) == {0}
    assert table[["joint", "single"]].notna().all().all()
    lower = ~table["higher_is_better"]
    expected = np.where(lower, table["single"] - table["joint"], table["joint"] - table["single"])
    assert np.allclose(table["difference"], expected)  # positive = joint better
    _, held_out = split(_table(), 0.25, 0)  # compare holds out the same rows
    sizes = sum(v is not None for v in held_out["size"])
    assert table["test_labels"].tolist() == [sizes, 40, 40] and sizes < 40  # partial labels counted
    # One trunk and three head layers vs three trunks, one head layer each.
    head_layers = (12 + 1) + (12 + 1) + (12 * 3 + 3)
    assert (table["joint_params"] == _trunk_params() + head_layers).all()
    assert table["single_params"].tolist() == [_trunk_params() + 13, _trunk_params() + 13, _trunk_params() + 39]
    assert (table["singles_params"] == table["single_params"].sum()).all()
    assert (table["singles_params"] - table["joint_params"] == 2 * _trunk_params()).all()
    assert (table["joint_seconds"] > 0).all()
    assert table["singles_seconds"].iloc[0] == pytest.approx(table["single_seconds"].sum())
    printed = capsys.readouterr().out
    assert printed.count("compare [") == 2 * 4 and "[4/4]" in printed  # before and after each of 4 models


def test_compare_strategies_seeds_and_all_metrics():
    table = mh.compare(_factory, _table(), heads=HEADS, strategies=("dwa", {"flag": 3.0}),
                       seeds=(0, 1), all_metrics=True, verbose=False, **FIT)  # fmt: skip
    assert set(table["strategy"]) == {"dwa", "constant(flag=3)"}
    assert table.groupby(["strategy", "seed"]).size().eq(3 * 3).all()  # loss and two metrics per head
    assert {"mae", "rmse", "loss", "auroc", "macro_f1"} <= set(table["metric"])
    singles = table.groupby(["head", "metric", "seed"])["single"].nunique()
    assert (singles == 1).all()  # one single-head model per head and seed, whatever the strategy
    seeds = table[(table["strategy"] == "dwa") & (table["metric"] == "loss")].pivot(
        index="head", columns="seed", values="joint"
    )
    assert not np.allclose(seeds[0], seeds[1])  # seeds change the models
    summary = summarize(table)
    assert len(summary) == len(table) // 2 and (summary["seeds"] == 2).all()


def test_compare_accepts_a_net_and_leaves_it_untouched():
    torch.manual_seed(0)
    template = mh.MultiHeadNet(nn.Sequential(nn.Linear(5, 12), nn.ReLU()), {"size": mh.Regression()})
    before = {k: v.clone() for k, v in template.trunk.state_dict().items()}
    data = _table()
    table = mh.compare(template, data, heads=HEADS, verbose=False, **FIT)
    assert len(table) == 3
    assert all(torch.equal(before[k], v) for k, v in template.trunk.state_dict().items())
    by_name = mh.compare(template, {k: data[k] for k in ["x", "size"]}, verbose=False, **FIT)  # its own heads
    assert list(by_name["head"]) == ["size"] and (by_name["joint_params"] == by_name["singles_params"]).all()


def test_compare_uses_a_given_test_set_and_restricts_per_head_options():
    data = pd.DataFrame(_table())
    train, test = data.iloc[:120], data.iloc[120:]
    table = mh.compare(_factory, train, test=test, heads=HEADS, losses={"size": "mae"}, monitor="flag/accuracy",
                       validation=0.2, patience=1, verbose=False, **FIT)  # fmt: skip
    assert table["test_labels"].tolist() == [test["size"].notna().sum(), 40, 40]
    assert not table[["joint", "single"]].isna().any().any()


def test_compare_rejects_conflicting_options():
    with pytest.raises(ValueError, match="seeds="):
        mh.compare(_factory, _table(), heads=HEADS, seed=3, **FIT)
    with pytest.raises(ValueError, match="either weights= or strategies="):
        mh.compare(_factory, _table(), heads=HEADS, weights="dwa", strategies=("uncertainty",), **FIT)
    with pytest.raises(ValueError, match="heads="):
        mh.compare(_factory, _table(), **FIT)
    with pytest.raises(ValueError, match="must return a MultiHeadNet"):
        mh.compare(lambda heads: nn.Linear(5, 1), _table(), heads=HEADS, **FIT)


def test_write_comparison_files(tmp_path):
    table = mh.compare(_factory, _table(), heads=HEADS, strategies=("constant", "uncertainty"), verbose=False, **FIT)
    out = mh.write_comparison(table, tmp_path / "cmp")
    csv = pd.read_csv(out / "comparison.csv")
    assert len(csv) == len(table) and list(csv.columns) == list(table.columns)
    text = (out / "comparison.md").read_text()
    assert "difference > 0 means the joint model is better" in text
    assert text.count("| size | mae | constant |") == 2 and "| uncertainty |" in text  # summary + every run
    png = (out / "comparison.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 5000
    assert math.isfinite(csv["difference"].sum())


def test_single_head_models_keep_only_their_own_monitor_columns():
    from manyheads.compare import _for_head

    mix = {"age/mae": 0.1, "val/race/accuracy": -1}
    assert _for_head({"monitor": mix}, "age")["monitor"] == {"age/mae": 0.1}
    assert _for_head({"monitor": mix}, "gender")["monitor"] is None
    assert _for_head({"monitor": "race/accuracy"}, "race")["monitor"] == "race/accuracy"
    assert _for_head({"monitor": "race/accuracy"}, "age")["monitor"] is None


def test_single_head_models_keep_their_heads_hidden_layers():
    torch.manual_seed(0)
    template = mh.MultiHeadNet(nn.Sequential(nn.Linear(5, 12), nn.ReLU()), HEADS, hidden={"kind": 6})
    table = mh.compare(template, _table(), verbose=False, **FIT)
    kind = table.set_index("head").loc["kind"]
    assert kind["single_params"] == _trunk_params() + (12 * 6 + 6) + (6 * 3 + 3)  # trunk, hidden layer, output
    assert kind["joint_params"] == _trunk_params() + (12 * 6 + 6) + (6 * 3 + 3) + 2 * (12 + 1)
