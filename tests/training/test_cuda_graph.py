"""GraphedMicroStep: a forward + loss + backward replayed from a CUDA graph gives the eager step's loss
and gradients (accumulated over micro-batches, across steps with an optimizer in between), recaptures
per shape, and refuses what it cannot replay correctly."""

from __future__ import annotations

import pytest
import torch

from mambakit.models.lm import LanguageModel
from mambakit.models.presets import preset
from mambakit.training.cuda_graph import GraphedMicroStep
from mambakit.training.loss import lm_loss
from mambakit.training.trainer import train
from tests.training.conftest import tiny_config


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_needs_cuda():
    model = LanguageModel(preset("tiny-mamba2"))
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        GraphedMicroStep(model, lambda i, t, s: lm_loss(model, i, t, s))


def _pair(name: str):
    torch.manual_seed(0)
    eager = LanguageModel(preset(name), device="cuda")
    graphed = LanguageModel(preset(name), device="cuda")
    graphed.load_state_dict(eager.state_dict())
    return eager, graphed


def _loss_fn(model):
    def fn(inputs, targets, seq_idx=None):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return lm_loss(model, inputs, targets, seq_idx)

    return fn


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-mamba1", "tiny-mamba2", "hybrid-tiny"])
def test_graphed_steps_match_eager_gpu(name):
    eager, graphed = _pair(name)
    vocab = eager.config.vocab_size
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    opt_g = torch.optim.AdamW(graphed.parameters(), lr=1e-3)
    step = GraphedMicroStep(graphed, _loss_fn(graphed), vocab_size=vocab)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for it in range(3):
        # two micro-batches a step; the second step's last one has another length (a second graph)
        shapes = [(2, 64), (2, 64) if it != 1 else (2, 48)]
        losses_e, losses_g = [], []
        for b, l in shapes:
            ids = torch.randint(0, vocab, (b, l + 1), device="cuda", generator=gen)
            seq_idx = (torch.arange(l, device="cuda") >= l // 3).int().expand(b, l).contiguous()
            le = _loss_fn(eager)(ids[:, :-1], ids[:, 1:], seq_idx)
            (le * 0.01).backward()
            losses_e.append(le.detach())
            losses_g.append(step(0.01, ids[:, :-1], ids[:, 1:], seq_idx))
        for a, b in zip(losses_g, losses_e):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for (n, pe), pg in zip(eager.named_parameters(), graphed.parameters()):
            assert pg.grad is not None and pg.grad.isfinite().all(), n
            torch.testing.assert_close(pg.grad, pe.grad, rtol=1e-4, atol=1e-6, msg=n)
        opt_e.step()
        opt_g.step()
        opt_e.zero_grad(set_to_none=True)
        opt_g.zero_grad(set_to_none=False)
    assert len(step._graphs) == 2


@pytest.mark.gpu
def test_graphed_step_refusals_gpu():
    _, model = _pair("tiny-mamba2")
    vocab = model.config.vocab_size
    step = GraphedMicroStep(model, _loss_fn(model), vocab_size=vocab)
    ids = torch.randint(0, vocab, (2, 33), device="cuda")
    with pytest.raises(ValueError, match="targets must lie in"):
        step(1.0, ids[:, :-1], torch.full_like(ids[:, 1:], vocab))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        step(1.0, torch.full_like(ids[:, :-1], vocab), ids[:, 1:])
    backwards = torch.arange(32, 0, -1, device="cuda").expand(2, 32).contiguous()
    with pytest.raises(ValueError, match="seq_idx must be non-decreasing"):
        step(1.0, ids[:, :-1], ids[:, 1:], backwards)
    with pytest.raises(ValueError, match="input_ids must be a CUDA tensor"):
        step(1.0, ids[:, :-1].cpu(), ids[:, 1:])
    step(1.0, ids[:, :-1], ids[:, 1:])
    for p in model.parameters():
        p.grad = None
    with pytest.raises(RuntimeError, match="zero the gradients in place"):
        step(1.0, ids[:, :-1], ids[:, 1:])


@pytest.mark.gpu
def test_trainer_cuda_graph_matches_eager_gpu(corpus, tmp_path):
    """`mambakit train` on CUDA with train.cuda_graph true and false: the same losses (the same kernels
    in the same order; 1e-5 allows for the autocast cache) over steps with two micro-batches."""
    runs = {}
    for flag in ("true", "false"):
        over = {"train.device": "cuda", "train.cuda_graph": flag, "train.sample_tokens": 0}
        runs[flag] = train(tiny_config(corpus, tmp_path / flag, **over))
    assert sorted(runs["true"].losses) == [1, 2, 3, 4, 5, 6]
    for s, v in runs["false"].losses.items():
        assert abs(runs["true"].losses[s] - v) <= 1e-5 * max(1.0, abs(v)), s


def test_trainer_cuda_graph_true_refuses_cpu(corpus, tmp_path):
    with pytest.raises(ValueError, match="train.cuda_graph = true cannot be used with device cpu"):
        train(tiny_config(corpus, tmp_path / "x", **{"train.device": "cpu", "train.cuda_graph": "true"}))
