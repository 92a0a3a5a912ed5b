import pytest
import torch

from conftest import make_net
from manyheads.optim import build_optimizer, schedule_factor


def test_onecycle_warms_up_then_anneals_to_zero():
    factor = schedule_factor("onecycle", 100, warmup=0.3)
    assert factor(0) == pytest.approx(0.04)
    assert factor(30) == pytest.approx(1.0)
    assert factor(15) < factor(29) and factor(60) < factor(31)
    assert factor(100) == pytest.approx(0.0, abs=1e-9)


def test_cosine_has_no_warmup_and_constant_is_flat():
    assert schedule_factor("cosine", 10)(0) == 1.0 and schedule_factor("cosine", 10)(5) == pytest.approx(0.5)
    assert schedule_factor(None, 10)(7) == 1.0
    with pytest.raises(ValueError, match="schedule must be one of"):
        schedule_factor("triangle", 10)


def test_trunk_gets_its_own_learning_rate():
    net = make_net()
    net(torch.zeros(2, 8))
    opt, trunk = build_optimizer(net, "sgd", lr=0.1, trunk_lr=0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    assert (
        {id(p) for p in opt.param_groups[1]["params"]}
        == {id(p) for p in net.trunk.parameters()}
        == {id(p) for p in trunk}
    )
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        build_optimizer(net, "lion")
