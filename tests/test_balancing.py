"""Balancing strategies: learned and scheduled weights, gradient aggregation, normalisation, state."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import manyheads as mh
from manyheads import balancing
from manyheads.balancing import DWA, GradNorm, Jacobian, Uncertainty, dwa_weights
from manyheads.losses import resolve

FIT = dict(batch_size=32, seed=0, progress=False, augment=False)


def _trunk(inputs: int = 4, width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())


def _table(n: int = 256, seed: int = 0) -> dict:
    """x -> 'clean' (a function of x), 'noise' (pure noise), 'flag' (binary), 'kind' (3 classes)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    return {
        "x": list(x),
        "clean": (2 * x[:, 0] - x[:, 1]).tolist(),
        "noise": rng.normal(size=n).tolist(),
        "flag": (x[:, 2] > 0).astype(int).tolist(),
        "kind": np.digitize(x[:, 3], [-0.5, 0.5]).tolist(),
    }


def _weights(history, heads) -> np.ndarray:
    return history[[f"weight/{h}" for h in heads]].to_numpy()


# ---- uncertainty (Kendall et al. 2018) ------------------------------------------------------


def test_uncertainty_learns_to_weigh_a_noise_head_down():
    table = _table()
    del table["flag"], table["kind"]
    torch.manual_seed(0)
    net = mh.MultiHeadNet(_trunk(), {"clean": mh.Regression(), "noise": mh.Regression()})
    result = mh.fit(net, table, weights="uncertainty", epochs=8, lr=3e-2, **FIT)
    first, last = _weights(result.history, ["clean", "noise"])[[0, -1]]
    assert last[0] > first[0] and last[0] > 1.2  # the clean head's loss falls: its weight rises
    assert last[1] / last[0] < 0.8 * first[1] / first[0]  # the noise head's weight falls relative to it
    assert np.isclose(last[1], 1.0, atol=0.35)  # noise keeps a standardised loss near 1: weight near 1 / L


def test_uncertainty_objective_is_precision_weighted_plus_log_variance():
    heads = {"a": mh.Regression(), "b": mh.Regression()}
    balancer = Uncertainty(resolve(heads))
    with torch.no_grad():
        balancer.log_vars.copy_(torch.tensor([0.5, -1.0]))
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.0)}  # b has no labels in this batch
    expected = math.exp(-0.5) * 2.0 + 0.5  # b adds nothing, not even its log-variance
    assert float(balancer.objective(losses).detach()) == pytest.approx(expected)
    assert balancer.weights() == pytest.approx({"a": math.exp(-0.5), "b": math.exp(1.0)})


# ---- DWA (Liu et al. 2019) ----------------------------------------------------------------------


def test_dwa_formula():
    previous, before = [0.5, 0.9, 2.0], [1.0, 1.0, 1.0]
    ratios = [0.5, 0.9, 2.0]
    exps = [math.exp(r / 2.0) for r in ratios]
    expected = [3 * e / sum(exps) for e in exps]
    assert dwa_weights(previous, before) == pytest.approx(expected)
    assert dwa_weights([1.0, math.nan], [2.0, 1.0]) == pytest.approx(2 * torch.softmax(torch.tensor([0.25, 0.5]), 0))


def test_dwa_weights_in_history_follow_the_formula():
    table = _table()
    torch.manual_seed(0)
    heads = {"clean": mh.Regression(), "noise": mh.Regression(), "flag": mh.Binary()}
    result = mh.fit(mh.MultiHeadNet(_trunk(), heads), {k: table[k] for k in ["x", *heads]}, weights="dwa",
                    epochs=4, lr=1e-2, **FIT)  # fmt: skip
    history = result.history
    weights = _weights(history, list(heads))
    assert np.allclose(weights[:2], 1.0)  # epochs 1 and 2: every head weight 1
    for epoch in (2, 3):  # from epoch 3 on: the ratio of the two previous epochs' mean train losses
        losses = [[history[f"train/{h}/loss"].iloc[epoch - back] for h in heads] for back in (1, 2)]
        assert weights[epoch] == pytest.approx(dwa_weights(*losses), rel=1e-5)
    assert not np.allclose(weights[2:], 1.0)
    assert weights.sum(axis=1) == pytest.approx(3.0)


# ---- gradient aggregation through torchjd ------------------------------------------------------------


def _conflicting(n: int = 64):
    """Two regression heads whose targets pull the shared trunk in opposite directions."""
    torch.manual_seed(1)
    x = torch.randn(n, 4)
    return x, {"up": 3 * x[:, 0] + 1.0, "down": -3 * x[:, 0] - 1.0}


