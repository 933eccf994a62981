"""Decoding steps through the Triton backend (the interpreter on CPU) equal the reference's steps.

This covers the fused decoding path end to end: the block's norm fused into the mixer's in-projection
(`Block.step` -> `step_projected`), Mamba-2's gated norm fused into its out-projection, and the final
norm fused into the LM head, with the Triton step kernels between them.
"""

from __future__ import annotations

import pytest
import torch

import mambakit.ops.norm_linear.triton.ops as norm_linear_triton
from tests.models.test_lm import CONFIGS, assert_close, ids, make


def _decode(model, tokens, prefill, monkeypatch, backend):
    monkeypatch.delenv("MAMBAKIT_BACKEND", raising=False)
    cache = model.allocate_inference_cache(tokens.shape[0], tokens.shape[1])
    outs = [model(tokens[:, :prefill], cache=cache)[:, -1:]]
    monkeypatch.setenv("MAMBAKIT_BACKEND", backend)
    for t in range(prefill, tokens.shape[1]):
        outs.append(model.step(tokens[:, t : t + 1], cache))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("kind", list(CONFIGS))
@torch.no_grad()
def test_triton_steps_equal_reference_steps(kind, monkeypatch):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokens = make(kind).to(dev), ids(2, 9).to(dev)
    calls = []
    real = norm_linear_triton._norm_linear_op
    monkeypatch.setattr(norm_linear_triton, "_norm_linear_op", lambda *a: calls.append(1) or real(*a))
    got = _decode(model, tokens, 6, monkeypatch, "triton")
    want = _decode(model, tokens, 6, monkeypatch, "reference")
    assert_close(got, want, tol=1e-4)
    # every step ran the fused kernel: the LM head, and the in-projection of each SSM block
    n_ssm = sum(c == "M" for c in model.config.pattern)
    n_gated = n_ssm if model.config.ssm.version == 2 else 0
    assert len(calls) == 3 * (1 + n_ssm + n_gated)
