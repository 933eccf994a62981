"""The trainer's loss (`training/loss.py`): the chunked linear cross-entropy through the model's final-normed
hidden states gives the loss and every parameter's gradient of the full-logits F.cross_entropy path."""

from __future__ import annotations

import pytest
import torch

from mambakit.models import LanguageModel, preset
from mambakit.training.data import IGNORE_INDEX
from mambakit.training.loss import lm_loss, unwrap


def _model(seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    # vocab 61 pads the embedding to 64 rows: the padded rows must stay out of the loss
    config = preset("hybrid-tiny", d_model=32, vocab_size=61, pattern="M*-M", ssm={"d_state": 8})
    config.attn.num_heads, config.attn.num_kv_heads, config.mlp.d_intermediate = 2, 1, 32
    model = LanguageModel(config)
    assert config.padded_vocab_size > config.vocab_size
    return model


def _batch(batch: int = 2, seqlen: int = 24):
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 61, (batch, seqlen), generator=g)
    targets = torch.randint(0, 61, (batch, seqlen), generator=g)
    targets[:, ::7] = IGNORE_INDEX
    seq_idx = torch.tensor([[0] * 10 + [1] * 14, [0] * seqlen])
    return input_ids, targets, seq_idx


def _loss_and_grads(model, full_logits, autocast, reduction="sum", chunk_size=16):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = lm_loss(model, *_batch(), reduction=reduction, full_logits=full_logits, chunk_size=chunk_size)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("autocast, tol", [(False, 1e-5), (True, 2e-2)], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_chunked_loss_equals_full_logits(autocast, tol, reduction):
    model = _model()
    loss, grads = _loss_and_grads(model, False, autocast, reduction)
    want_loss, want_grads = _loss_and_grads(model, True, autocast, reduction)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss, rtol=tol, atol=0)
    assert grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        err = float((grads[name] - want).abs().max() / want.abs().max().clamp(min=1e-12))
        assert err <= tol, f"{name}: relative error {err:.1e}"
    vocab = model.config.vocab_size
    assert (grads["backbone.embedding.weight"][vocab:] == 0).all()  # tied head: padded rows untouched


def test_return_hidden_states_is_the_head_input():
    model = _model().eval()
    input_ids, _, seq_idx = _batch()
    with torch.no_grad():
        hidden = model(input_ids, seq_idx=seq_idx, return_hidden_states=True)
        logits = model(input_ids, seq_idx=seq_idx)
    assert hidden.shape == (2, 24, 32)
    torch.testing.assert_close(model.lm_head(hidden)[..., : model.config.vocab_size], logits)


def test_unwrap():
    """DDP keeps the model as `.module`; a plain (or FSDP2-sharded) model is its own LanguageModel."""
    model = _model()
    assert unwrap(model) is model

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap(Wrapper(model)) is model
