"""LR schedule (warmup + polynomial decay) and optimizer construction."""
import io

import pytest
import torch
from easydict import EasyDict as edict

from protomem_plugin.train.schedule import build_lr_scheduler, build_optimizer


def _opt(lr=0.1, lrs=None):
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(2)]
    if lrs is None:
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.SGD([{"params": [p], "lr": g} for p, g in zip(params, lrs)], lr=lr)


def _trace(opt, sched, steps):
    """lr of every group after 0, 1, ..., steps scheduler steps."""
    out = [[g["lr"] for g in opt.param_groups]]
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append([g["lr"] for g in opt.param_groups])
    return out


def closed_form(t, base, w, total, power):
    if t <= w:
        return base * t / w
    return base * (1 - (min(t, total) - w) / (total - w)) ** power


def test_warmup_is_linear_and_reaches_base_lr():
    opt = _opt(0.1)
    lrs = [r[0] for r in _trace(opt, build_lr_scheduler(opt, 10, 100), 10)]
    assert lrs[0] == 0.0
    assert lrs == pytest.approx([0.1 * t / 10 for t in range(11)], abs=1e-12)
    assert lrs[10] == pytest.approx(0.1, rel=1e-12)
    steps = [b - a for a, b in zip(lrs, lrs[1:])]
    assert max(steps) - min(steps) < 1e-12


@pytest.mark.parametrize("power", [1.0, 2.0, 3.5])
def test_decay_follows_closed_form(power):
    base, w, total = 0.4, 7, 53
    opt = _opt(base)
    lrs = [r[0] for r in _trace(opt, build_lr_scheduler(opt, w, total, power=power), total + 5)]
    expected = [closed_form(t, base, w, total, power) for t in range(total + 6)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[total] == pytest.approx(0.0, abs=1e-15)
    assert lrs[total + 5] == pytest.approx(0.0, abs=1e-15)  # stays at 0 past the end
    # half-way through the decay: (1/2)**power of the base lr
    assert lrs[w + (total - w) // 2] == pytest.approx(base * (1 - ((total - w) // 2) / (total - w)) ** power)


def test_default_power_is_two():
    opt = _opt(1.0)
    lrs = [r[0] for r in _trace(opt, build_lr_scheduler(opt, 0, 10), 5)]
    assert lrs[5] == pytest.approx(0.25)
    assert lrs[0] == 1.0  # no warmup: starts at the base lr


def test_each_param_group_keeps_its_own_base_lr():
    opt = _opt(lrs=[0.3, 0.1])
    trace = _trace(opt, build_lr_scheduler(opt, 4, 20), 20)
    for t, (a, b) in enumerate(trace):
        assert a == pytest.approx(closed_form(t, 0.3, 4, 20, 2.0), abs=1e-12)
        assert b == pytest.approx(closed_form(t, 0.1, 4, 20, 2.0), abs=1e-12)


def test_state_dict_round_trip_resumes_the_same_curve():
    opt = _opt(0.2)
    sched = build_lr_scheduler(opt, 5, 40)
    full = _trace(opt, sched, 40)

    opt1 = _opt(0.2)
    sched1 = build_lr_scheduler(opt1, 5, 40)
    _trace(opt1, sched1, 17)
    buf = io.BytesIO()
    torch.save({"opt": opt1.state_dict(), "sched": sched1.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    opt2 = _opt(0.2)
    sched2 = build_lr_scheduler(opt2, 5, 40)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert sched2.last_epoch == 17
    resumed = [r[0] for r in _trace(opt2, sched2, 23)]
    assert resumed == pytest.approx([r[0] for r in full[17:]], abs=1e-15)


@pytest.mark.parametrize("w,total", [(10, 10), (10, 5), (-1, 5)])
def test_invalid_step_counts_raise(w, total):
    with pytest.raises(ValueError, match="steps"):
        build_lr_scheduler(_opt(), w, total)


def _params():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2), torch.nn.Linear(2, 3)


def test_build_sgd_with_empty_head_group_trains():
    backbone, _ = _params()
    cfg = edict(optimizer="sgd", lr=0.1, weight_decay=5e-4)
    opt = build_optimizer(cfg, backbone.parameters(), [])
    assert isinstance(opt, torch.optim.SGD)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["params"] == []
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"]) == (0.1, 0.9, 5e-4)
    w0 = backbone.weight.detach().clone()
    backbone(torch.ones(1, 4)).sum().backward()
    opt.step()
    # plain SGD first step: w -= lr * (grad + wd * w)
    expected = w0 - 0.1 * (torch.ones(2, 4) + 5e-4 * w0)
    assert torch.allclose(backbone.weight, expected, atol=1e-7)


def test_build_adamw_with_head_params_from_a_mapping():
    backbone, head = _params()
    opt = build_optimizer({"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05},
                          backbone.parameters(), head.parameters())
    assert isinstance(opt, torch.optim.AdamW)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    assert all(g["lr"] == 1e-3 and g["weight_decay"] == 0.05 for g in opt.param_groups)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_unknown_optimizer_names_the_key():
    backbone, _ = _params()
    with pytest.raises(ValueError, match="'optimizer'.*'lamb'"):
        build_optimizer(edict(optimizer="lamb", lr=0.1, weight_decay=0.0), backbone.parameters(), [])


def test_missing_key_is_named():
    backbone, _ = _params()
    with pytest.raises(ValueError, match="'weight_decay'"):
        build_optimizer(edict(optimizer="sgd", lr=0.1), backbone.parameters(), [])


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_head_group_gets_lr_times_head_lr_scale(name):
    backbone, head = _params()
    cfg = edict(optimizer=name, lr=0.02, weight_decay=5e-4, head_lr_scale=10)
    opt = build_optimizer(cfg, backbone.parameters(), head.parameters())
    assert opt.param_groups[0]["params"] == list(backbone.parameters())
    assert opt.param_groups[1]["params"] == list(head.parameters())
    assert opt.param_groups[0]["lr"] == 0.02
    assert opt.param_groups[1]["lr"] == pytest.approx(0.2, rel=1e-12)


@pytest.mark.parametrize("scale", [None, 1.0, 1])
def test_head_lr_scale_absent_or_one_gives_equal_lrs(scale):
    backbone, head = _params()
    cfg = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0}
    if scale is not None:
        cfg["head_lr_scale"] = scale
    opt = build_optimizer(cfg, backbone.parameters(), head.parameters())
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]


@pytest.mark.parametrize("scale", [0, -1, float("nan"), float("inf"), "x", True])
def test_bad_head_lr_scale_names_the_key(scale):
    backbone, head = _params()
    with pytest.raises(ValueError, match="'head_lr_scale'"):
        build_optimizer(edict(optimizer="sgd", lr=0.1, weight_decay=0.0, head_lr_scale=scale),
                        backbone.parameters(), head.parameters())


def test_scheduler_keeps_the_head_lr_ratio_at_every_step():
    backbone, head = _params()
    opt = build_optimizer(edict(optimizer="sgd", lr=0.1, weight_decay=0.0, head_lr_scale=4.0),
                          backbone.parameters(), head.parameters())
    sched = build_lr_scheduler(opt, 5, 30)
    assert sched.base_lrs == pytest.approx([0.1, 0.4])
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.4])
    trace = _trace(opt, sched, 30)
    for t, (a, b) in enumerate(trace):  # warmup (t <= 5), then decay to 0 at t = 30
        assert a == pytest.approx(closed_form(t, 0.1, 5, 30, 2.0), abs=1e-12)
        assert b == pytest.approx(4.0 * a, rel=1e-12, abs=1e-15)
