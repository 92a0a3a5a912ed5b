import pytest
import torch
from torch import nn

from conftest import make_net
from manyheads.optim import WeightAverage, build_optimizer, schedule, schedule_factor


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


# ---- weight averaging ---------------------------------------------------------------------------


def test_weight_average_copies_first_then_forgets_fast_early_and_at_the_decay_later():
    net = nn.Linear(1, 1, bias=False)
    average = WeightAverage(net, decay=0.5)
    history = []
    for value in [4.0, 0.0, 8.0, 2.0]:
        net.weight.data.fill_(value)
        average.update_parameters(net)
        history.append(average.module.weight.item())
    # update 1 copies; update t + 1 keeps min(0.5, (1 + t) / (10 + t)) of the average
    expected = [4.0]
    for keep, value in [(2 / 11, 0.0), (3 / 12, 8.0), (4 / 13, 2.0)]:
        expected.append(keep * expected[-1] + (1 - keep) * value)
    assert history == pytest.approx(expected)
    for _ in range(200):
        average.update_parameters(net)
    net.weight.data.fill_(10.0)
    average.update_parameters(net)
    assert average.module.weight.item() == pytest.approx(0.5 * 2.0 + 0.5 * 10.0)  # the decay caps what is kept
    assert not any(p.requires_grad for p in average.module.parameters())


def test_weight_average_covers_batchnorm_statistics_and_restores_its_count():
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    average = WeightAverage(net, decay=0.9)
    for _ in range(3):
        net(torch.randn(8, 2))  # moves the running statistics
        average.update_parameters(net)
    bn, averaged_bn = net[1], average.module[1]
    assert int(averaged_bn.num_batches_tracked) == int(bn.num_batches_tracked) == 3  # a count: copied
    assert not torch.equal(averaged_bn.running_mean, torch.zeros(3))
    assert not torch.equal(averaged_bn.running_mean, bn.running_mean)  # averaged, not copied
    restored = WeightAverage(net, decay=0.9)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == 3
    assert torch.equal(restored.module[0].weight, average.module[0].weight)


def test_weight_average_refuses_a_decay_outside_zero_to_one():
    with pytest.raises(ValueError, match=r"ema decay must be in \[0, 1\), got 1.0"):
        WeightAverage(nn.Linear(1, 1), 1.0)
