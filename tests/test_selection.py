import copy
import json

import pytest
import torch

import manyheads as mh
from conftest import make_net
from manyheads.selection import Selector


def rows(*values):
    return [{"epoch": i + 1, **v} for i, v in enumerate(values)]


def test_higher_is_better_metrics_are_maximised_and_losses_minimised():
    net = torch.nn.Linear(1, 1)
    accuracy = Selector("race/accuracy", has_validation=True)
    loss = Selector(None, has_validation=True)
    for row in rows(
        {"val/race/accuracy": 0.5, "val/total/loss": 1.0},
        {"val/race/accuracy": 0.8, "val/total/loss": 1.2},
        {"val/race/accuracy": 0.7, "val/total/loss": 0.9},
    ):
        accuracy.update(row, net)
        loss.update(row, net)
    assert accuracy.epoch == 2 and loss.epoch == 3
    assert accuracy.name == "val/race/accuracy"


def test_weighted_mix_is_minimised_as_given():
    selector = Selector({"age/mae": 0.1, "race/accuracy": -1}, has_validation=True)
    for row in rows(
        {"val/age/mae": 10.0, "val/race/accuracy": 0.5},  # 1.0 - 0.5 = 0.5
        {"val/age/mae": 5.0, "val/race/accuracy": 0.4},  # 0.5 - 0.4 = 0.1
        {"val/age/mae": 8.0, "val/race/accuracy": 0.9},  # 0.8 - 0.9 = -0.1
    ):
        selector.update(row, torch.nn.Linear(1, 1))
    assert selector.epoch == 3 and selector.score == pytest.approx(-0.1)


def test_unknown_monitor_column_names_the_columns():
    with pytest.raises(ValueError, match="no history column"):
        Selector("height/mae", has_validation=True).update({"epoch": 1, "val/age/mae": 1.0}, torch.nn.Linear(1, 1))


def test_patience_counts_epochs_since_the_best():
    selector = Selector("age/mae", has_validation=False)
    for row in rows({"train/age/mae": 3.0}, {"train/age/mae": 4.0}, {"train/age/mae": 5.0}):
        selector.update(row, torch.nn.Linear(1, 1))
    assert not selector.should_stop(2, patience=1) and selector.should_stop(3, patience=1)
    assert not selector.should_stop(3, patience=None)


def test_fit_keeps_each_heads_best_weights(table, tmp_path):
    result = mh.fit(
        make_net(), table, validation=0.25, epochs=3, seed=0, progress=False, keep_best_per_head=True,
        monitor={"age/mae": 0.05, "race/accuracy": -1}, run_dir=tmp_path,
    )  # fmt: skip
    history = result.history
    assert result.best_per_head["age"]["epoch"] == history["val/age/mae"].idxmin() + 1
    assert result.best_per_head["race"]["epoch"] == history["val/race/accuracy"].idxmax() + 1
    mix = 0.05 * history["val/age/mae"] - history["val/race/accuracy"]
    assert result.best_epoch == mix.idxmin() + 1
    age_net = result.net_for("age")
    saved = mh.load(
        tmp_path / "best_age.safetensors", trunk=torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU())
    )
    x = torch.as_tensor(table["x"][:5])
    assert saved.predict(x) == age_net.predict(x)
    with pytest.raises(ValueError, match="keep_best_per_head=True"):
        mh.fit(make_net(), table, epochs=1, progress=False).net_for("age")


def test_each_heads_best_net_is_calibrated_on_its_own_weights(table, tmp_path):
    train, validation = ({k: v[rows] for k, v in table.items()} for rows in (slice(0, 450), slice(450, None)))
    result = mh.fit(
        make_net(), train, validation=validation, epochs=5, lr=3e-2, seed=0, progress=False, keep_best_per_head=True,
        calibration="validation", monitor="age/mae", run_dir=tmp_path,
    )  # fmt: skip
    race = result.best_per_head["race"]
    assert race["epoch"] != result.best_epoch  # else the test shows nothing: the weights would be the same
    own = result.net_for("race")
    fitted = own.heads["race"].temperature
    assert fitted == pytest.approx(race["calibration"]["race"]["temperature"])
    assert fitted != pytest.approx(result.net.heads["race"].temperature)  # not the best epoch's temperature
    again = copy.deepcopy(own)
    assert mh.calibrate(again, validation)["race"]["temperature"] == pytest.approx(fitted)  # fitted on these weights
    saved = json.loads((tmp_path / "summary.json").read_text())["calibration_per_head"]
    assert saved["race"]["race"]["temperature"] == pytest.approx(fitted)
    assert result.net_for("race") is not result.net_for("race")  # a copy each time