def _gradients(weights, base: dict[str, float] | None = None, scale=None):
    x, targets = _conflicting()
    heads = {"up": mh.Regression(standardize=False), "down": mh.Regression(standardize=False)}
    torch.manual_seed(0)
    net = mh.MultiHeadNet(_trunk(), heads)
    net(x)  # materialise the lazy head layers, then make them equal: same layer, opposite targets
    net.head_layers["down"].load_state_dict(net.head_layers["up"].state_dict())
    resolved = resolve(heads, None, weights if isinstance(weights, dict) else base)
    balancer = balancing.create(weights, resolved, scale=scale)  # an fp16 grad scaler's scale, set once
    features = net.features(x)
    outputs = net.head_outputs(features)
    all_rows = torch.ones(len(x), dtype=torch.bool)
    losses = {h: resolved[h](outputs[h], targets[h], all_rows) for h in heads}
    balancer.backward(losses, features if balancer.needs_features else None)
    trunk = torch.cat([p.grad.flatten() for p in net.trunk.parameters()])
    head_grads = {
        h: torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in net.head_layers[h].parameters()]
        )
        for h in heads
    }  # a head weighted 0 gets no gradient at all
    return trunk, head_grads, balancer


def _per_head_trunk_gradients():
    rows = []
    for head in ("up", "down"):
        trunk, _, _ = _gradients({"up": float(head == "up"), "down": float(head == "down")})
        rows.append(trunk)
    return rows


SOLVERS = {"upgrad": ["quadprog", "qpsolvers"], "cagrad": ["cvxpy", "clarabel"], "nashmtl": ["cvxpy", "ecos"]}


@pytest.mark.filterwarnings("ignore:You are solving a parameterized problem")  # cvxpy, inside Nash-MTL
@pytest.mark.parametrize("method", ["mgda", "upgrad", "pcgrad", "cagrad", "nashmtl"])
def test_aggregation_changes_the_trunk_update_and_resolves_the_conflict(method):
    for module in SOLVERS.get(method, []):  # torchjd's optional solvers
        pytest.importorskip(module)
    base = {"up": 5.0, "down": 1.0}  # the sum is dominated by 'up'
    summed, summed_heads, _ = _gradients("constant", base)
    aggregated, aggregated_heads, balancer = _gradients(method, base)
    g_up, g_down = _per_head_trunk_gradients()
    assert float(g_up @ g_down) < 0  # the heads really conflict on the trunk
    assert float(summed @ g_down) < 0  # plain summation moves against 'down'
    assert not torch.allclose(summed, aggregated, atol=1e-6)
    for h in summed_heads:  # head layers get their own loss's gradient either way
        assert torch.allclose(summed_heads[h], aggregated_heads[h], atol=1e-5)
    if method in ("mgda", "upgrad"):  # both guarantee an update conflicting with no head
        assert float(aggregated @ (5 * g_up)) >= -1e-5 and float(aggregated @ g_down) >= -1e-5
    assert all(w > 0 for w in balancer.weights().values())


def test_aggregation_under_a_grad_scaler_sees_true_gradients_and_skips_overflow():
    base = {"up": 5.0, "down": 1.0}
    plain, plain_heads, _ = _gradients("mgda", base)
    scaled, scaled_heads, _ = _gradients("mgda", base, scale=lambda t: t * 1024.0)
    assert torch.allclose(scaled, 1024.0 * plain, rtol=1e-4)  # the scaler's unscale_ then restores them
    assert all(torch.allclose(scaled_heads[h], 1024.0 * plain_heads[h], rtol=1e-4) for h in plain_heads)
    overflow, _, _ = _gradients("mgda", base, scale=lambda t: t * math.inf)
    assert not torch.isfinite(overflow).all()  # left non-finite, so GradScaler skips the step


def test_aggregation_still_trains_and_records_its_weights():
    table = _table()
    heads = {"clean": mh.Regression(), "flag": mh.Binary()}
    torch.manual_seed(0)
    net = mh.MultiHeadNet(_trunk(), heads)
    result = mh.fit(net, {k: table[k] for k in ["x", *heads]}, validation=0.2, weights="mgda", epochs=5, lr=1e-2,
                    **FIT)  # fmt: skip
    history = result.history
    assert history["val/clean/mae"].iloc[-1] < 0.6 * history["val/clean/mae"].iloc[0]
    assert history["val/flag/accuracy"].iloc[-1] > 0.8
    weights = _weights(history, list(heads))
    assert (weights > 0).all() and weights.sum(axis=1) == pytest.approx(1.0, abs=0.02)  # MGDA: a convex mix


