"""Tests for manyheads.reports.evaluation: metrics, error ranges, confusion and fairness on known predictions."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import manyheads as mh
from manyheads.reports.evaluation import _interval, evaluate_report
from manyheads.reports.groups import bin_width as _bin_width

RACES = ["White", "Black", "Asian", "Indian", "Others"]


class Echo(nn.Module):
    """Outputs read straight off the input columns: x = [age, gender logit, 5 race logits]."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # a module with a device

    def forward(self, x):
        return {"age": x[:, 0], "gender": x[:, 1], "race": x[:, 2:7]}


def row(age_pred: float, gender_logit: float, race_pred: int) -> list[float]:
    logits = [0.0] * 5
    logits[race_pred] = 5.0
    return [age_pred, gender_logit, *logits]


@pytest.fixture
def net():
    heads = {"age": mh.Regression(), "gender": mh.Binary(["male", "female"]), "race": mh.Categorical(RACES)}
    return mh.MultiHeadNet(Echo(), heads, outputs_dict=True)


@pytest.fixture
def table():
    # true race White x3, Black x2, Asian x1 (no Indian, no Others); one row without an age label.
    return {
        "x": [
            row(12, 3, 0),  # White, true age 10: error 2; gender predicted female (true female)
            row(20, -3, 0),  # White, true age 25: error 5; predicted male (true female)
            row(30, -3, 1),  # White, true age 30: error 0; predicted male (true male); race wrong
            row(41, 3, 1),  # Black, true age 45: error 4; predicted female (true female)
            row(0, 3, 1),  # Black, age not labelled; predicted female (true male)
            row(75, -3, 2),  # Asian, true age 70: error 5; predicted male (true male)
        ],
        "age": [10, 25, 30, 45, None, 70],
        "gender": ["female", "female", "male", "female", "male", "male"],
        "race": ["White", "White", "White", "Black", "Black", "Asian"],
    }


def test_metrics_ranges_and_confusion_match_hand_counts(net, table, tmp_path):
    report = evaluate_report(net, table, tmp_path, inputs="x")
    assert report["rows"] == 6 and report["skipped"] == []
    age = report["heads"]["age"]
    assert age["labelled"] == 5 and age["primary"] == "mae"
    assert age["metrics"]["mae"] == pytest.approx((2 + 5 + 0 + 4 + 5) / 5)
    assert report["heads"]["gender"]["metrics"]["accuracy"] == pytest.approx(4 / 6)
    assert report["heads"]["race"]["metrics"]["accuracy"] == pytest.approx(5 / 6)
    ranges = {r["range"]: (r["rows"], r["mae"], r["bias"]) for r in report["by_range"]["age"]}
    assert ranges == {
        "10-19": (1, 2.0, 2.0),
        "20-29": (1, 5.0, -5.0),
        "30-39": (1, 0.0, 0.0),
        "40-49": (1, 4.0, -4.0),
        "70-79": (1, 5.0, 5.0),
    }
    # rows: true male, female; columns: predicted male, female
    assert report["confusion"]["gender"]["counts"] == [[2, 1], [1, 2]]
    race = np.array(report["confusion"]["race"]["counts"])
    assert race.shape == (5, 5) and race[0, 0] == 2 and race[0, 1] == 1 and race[1, 1] == 2 and race[2, 2] == 1
    assert race.sum() == 6


def test_fairness_has_one_row_per_group_with_counts_and_gaps(net, table, tmp_path):
    report = evaluate_report(net, table, tmp_path, inputs="x")
    by_race = report["fairness"]["race"]
    groups = {g["group"]: g for g in by_race["groups"]}
    assert list(groups) == RACES  # every label, in the head's order, even when absent
    assert [groups[r]["rows"] for r in RACES] == [3, 2, 1, 0, 0]
    assert groups["White"]["metrics"]["age"] == pytest.approx((2 + 5 + 0) / 3)
    assert groups["Black"]["metrics"]["age"] == pytest.approx(4.0)  # the unlabelled age is left out
    assert groups["Black"]["labelled"]["age"] == 1
    assert groups["White"]["metrics"]["gender"] == pytest.approx(2 / 3)
    assert groups["Black"]["metrics"]["gender"] == pytest.approx(1 / 2)
    assert groups["White"]["metrics"]["race"] == pytest.approx(2 / 3)
    assert groups["Indian"]["metrics"]["age"] is None and groups["Indian"]["rows"] == 0
    age_gap = by_race["gaps"]["age"]
    assert (age_gap["best"], age_gap["worst"]) == ("White", "Asian")  # MAE: lower is better
    assert age_gap["gap"] == pytest.approx(5 - 7 / 3)
    assert by_race["gaps"]["gender"]["best"] == "Asian" and by_race["gaps"]["gender"]["worst"] == "Black"
    by_gender = {g["group"]: g for g in report["fairness"]["gender"]["groups"]}
    assert (by_gender["male"]["rows"], by_gender["female"]["rows"]) == (3, 3)
    assert by_gender["male"]["metrics"]["age"] == pytest.approx((0 + 5) / 2)


