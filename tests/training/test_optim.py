"""Optimizer groups (no decay on marked parameters, norms, biases) and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from mambakit.models import LanguageModel, preset
from mambakit.training.config import OptimConfig
from mambakit.training.optim import build_optimizer, build_scheduler, lr_factor, param_groups


@pytest.mark.parametrize("name", ["tiny-mamba1", "tiny-mamba2", "hybrid-tiny"])
def test_param_groups(name):
    model = LanguageModel(preset(name, d_model=32, ssm={"headdim": 16}, mlp={"bias": True}))
    decay, keep = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert not ids(decay) & ids(keep)
    params = dict(model.named_parameters())
    assert ids(decay) | ids(keep) == {id(p) for p in params.values()}
    for pname, p in params.items():
        leaf = pname.rsplit(".", 1)[-1]
        no_decay = (
            leaf in ("A_log", "D", "dt_bias", "bias") or "norm" in pname or pname.endswith("dt_proj.bias")
        )
        assert (id(p) in ids(keep)) == no_decay, pname
    # the tied embedding is one parameter in the decay group
    assert id(model.backbone.embedding.weight) in ids(decay)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.05))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_no_decay_params_unchanged_by_decay_alone():
    model = LanguageModel(preset("tiny-mamba2", d_model=32, pattern="M", ssm={"headdim": 16}))
    opt = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (p.ndim >= 2 and not getattr(p, "_no_weight_decay", False)), n


def test_lr_schedule_values():
    w, total, m = 10, 110, 0.1
    assert lr_factor(0, w, total, m) == pytest.approx(0.1)
    assert lr_factor(4, w, total, m) == pytest.approx(0.5)
    assert lr_factor(9, w, total, m) == pytest.approx(1.0)
    assert lr_factor(10, w, total, m) == pytest.approx(1.0)
    mid = 10 + 99 / 2
    assert lr_factor(int(mid), w, total, m) == pytest.approx(
        m + (1 - m) * 0.5 * (1 + math.cos(math.pi * 49 / 99))
    )
    assert lr_factor(109, w, total, m) == pytest.approx(m)
    assert lr_factor(500, w, total, m) == pytest.approx(m)
    factors = [lr_factor(s, w, total, m) for s in range(total)]
    assert all(a <= b for a, b in zip(factors[:w], factors[1:w]))  # rises in warmup
    assert all(a >= b for a, b in zip(factors[w:], factors[w + 1 :]))  # then never rises
    # through the scheduler: the lr used at step s is lr * factor(s)
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = build_scheduler(opt, OptimConfig(lr=2.0, warmup_steps=w, min_lr_ratio=m), total)
    for s in range(30):
        assert sched.get_last_lr()[0] == pytest.approx(2.0 * lr_factor(s, w, total, m))
        opt.step()
        sched.step()


def test_scheduler_built_at_a_resumed_step():
    cfg = OptimConfig(lr=0.5, warmup_steps=3, min_lr_ratio=0.2)
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 20, start_step=7)
    for s in range(7, 12):
        assert sched.get_last_lr()[0] == pytest.approx(0.5 * lr_factor(s, 3, 20, 0.2))
        assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0]
        opt.step()
        sched.step()