def test_create_names_aggregators_and_rejects_unknown_ones():
    heads = {"a": mh.Regression(), "b": mh.Binary()}
    resolved = resolve(heads)
    assert balancing.create("jd:IMTLG", resolved).name == "jd:IMTLG"
    assert balancing.create("MGDA", resolved).name == "mgda"
    from torchjd.aggregation import MGDA

    assert isinstance(balancing.create(MGDA(), resolved), Jacobian)
    with pytest.raises(ValueError, match="no aggregator 'Nope'"):
        balancing.create("jd:Nope", resolved)
    with pytest.raises(ValueError, match="unknown balancing strategy 'magic'.*uncertainty"):
        balancing.create("magic", resolved)
    with pytest.raises(ValueError, match="needs"):
        balancing.create("jd:Constant", resolved)  # needs a weights argument


def test_feature_strategies_refuse_modules_without_shared_features():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 2)

        def forward(self, x):
            out = self.body(x)
            return {"clean": out[:, 0], "flag": out[:, 1]}

    table = _table(64)
    data = {k: table[k] for k in ["x", "clean", "flag"]}
    with pytest.raises(ValueError, match="shared features"):
        mh.fit(Both(), data, heads={"clean": mh.Regression(), "flag": mh.Binary()}, weights="upgrad", epochs=1, **FIT)


# ---- GradNorm (Chen et al. 2018) ----------------------------------------------------------------------


def test_gradnorm_weights_stay_positive_sum_to_k_and_move():
    table = _table()
    heads = {"clean": mh.Regression(), "noise": mh.Regression(), "kind": mh.Categorical([0, 1, 2])}
    torch.manual_seed(0)
    net = mh.MultiHeadNet(_trunk(), heads)
    result = mh.fit(net, {k: table[k] for k in ["x", *heads]}, weights="gradnorm", epochs=5, lr=5e-2, **FIT)
    weights = _weights(result.history, list(heads))
    assert (weights > 0).all()
    assert weights.sum(axis=1) == pytest.approx(3.0, abs=1e-4)
    assert np.abs(weights[-1] - 1.0).max() > 0.1  # learned, not left at 1


def test_gradnorm_sets_a_gradient_on_its_weights_only():
    heads = {"a": mh.Regression(), "b": mh.Regression()}
    balancer = GradNorm(resolve(heads))
    features = torch.randn(8, 3, requires_grad=True)
    layer_a, layer_b = nn.Linear(3, 1), nn.Linear(3, 1)
    losses = {"a": (layer_a(features) - 1).square().mean(), "b": 10 * layer_b(features).square().mean()}
    balancer.backward(losses, features)
    grad = balancer.task_weights.grad
    assert grad is not None and grad.abs().sum() > 0
    assert grad[0] * grad[1] < 0  # one weight is pushed up, the other down
    assert layer_a.weight.grad is not None and features.grad is not None
    scaled = GradNorm(resolve(heads), scale=lambda t: t * 256.0)
    losses = {"a": (layer_a(features) - 1).square().mean(), "b": 10 * layer_b(features).square().mean()}
    scaled.backward(losses, features)
    assert torch.allclose(scaled.task_weights.grad, 256.0 * grad)  # GradScaler will unscale it with the rest


# ---- normalisation ---------------------------------------------------------------------------------------


def test_normalize_starts_every_head_near_one(monkeypatch):
    rng = np.random.default_rng(0)
    n = 300
    x = rng.normal(size=(n, 4)).astype("float32")
    table = {
        "x": list(x),
        "years": (40 + 15 * rng.normal(size=n)).tolist(),
        "flag": (rng.random(n) < 0.3).astype(int).tolist(),
        "digit": rng.integers(0, 10, size=n).tolist(),
    }
    heads = {"years": mh.Regression(), "flag": mh.Binary(), "digit": mh.Categorical(list(range(10)))}
    created = []
    original = balancing.create
    monkeypatch.setattr(balancing, "create", lambda *a, **k: created.append(original(*a, **k)) or created[-1])
    torch.manual_seed(0)
    # a vanishing lr (fit refuses 0): the epoch's mean train loss is the untrained net's loss
    result = mh.fit(mh.MultiHeadNet(_trunk(), heads), table, normalize=True, epochs=1, lr=1e-12, **FIT)
    normalizers = created[0].normalizers
    raw = {h: result.history[f"train/{h}/loss"].iloc[0] for h in heads}
    scaled = {h: raw[h] / normalizers[h] for h in heads}
    assert set(normalizers) == set(heads)
    assert all(0.75 < v < 1.35 for v in scaled.values()), scaled
    assert max(raw.values()) / min(raw.values()) > 2  # without normalisation they differ (CE over 10 classes)
    assert max(scaled.values()) / min(scaled.values()) < max(raw.values()) / min(raw.values())


