"""Checks every registered head kind, kind x suitable loss, and balancing strategy passes (new entries get them free).

The scikit-learn ``estimator_checks`` / timm ``test_models`` pattern: one suite parametrized over the registries.
"""

import json

import numpy as np
import pytest
import torch
from torch import nn

import manyheads as mh
from manyheads import balancing, losses
from manyheads.heads import REGISTRY, head_from_spec

KINDS = sorted(REGISTRY)
KIND_LOSSES = [(kind, loss) for kind in KINDS for loss in sorted(REGISTRY[kind].losses)]
STRATEGIES = sorted(balancing.STRATEGIES)


def _raw(head, n=12, seed=0):
    """Raw outputs of the head's layer shape."""
    shape = (n,) if head.squeeze else (n, head.out_features)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def _targets(head, n=12, seed=1):
    """Encoded targets of valid user values: the decoded answers to random outputs."""
    return head.encode(head.decode(_raw(head, n, seed)), name="h")


@pytest.mark.parametrize("kind", KINDS)
def test_encode_decode_round_trip(kind):
    head = REGISTRY[kind].example()
    raw = _raw(head)
    values = head.decode(raw)
    target, labelled = head.encode([*values, None], name="h")
    assert labelled.tolist() == [True] * len(values) + [False]
    assert torch.equal(target[:-1].to(head.predicted(raw).dtype), head.predicted(raw))
    assert head.decode_readout(head.readout(raw).numpy()) == values  # the ONNX/service path answers alike


@pytest.mark.parametrize("kind", KINDS)
def test_spec_round_trip_is_json_and_refuses_foreign_fields(kind):
    head = REGISTRY[kind].example()
    spec = json.loads(json.dumps(head.spec()))
    rebuilt = head_from_spec(spec)
    assert type(rebuilt) is type(head) and rebuilt.spec() == head.spec() and rebuilt.kind == kind
    with pytest.raises(ValueError, match=f"do not apply to a {kind} head"):
        head_from_spec({**spec, "no_such_field": 1})


@pytest.mark.parametrize("kind", KINDS)
def test_metrics_name_the_primary_and_per_row_shares_average_to_it(kind):
    head = REGISTRY[kind].example()
    raw, (target, _) = _raw(head), _targets(head)
    metrics = head.metrics(raw, target)
    assert head.primary in metrics and head.metrics(raw[:0], target[:0]) == {}
    per_row = head.per_row(raw, target, head.primary)
    if per_row is not None:
        assert per_row.shape == (len(target),) and per_row.mean().item() == pytest.approx(metrics[head.primary])


@pytest.mark.parametrize(("kind", "loss"), KIND_LOSSES)
def test_masked_loss_is_finite_and_adds_nothing_without_labels(kind, loss):
    head = REGISTRY[kind].example()
    resolved = losses.resolve({"h": head}, {"h": loss})["h"]
    raw = _raw(head).requires_grad_()
    target, labelled = _targets(head)
    value = resolved(raw, target, labelled)
    assert torch.isfinite(value) and value.item() > 0
    value.backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0
    nobody = resolved(raw, target, torch.zeros_like(labelled))
    assert nobody.item() == 0.0 and not torch.isnan(nobody)
    half = labelled.clone()
    half[::2] = False  # the masked mean equals the loss of the labelled rows alone
    alone = resolved(raw[half], target[half], labelled[half])
    assert resolved(raw, target, half).item() == pytest.approx(alone.item(), rel=1e-5)


@pytest.mark.parametrize(("kind", "loss"), KIND_LOSSES)
def test_the_trivial_predictor_has_a_finite_loss(kind, loss):
    head = REGISTRY[kind].example()
    resolved = losses.resolve({"h": head}, {"h": loss})
    target, labelled = _targets(head, n=40)
    constant = head.trivial_output(target)
    assert head.canonical(constant).shape == head.canonical(_raw(head, 40)).shape
    trivial = losses.trivial_losses(resolved, {"h": target}, {"h": labelled})
    assert np.isfinite(trivial["h"]) and trivial["h"] > 0


def _table(head, n=48):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(n, 6, generator=generator)
    return {"x": x.numpy(), "h": head.decode(_raw(head, n, seed=3))}


def _net(head, seed=0):
    torch.manual_seed(seed)
    return mh.MultiHeadNet(nn.Sequential(nn.Linear(6, 16), nn.ReLU()), {"h": head})


@pytest.mark.parametrize(("kind", "loss"), KIND_LOSSES)
def test_one_training_step_changes_the_heads_layer(kind, loss):
    head = REGISTRY[kind].example()
    net = _net(head)
    table = _table(head)
    net(torch.as_tensor(table["x"][:2]))  # materialise the lazy head layer
    before = net.head_layers["h"].linear.weight.detach().clone()
    mh.fit(net, table, losses={"h": loss}, epochs=1, batch_size=len(table["x"]), seed=0, progress=False)
    assert not torch.equal(before, net.head_layers["h"].linear.weight)


@pytest.mark.parametrize("kind", KINDS)
def test_a_saved_net_answers_the_same_after_loading(kind, tmp_path):
    head = REGISTRY[kind].example()
    net = _net(head)
    table = _table(head)
    mh.fit(net, table, epochs=1, seed=0, progress=False)
    path = net.save(tmp_path / "m.safetensors")
    loaded = mh.load(path, trunk=nn.Sequential(nn.Linear(6, 16), nn.ReLU()))
    assert loaded.predict(table["x"]) == net.predict(table["x"])


def _strategy(name, resolved):
    try:
        return balancing.create(name, resolved)
    except ValueError as error:  # an optional solver (cvxpy, quadprog) is not installed
        pytest.skip(str(error))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_and_reports_weights_per_head(strategy):
    heads = {"a": mh.Regression(), "b": mh.Binary(), "c": mh.Categorical(["x", "y", "z"])}
    _strategy(strategy, losses.resolve(heads))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=generator)
    table = {"x": x.numpy(), "a": (x[:, 0] * 5).tolist(), "b": (x[:, 1] > 0).tolist(),
             "c": [["x", "y", "z"][i] for i in x[:, 2:5].argmax(1).tolist()]}  # fmt: skip
    torch.manual_seed(0)
    net = mh.MultiHeadNet(nn.Sequential(nn.Linear(6, 16), nn.ReLU()), heads)
    net(x[:2])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = mh.fit(net, table, weights=strategy, epochs=2, batch_size=32, seed=0, progress=False)
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items() if k.startswith("trunk"))
    weights = result.history[[f"weight/{h}" for h in heads]].to_numpy()
    assert np.isfinite(weights).all() and (weights >= 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_a_calibrated_head_answers_the_same_after_its_spec_round_trip(kind):
    head = REGISTRY[kind].example()
    raw, (target, _) = _raw(head, n=40), _targets(head, n=40)
    uncalibrated = head.readout(raw)
    fitted = head.calibrate(raw, target)
    rebuilt = head_from_spec(json.loads(json.dumps(head.file_spec())))
    assert torch.allclose(rebuilt.readout(raw), head.readout(raw))
    assert rebuilt.answers(head.readout(raw).numpy()) == head.answers(head.readout(raw).numpy())
    if fitted is None:  # a kind without calibration answers exactly as before
        assert torch.equal(head.readout(raw), uncalibrated) and head.file_spec() == head.spec()
    assert head.decode_readout(head.readout(raw).numpy()) == head.decode(raw)  # one answer on every path
    if head.calibration_keeps_answers:
        assert head.decode(raw) == head.uncalibrated().decode(raw)
