import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import manyheads as mh
from conftest import make_heads, make_net, make_table
from manyheads.losses import resolve

FAST = {"epochs": 8, "batch_size": 64, "lr": 3e-3, "seed": 0, "progress": False}


def test_joint_training_beats_constant_predictors(table):
    result = mh.fit(make_net(), table, validation=0.25, losses={"age": "mae"}, weights={"gender": 5}, **FAST)
    last = result.history.iloc[-1]
    ages = np.array([a for a in table["age"]], dtype=float)
    constant_mae = np.abs(ages - np.median(ages)).mean()
    assert last["val/age/mae"] < 0.5 * constant_mae
    assert last["val/gender/accuracy"] > 0.75  # classes are balanced: constant gets ~0.5
    assert last["val/race/accuracy"] > 0.6  # three balanced classes: constant gets ~0.33
    assert result.losses["age"].name == "mae" and result.losses["gender"].weight == 5
    for column in ("train/age/loss", "val/race/accuracy", "val/total/loss", "train/gender/labels", "weight/gender"):
        assert column in result.history


def test_history_counts_labels_per_head():
    table = make_table(n=400, missing_age=100)
    result = mh.fit(make_net(), table, epochs=1, seed=0, progress=False)
    assert result.history["train/age/labels"].iloc[0] == 300
    assert result.history["train/race/labels"].iloc[0] == 400


def test_zero_weight_leaves_a_head_untrained_while_others_learn(table):
    net = make_net()
    net(torch.as_tensor(table["x"][:2]))  # materialise the lazy head layers
    before = {k: v.clone() for k, v in net.head_layers["race"].state_dict().items()}
    result = mh.fit(net, table, weights={"race": 0}, **FAST)
    after = net.head_layers["race"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result.history["train/gender/accuracy"].iloc[-1] > 0.85


def test_custom_callable_loss_is_used(table):
    calls = []

    def halved_mae(output, target):
        calls.append(output.shape[0])
        return (output - target).abs() / 2

    result = mh.fit(make_net(), table, losses={"age": halved_mae}, epochs=1, seed=0, progress=False)
    assert calls and sum(calls) == len(table["age"])
    assert "halved_mae" in repr(result.losses)


def test_rows_missing_a_label_do_not_change_that_heads_gradient():
    table = make_table(n=64, missing_age=24)
    heads = make_heads()
    resolved = resolve(heads, {"age": "mae"})
    from manyheads.encoding import encode

    data = encode(table, heads, "x")
    resolved["age"].scale = 10.0

    def age_grad(rows):
        net = make_net(seed=1)
        net(data.inputs[:2])
        loss = resolved["age"](net(data.inputs[rows])["age"], data.targets["age"][rows], data.labelled["age"][rows])
        loss.backward()
        return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])

    labelled_only = torch.arange(24, 64)
    everything = torch.arange(64)
    assert torch.allclose(age_grad(labelled_only), age_grad(everything), atol=1e-6)


def test_a_batch_without_labels_for_a_head_adds_nothing():
    """Step 1's batch has no age label (found from the run's own permutation): training equals step 2 alone."""
    from manyheads.encoding import Batches, Encoded

    table = make_table(n=128)
    order = Batches(Encoded(torch.zeros(128, 1), {}, {}), 64, torch.device("cpu"), seed=0).order(0).tolist()
    first, second = order[:64], order[64:]
    table["age"] = [None if i in set(first) else age for i, age in enumerate(table["age"])]
    only = {"weights": {"gender": 0, "race": 0}, "optimizer": "sgd", "lr": 0.05, "augment": False, "progress": False}
    both = make_net()
    result = mh.fit(both, table, batch_size=64, epochs=1, seed=0, **only)
    alone = make_net()
    mh.fit(alone, {k: [v[i] for i in second] for k, v in table.items()}, batch_size=64, epochs=1, seed=0, **only)
    assert result.history["train/age/labels"].iloc[0] == 64
    for key, value in both.state_dict().items():
        assert torch.allclose(value, alone.state_dict()[key], atol=1e-6), key


def test_save_and_load_predict_identically(tmp_path, table):
    result = mh.fit(make_net(), table, epochs=2, seed=0, progress=False)
    path = result.net.save(tmp_path / "net.safetensors")
    trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
    loaded = mh.load(path, trunk=trunk)
    x = np.asarray(table["x"][:50])
    assert loaded.predict(x) == result.net.predict(x)
    for head, p in result.net.predict_proba(x).items():
        assert np.array_equal(p, loaded.predict_proba(x)[head])
    with pytest.raises(ValueError, match="custom trunk; pass it"):
        mh.load(path)


def test_netgraph_route_with_a_dict_returning_module(table):
    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
            self.age, self.gender = nn.Linear(32, 1), nn.Linear(32, 1)

        def forward(self, x):
            h = self.body(x)
            return {"age": self.age(h), "gender": self.gender(h)}

    data = {k: table[k] for k in ("x", "age", "gender")}
    result = mh.fit(TwoOutputs(), data, heads={"age": mh.Regression(), "gender": mh.Binary(["male", "female"])}, **FAST)
    assert result.history["train/gender/accuracy"].iloc[-1] > 0.8
    assert set(result.net.predict(np.asarray(table["x"][:3]))) == {"age", "gender"}


def test_dataframe_and_dataset_inputs(table):
    df = pd.DataFrame({"x": list(table["x"]), **{k: table[k] for k in ("age", "gender", "race")}})
    assert len(mh.fit(make_net(), df, epochs=1, seed=0, progress=False).history) == 1

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 100

        def __getitem__(self, i):
            return {k: table[k][i] for k in ("x", "age", "gender", "race")}

    result = mh.fit(make_net(), Rows(), validation=Rows(), epochs=1, seed=0, progress=False)
    assert result.history["val/race/labels"].iloc[0] == 100


