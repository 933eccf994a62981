"""Run under torchrun (gloo, CPU): tensor-parallel and context-parallel Mamba-1, Mamba-2 and hybrid
language models against the one-process model with the same weights and data: logits, loss, every
parameter's gradient (TP: gathered to full tensors; CP: summed over ranks), and a few SGD steps
(losses and final weights); TP prefill and decoding steps; errors that name the argument.
Packed documents (seq_idx) are used throughout."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mambakit.models import LanguageModel
from mambakit.models.presets import preset
from mambakit.parallel.context_parallel_model import parallelize_context, sum_gradients
from mambakit.parallel.tensor_parallel import clip_grad_norm_, gather_full, parallelize_tensor
from tests.parallel.common import check_close, finish, make_seq_idx, setup

BATCH, SEQLEN, STEPS = 2, 32, 3


def configs(world: int):
    """Small models whose head, group and channel counts divide by 2 and 4."""
    return {
        "mamba1": preset("tiny-mamba1", pattern="MM", ssm={"bias": True}),
        "mamba2": preset("tiny-mamba2", pattern="MM", ssm={"ngroups": 4}),
        "hybrid": preset(
            "hybrid-tiny",
            ssm={"ngroups": 4},
            attn={
                "num_heads": 8,
                "num_kv_heads": 4,
                "head_dim": 8,
                "rotary_emb_dim": 4,
                "qkv_bias": True,
                "out_bias": True,
            },
            mlp={"activation": "swiglu", "d_intermediate": 64},
        ),  # fmt: skip
    }


def _batch(step: int, vocab: int, world: int):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, vocab, (BATCH, SEQLEN + 1), generator=g)
    seq_idx = make_seq_idx("inside" if step % 2 == 0 else "boundaries", BATCH, SEQLEN, world)
    return ids[:, :-1], ids[:, 1:], seq_idx


def _loss_sum(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / (BATCH * SEQLEN)


def _optimizer(model):
    # SGD with momentum: its update is linear in the gradient, so rounding-level gradient differences
    # stay rounding-level (Adam's first steps are ~lr * sign(grad) and turn 1e-9 noise on near-zero
    # gradients into lr-sized differences, in the one-process model as much as in the parallel one)
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


def _reference(config):
    torch.manual_seed(0)
    return LanguageModel(config)


def tp_case(name, config, world, group):
    ref = _reference(config)
    model = parallelize_tensor(copy.deepcopy(ref), group)
    opt_ref = _optimizer(ref)
    opt = _optimizer(model)
    for step in range(STEPS):
        ids, targets, seq_idx = _batch(step, config.vocab_size, world)
        want = ref(ids, seq_idx=seq_idx)
        got = model(ids, seq_idx=seq_idx)
        check_close(f"TP {name} step {step} logits", got, want)
        loss_ref, loss = _loss_sum(want, targets), _loss_sum(got, targets)
        check_close(f"TP {name} step {step} loss", loss, loss_ref)
        loss_ref.backward()
        loss.backward()
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        check_close(f"TP {name} step {step} grad norm", clip_grad_norm_(model, 0.05), norm_ref)
        if step == 0:
            grads = gather_full({n: p.grad for n, p in model.named_parameters()}, model.tp_plan, group)
            for n, p in ref.named_parameters():
                check_close(f"TP {name} grad {n}", grads[n], p.grad)
        opt_ref.step(), opt.step()
        opt_ref.zero_grad(), opt.zero_grad()
    weights = gather_full({n: p.detach() for n, p in model.named_parameters()}, model.tp_plan, group)
    for n, p in ref.named_parameters():
        check_close(f"TP {name} trained {n}", weights[n], p.detach())


def tp_decode_case(name, config, world, group):
    """Prefill then one-token steps: the hooks sit on the projections, so `step` is parallel too."""
    ref = _reference(config)
    model = parallelize_tensor(copy.deepcopy(ref), group)
    ids, _, _ = _batch(0, config.vocab_size, world)
    with torch.no_grad():
        caches = [m.allocate_inference_cache(BATCH, SEQLEN) for m in (ref, model)]
        want = ref(ids[:, :8], cache=caches[0])
        check_close(f"TP {name} prefill", model(ids[:, :8], cache=caches[1]), want)
        for t in range(8, 11):
            want = ref.step(ids[:, t : t + 1], caches[0])
            check_close(f"TP {name} step {t}", model.step(ids[:, t : t + 1], caches[1]), want)


def error_cases(rank, world, group):
    """Bad layouts and inputs are errors that name the argument."""
    bad = preset("tiny-mamba2", pattern="M", ssm={"ngroups": 1})
    _expect(ValueError, "ngroups=1", lambda: parallelize_tensor(LanguageModel(bad), group))
    model = parallelize_context(LanguageModel(configs(world)["mamba2"]), group)
    ids = torch.zeros(1, 4, dtype=torch.long)
    cu = torch.tensor([0, 2, 4])
    _expect(ValueError, "cu_seqlens", lambda: model(ids, cu_seqlens=cu))
    _expect(ValueError, "seqlen >= width - 1", lambda: model(ids[:, :2]))
    _expect(ValueError, "already context-parallel", lambda: parallelize_context(model, group))
    tp = parallelize_tensor(LanguageModel(configs(world)["mamba2"]), group)
    _expect(ValueError, "already tensor-parallel", lambda: parallelize_tensor(tp, group))


def _expect(kind, text, fn):
    try:
        fn()
    except kind as e:
        assert text in str(e), f"rank {dist.get_rank()}: {text!r} not in {e}"
        return
    raise AssertionError(f"rank {dist.get_rank()}: expected {kind.__name__} mentioning {text!r}")


def cp_case(name, config, rank, world, group):
    ref = _reference(config)
    model = parallelize_context(copy.deepcopy(ref), group)
    opt_ref = _optimizer(ref)
    opt = _optimizer(model)
    lo, hi = rank * SEQLEN // world, (rank + 1) * SEQLEN // world
    for step in range(STEPS):
        ids, targets, seq_idx = _batch(step, config.vocab_size, world)
        want = ref(ids, seq_idx=seq_idx)
        got = model(ids[:, lo:hi], seq_idx=seq_idx[:, lo:hi])
        check_close(f"CP {name} step {step} logits", got, want[:, lo:hi])
        loss_ref, loss = _loss_sum(want, targets), _loss_sum(got, targets[:, lo:hi])
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
        check_close(f"CP {name} step {step} loss", total, loss_ref.detach())
        loss_ref.backward()
        loss.backward()
        sum_gradients(model, group)
        if step == 0:
            grads = dict(model.named_parameters())
            for n, p in ref.named_parameters():
                check_close(f"CP {name} grad {n}", grads[n].grad, p.grad)
        opt_ref.step(), opt.step()
        opt_ref.zero_grad(), opt.zero_grad()
    for (n, p), q in zip(ref.named_parameters(), model.parameters()):
        check_close(f"CP {name} trained {n}", q.detach(), p.detach())


if __name__ == "__main__":
    rank, world, group = setup()
    for name, config in configs(world).items():
        tp_case(name, config, world, group)
        tp_decode_case(name, config, world, group)
        cp_case(name, config, rank, world, group)
    error_cases(rank, world, group)
    finish(f"models OK on {world} ranks")