def test_files_are_written_and_readable(net, table, tmp_path):
    report = evaluate_report(net, table, tmp_path, inputs="x", title="Held-out faces", note="Six hand-made rows.")
    names = {p.name for p in tmp_path.iterdir()}
    assert {"report.md", "metrics.json", "age_errors.png", "gender_confusion.png", "race_confusion.png",
            "fairness_by_race.png", "fairness_by_gender.png"} <= names  # fmt: skip
    assert json.loads((tmp_path / "metrics.json").read_text()) == report
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# Held-out faces\n\nSix hand-made rows.")
    race_section = text.split("### by race")[1]
    for race, rows in zip(RACES, [3, 2, 1, 0, 0]):
        assert f"| {race} | {rows} |" in race_section
    assert "| Indian | 0 | – | – | – |" in race_section
    assert "gap (best − worst)" in race_section and "(White vs Asian)" in race_section
    for image in ("age_errors.png", "race_confusion.png", "fairness_by_race.png"):
        assert f"({image})" in text


def test_bad_rows_are_skipped_and_listed(net, table, tmp_path):
    table["race"][5] = "Martian"
    report = evaluate_report(net, table, tmp_path, inputs="x")
    assert report["rows"] == 5
    assert len(report["skipped"]) == 1 and "Martian" in report["skipped"][0]["message"]
    assert "skipped 1 unreadable or invalid rows" in (tmp_path / "report.md").read_text()
    table["race"] = ["Martian"] * 6
    with pytest.raises(ValueError, match="no usable rows"):
        evaluate_report(net, table, tmp_path, inputs="x")


def test_bin_width_gives_decades_for_ages():
    assert _bin_width(116) == 10  # ages 0-116: 12 decades
    assert _bin_width(60) == 10
    assert _bin_width(19) == 2  # 10 bins rather than 19 of width 1
    assert _bin_width(0.9) == pytest.approx(0.1)


# ---- bootstrap intervals --------------------------------------------------------------------------


def test_accuracy_interval_matches_the_normal_approximation_and_narrows_with_more_rows():
    head = mh.Categorical(["a", "b"])
    for n in (400, 4000):
        target = torch.zeros(n, dtype=torch.long)
        logits = torch.zeros(n, 2)
        logits[: int(0.85 * n), 0] = 1.0  # 85 % right
        logits[int(0.85 * n) :, 1] = 1.0
        interval = _interval(head, logits, target, "accuracy")
        half = 1.96 * (0.85 * 0.15 / n) ** 0.5
        assert interval["low"] == pytest.approx(0.85 - half, abs=0.25 * half)
        assert interval["high"] == pytest.approx(0.85 + half, abs=0.25 * half)
        assert interval["level"] == 0.95 and interval["resamples"] == 1000


def test_intervals_for_metrics_that_are_not_row_means_and_too_few_rows():
    head = mh.MultiLabel(["x", "y"])
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 2, (60, 2), generator=gen).float()
    output = (target * 2 - 1) * 3 + torch.randn(60, 2, generator=gen) * 3  # mostly right
    point = head.metrics(output, target)["macro_f1"]
    interval = _interval(head, output, target, "macro_f1")
    assert interval["low"] < point < interval["high"] and interval["high"] - interval["low"] < 0.5
    assert _interval(mh.Regression(), torch.ones(1), torch.zeros(1), "mae") is None


def test_report_gives_each_head_an_interval_around_its_metric(net, table, tmp_path):
    report = evaluate_report(net, table, tmp_path, inputs="x")
    for head in report["heads"].values():
        interval, value = head["interval"], head["metrics"][head["primary"]]
        assert interval["metric"] == head["primary"] and interval["low"] <= value <= interval["high"]
    age = report["heads"]["age"]["interval"]
    assert 0 <= age["low"] < age["high"] <= 5  # MAE of five rows with errors 0-5
    text = (tmp_path / "report.md").read_text()
    assert "95% interval |" in text and f"| mae {age['low']:.4g}-{age['high']:.4g} |" in text