def test_seeded_runs_are_reproducible(table):
    a = mh.fit(make_net(), table, epochs=2, seed=3, progress=False).history
    b = mh.fit(make_net(), table, epochs=2, seed=3, progress=False).history
    pd.testing.assert_frame_equal(a.drop(columns="seconds"), b.drop(columns="seconds"))


def test_best_epoch_net_is_returned(table):
    """A monitor that picks the worst (earliest) epoch: the returned net must score as that epoch did."""
    from manyheads.encoding import split

    train, held = split(table, 0.25, seed=1)
    result = mh.fit(make_net(), train, validation=held, monitor={"val/age/mae": -1.0}, **FAST)
    best = int(result.history["val/age/mae"].idxmax()) + 1
    assert result.best_epoch == best and best < len(result.history)  # not the last epoch's weights
    again = mh.evaluate(result.net, held)["age"]["mae"]
    assert again == pytest.approx(result.history["val/age/mae"].iloc[best - 1], rel=1e-5)


@pytest.mark.parametrize(
    "change, kwargs, message",
    [
        (lambda t: t, {"losses": {"height": "mse"}}, "losses names heads"),
        (lambda t: t, {"weights": {"height": 2}}, "weights names heads"),
        (lambda t: {k: v for k, v in t.items() if k != "race"}, {}, r"heads \['race'\] have no target column"),
        (lambda t: {**t, "race": ["zebra"] + t["race"][1:]}, {}, "head 'race', column 'race', row 0: 'zebra'"),
        (lambda t: {**t, "age": ["old"] + t["age"][1:]}, {}, "head 'age', column 'age', row 0: regression target"),
        (lambda t: t, {"losses": {"age": lambda o, t: o.sum(dim=0, keepdim=True).expand(3)}}, "returned shape"),
        (lambda t: {**t, "extra": t["x"]}, {}, "cannot tell the input column"),
        (lambda t: t, {"optimizer": "lion"}, r"The 'optimizer' parameter of fit must be one of .*; got 'lion'\."),
    ],
)
def test_bad_input_gets_a_clear_error(table, change, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mh.fit(make_net(), change(table), epochs=1, progress=False, **kwargs)


def test_optimizer_class_and_schedules(table):
    result = mh.fit(
        make_net(), table, optimizer=torch.optim.SGD, lr=0.05, schedule="onecycle", epochs=2, progress=False
    )
    assert result.history["lr"].iloc[-1] < 0.05 * 0.01  # annealed to about zero


def test_frozen_trunk_epochs_train_only_the_heads(table):
    net = make_net()
    net(torch.as_tensor(table["x"][:2]))
    trunk_before = [p.clone() for p in net.trunk.parameters()]
    head_before = net.head_layers["age"].linear.weight.clone()
    mh.fit(net, table, freeze_trunk_epochs=1, epochs=1, seed=0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(trunk_before, net.trunk.parameters()))
    assert not torch.equal(head_before, net.head_layers["age"].linear.weight)


# ---- weight averaging (ema=) ----------------------------------------------------------------------


def test_ema_zero_is_the_plain_run(table):
    plain = mh.fit(make_net(), table, validation=0.25, **FAST)
    averaged = mh.fit(make_net(), table, validation=0.25, ema=0.0, **FAST)
    pd.testing.assert_frame_equal(plain.history.drop(columns="seconds"), averaged.history.drop(columns="seconds"))
    assert all(torch.equal(a, b) for a, b in zip(plain.net.parameters(), averaged.net.parameters()))


def test_ema_returns_and_scores_the_average_of_the_steps_weights(table):
    one_step = {"batch_size": len(table["age"]), "lr": 0.05, "seed": 1, "progress": False}  # one step per epoch
    after_1 = mh.fit(make_net(), table, epochs=1, **one_step).net.state_dict()
    after_2 = mh.fit(make_net(), table, epochs=2, **one_step).net.state_dict()
    result = mh.fit(make_net(), table, epochs=2, ema=0.5, **one_step)
    keep = 2 / 11  # the second update keeps min(0.5, 2/11) of the first step's weights
    for name, value in result.net.state_dict().items():
        if value.is_floating_point():
            expected = keep * after_1[name] + (1 - keep) * after_2[name]
            torch.testing.assert_close(value, expected, msg=name)
        else:  # flags and counts are the latest
            assert torch.equal(value, after_2[name]), name
    assert not torch.allclose(result.net.head_layers["age"].linear.weight, after_2["head_layers.age.linear.weight"])


def test_ema_run_resumes_to_the_same_weights_and_refuses_a_mismatched_resume(tmp_path, table):
    settings = {"seed": 2, "progress": False, "ema": 0.9}
    straight = mh.fit(make_net(), table, epochs=2, run_dir=tmp_path / "straight", **settings)
    mh.fit(make_net(), table, epochs=1, run_dir=tmp_path / "stopped", **settings)
    resumed = mh.fit(make_net(), table, epochs=2, resume=tmp_path / "stopped", **settings)
    assert all(torch.equal(a, b) for a, b in zip(straight.net.parameters(), resumed.net.parameters()))
    with pytest.raises(ValueError, match=r"started with a weight average \(ema=\)"):
        mh.fit(make_net(), table, epochs=3, resume=tmp_path / "stopped", progress=False)


def test_ema_outside_zero_to_one_is_refused_before_training(table):
    with pytest.raises(ValueError, match=r"The 'ema' parameter of fit must be a decay in \[0, 1\) or None; got 1\.5\."):
        mh.fit(make_net(), table, ema=1.5, progress=False)