# ---- early stopping on a monitored head ---------------------------------------------------------------------


def test_early_stopping_follows_the_monitored_head():
    table = _table()
    heads = {"clean": mh.Regression(), "flag": mh.Binary()}
    data = {k: table[k] for k in ["x", *heads]}

    def net_with_a_stuck_head():
        torch.manual_seed(0)
        net = mh.MultiHeadNet(_trunk(), heads)
        net(torch.zeros(1, 4))  # materialise the lazy head layers
        layer = net.head_layers["clean"].linear
        nn.init.zeros_(layer.weight)
        for p in layer.parameters():
            p.requires_grad_(False)  # 'clean' predicts its training mean forever: it cannot improve
        return net

    stuck = mh.fit(net_with_a_stuck_head(), data, validation=0.2, monitor="clean/mae", patience=1, epochs=10,
                   lr=1e-2, **FIT)  # fmt: skip
    assert len(stuck.history) == 3  # best at epoch 1, two epochs without improvement with patience 1
    assert stuck.best_epoch == 1 and stuck.monitor == "val/clean/mae"
    free = mh.fit(net_with_a_stuck_head(), data, validation=0.2, monitor="flag/accuracy", patience=1, epochs=10,
                  lr=1e-2, **FIT)  # fmt: skip
    accuracy = free.history["val/flag/accuracy"]
    assert len(free.history) > 3
    assert free.best_epoch == int(accuracy.to_numpy().argmax()) + 1  # first epoch with the best accuracy


# ---- state ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["uncertainty", "dwa", "gradnorm", "mgda"])
def test_balancer_state_round_trips_through_a_weights_only_checkpoint(strategy):
    table = _table(96)
    heads = {"clean": mh.Regression(), "noise": mh.Regression()}
    created = []
    original = balancing.create
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(balancing, "create", lambda *a, **k: created.append(original(*a, **k)) or created[-1])
        torch.manual_seed(0)
        mh.fit(mh.MultiHeadNet(_trunk(), heads), {k: table[k] for k in ["x", *heads]}, weights=strategy, epochs=3,
               lr=5e-2, **FIT)  # fmt: skip
    trained = created[0]
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = balancing.create(strategy, resolve(heads))
    assert fresh.weights() != pytest.approx(trained.weights())  # training moved them
    fresh.load_state_dict(state)
    assert fresh.weights() == pytest.approx(trained.weights())


def test_dwa_buffer_is_restored_without_history():
    heads = {"a": mh.Regression(), "b": mh.Regression()}
    trained = DWA(resolve(heads))
    trained.start_epoch(2, [{"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 1.0}])
    fresh = DWA(resolve(heads))
    fresh.load_state_dict(trained.state_dict())
    assert list(fresh.weights().values()) == pytest.approx(dwa_weights([0.5, 1.0], [1.0, 1.0]))


# ---- precision ---------------------------------------------------------------------------------------------


def test_precision_runs_autocast_backward_and_step():
    from manyheads.precision import Precision

    with pytest.raises(ValueError, match="precision must be one of"):
        Precision.create("fp8", "cpu")
    torch.manual_seed(0)
    layer = nn.Linear(4, 2)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        amp = Precision.create(name, "cpu")
        assert amp.scaler is None and amp.grad_scale is None  # no grad scaler off CUDA
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        before = layer.weight.detach().clone()
        with amp.autocast():
            out = layer(torch.randn(3, 4))
        assert out.dtype == dtype
        amp.backward(out.float().square().mean())
        amp.step(opt)
        assert not torch.equal(before, layer.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp16 grad scaler is CUDA's")
def test_fp16_on_cuda_gives_balancers_the_grad_scalers_scale():
    from manyheads.precision import Precision

    amp = Precision.create("fp16", "cuda")
    assert amp.scaler is not None and amp.grad_scale is not None
    balancer = balancing.create("gradnorm", resolve({"a": mh.Regression(), "b": mh.Regression()}), scale=amp.grad_scale)
    assert balancer.scale == amp.scaler.scale
    table = _table(64)
    torch.manual_seed(0)
    net = mh.MultiHeadNet(_trunk(), {"clean": mh.Regression(), "flag": mh.Binary()})
    result = mh.fit(net, {k: table[k] for k in ["x", "clean", "flag"]}, weights="gradnorm", precision="fp16",
                    device="cuda", epochs=2, **FIT)  # fmt: skip
    assert np.isfinite(result.history["train/total/loss"]).all()
