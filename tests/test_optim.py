import pytest
import torch

from conftest import make_net
from manyheads.optim import build_optimizer, schedule, schedule_factor


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


def beta1(opt):
    return [g["betas"][0] for g in opt.param_groups]


def test_onecycle_cycles_momentum_against_the_rate_and_other_schedules_leave_it():
    net = make_net()
    net(torch.zeros(2, 8))
    opt, _ = build_optimizer(net, "adamw", lr=1e-3, trunk_lr=1e-4)
    sched = schedule(opt, "onecycle", 100, warmup=0.3)
    seen = [beta1(opt)]
    for _ in range(100):
        opt.step()
        sched.step()
        seen.append(beta1(opt))
    assert seen[0] == pytest.approx([0.95, 0.95])  # both groups, the trunk's too
    assert seen[30] == pytest.approx([0.85, 0.85])  # peak rate, lowest momentum
    assert seen[15][0] == pytest.approx(0.90) and seen[60][0] == pytest.approx(
        0.85 + 0.1 * (1 - schedule_factor("onecycle", 100)(60))
    )
    assert seen[100] == pytest.approx([0.95, 0.95])
    opt, _ = build_optimizer(net, "adamw", lr=1e-3)
    cosine = schedule(opt, "cosine", 100)
    opt.step()
    cosine.step()
    assert beta1(opt) == [0.9, 0.9]


def test_onecycle_leaves_sgd_without_momentum_alone():
    net = make_net()
    net(torch.zeros(2, 8))
    plain, _ = build_optimizer(net, "sgd", lr=0.1)
    schedule(plain, "onecycle", 10)
    assert plain.param_groups[0]["momentum"] == 0
    heavy = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    schedule(heavy, "onecycle", 10)
    assert heavy.param_groups[0]["momentum"] == pytest.approx(0.95)


def test_schedule_state_saves_and_resumes_mid_cycle(tmp_path):
    net = make_net()
    net(torch.zeros(2, 8))
    opt, _ = build_optimizer(net, "adam", lr=1e-2)
    sched = schedule(opt, "onecycle", 50)
    for _ in range(20):
        opt.step()
        sched.step()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "state.pt")  # picklable
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    opt2, _ = build_optimizer(net, "adam", lr=1e-2)
    sched2 = schedule(opt2, "onecycle", 50)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    for _ in range(5):
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()
    assert sched2.last_epoch == sched.last_epoch == 25
    assert beta1(opt2) == beta1(opt) and sched2.get_last_lr() == sched.get_last_lr()
