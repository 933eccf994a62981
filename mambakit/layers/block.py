"""Pre-norm residual block: residual += hidden; hidden = mixer(norm(residual)), as in the official Mamba.

The add and the norm are fused in `ops.add_rms_norm`; the model applies the last add with `norm_f`.
"""

from __future__ import annotations

import torch
from torch import nn

from mambakit import ops
from mambakit.layers.norm import RMSNorm
from mambakit.layers.step_ops import step_ops


class Block(nn.Module):
    def __init__(
        self,
        d_model: int,
        mixer: nn.Module,
        norm_eps: float = 1e-5,
        residual_in_fp32: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model, norm_eps, device=device, dtype=dtype)
        self.mixer = mixer
        self.residual_in_fp32 = residual_in_fp32

    def _add_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None):
        return ops.add_rms_norm(hidden, residual, self.norm.weight, self.norm.eps, self.residual_in_fp32)

    def forward(
        self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None, **mixer_kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states, residual (batch, seqlen, d_model) (residual None in the first block) ->
        (mixer output, new residual). mixer_kwargs: seq_idx, cu_seqlens, cache."""
        normed, residual = self._add_norm(hidden_states, residual)
        return self.mixer(normed, **mixer_kwargs), residual

    def step(
        self, hidden_states: torch.Tensor, residual: torch.Tensor | None, cache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: (batch, 1, d_model) in and out; advances the mixer's `cache`. A mixer with a
        `block_step` (Mamba-1) may take the whole block's step as one fused op."""
        fused_step = getattr(self.mixer, "block_step", None)
        if fused_step is not None:
            out = fused_step(hidden_states, residual, self.norm, self.residual_in_fp32, cache)
            if out is not None:
                return out
        add_rms_norm = step_ops(hidden_states).add_rms_norm  # direct backend call on CPU
        normed, residual = add_rms_norm(
            hidden_states, residual, self.norm.weight, self.norm.eps, self.residual_in_fp32
        )
        return self.mixer.step(normed, cache), residual

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int, dtype=None, device=None, ssm_dtype=None
    ):
        """The mixer's decoding state (`ssm_dtype`: the SSM state's dtype, for SSM mixers)."""
        return self.mixer.allocate_inference_cache(
            batch_size, max_seqlen, dtype=dtype, device=device, ssm_dtype=ssm_dtype
        )
