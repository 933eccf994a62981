"""The five small models the synthetic tasks compare, as `LanguageModel`s of mambakit's own layers.

- "mamba1": Mamba-1 (S6): Δ, B, C computed from the input at every position (selective).
- "lti": the LTI ablation of Mamba-1 (S4D-like, the Mamba paper's "S4" layer inside the Mamba block):
  the same block, but Δ, B, C are learned parameters independent of the input (`LTIMamba1`).
- "mamba2": Mamba-2 (SSD).
- "hybrid": Mamba-2 layers with one attention layer (no position embedding, as in the hybrid paper:
  the SSM layer before it gives position information).
- "attention": an attention-only Transformer (attention + MLP blocks). Attention by itself is blind to
  order, so this one needs positions: rotary embeddings on every head dimension (RoPE, the usual choice
  of current Transformers and one of the Mamba paper's induction-heads baselines).

Every model has `n_layers` sequence mixers of width `d_model`; the attention-only model interleaves an
MLP after each attention layer, as a Transformer does.
"""

from __future__ import annotations

import torch
from torch import nn

from mambakit.layers import Mamba1
from mambakit.models.config import AttentionConfig, MLPConfig, ModelConfig, SSMConfig
from mambakit.models.lm import LanguageModel

MODEL_NAMES = ("mamba1", "lti", "mamba2", "hybrid", "attention")


class LTIMamba1(Mamba1):
    """Mamba-1 block whose SSM is linear time-invariant: Δ = softplus(dt_bias), B and C are parameters.

    Per channel d: A (d_state,), B[d], C[d] (d_state,) and Δ[d] are the same at every position (S4D with a
    diagonal real A). The scan is `ops.selective_scan` with dt = 0 (so Δ = softplus(dt_proj.bias)) and
    B, C (d_inner, d_state) broadcast over batch and time as ngroups = d_inner groups of one channel.
    The input-dependent projections of Mamba-1 (x_proj, dt_proj.weight) are removed.
    """

    def __init__(self, d_model: int, *args, **kwargs) -> None:
        super().__init__(d_model, *args, **kwargs)
        del self.x_proj
        device, dtype = self.D.device, self.D.dtype
        self.dt_proj.weight.requires_grad_(False)  # unused: kept only so the parameter names match Mamba1
        # S4D-style init: B = 1, C ~ N(0, 1/d_state)
        self.B = nn.Parameter(torch.ones(self.d_inner, self.d_state, device=device, dtype=dtype))
        self.C = nn.Parameter(
            torch.randn(self.d_inner, self.d_state, device=device, dtype=dtype) * self.d_state**-0.5
        )
        for p in (self.B, self.C):
            p._no_reinit = True

    def _ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (..., d_inner) -> dt zeros (..., d_inner), B and C (..., d_inner, d_state), time-invariant."""
        shape = x.shape[:-1] + (self.d_inner, self.d_state)
        dt = torch.zeros_like(x)
        return dt, self.B.to(x.dtype).expand(shape), self.C.to(x.dtype).expand(shape)

    def _step_ssm_inputs(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The time-invariant inputs for a decoding step: dt itself (zeros), no dt projection."""
        return *self._ssm_inputs(x), None


def task_model_config(
    name: str, vocab_size: int, d_model: int = 64, n_layers: int = 2, d_state: int | None = None
) -> ModelConfig:
    """The ModelConfig of task model `name` (for "lti" the Mamba-1 config, see `build_task_model`).

    d_state None: 16 for Mamba-1 and the LTI model (the Mamba paper's), 64 for Mamba-2 and the hybrid.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}")
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    if name == "hybrid" and n_layers < 2:
        raise ValueError(f"n_layers must be >= 2 for the hybrid (an SSM then attention), got {n_layers}")
    heads = max(1, d_model // 32)
    attn = AttentionConfig(num_heads=heads, rotary_emb_dim=0)
    if name in ("mamba1", "lti"):
        ssm = SSMConfig(version=1, d_state=d_state or 16)
        pattern = "M" * n_layers
    else:
        ssm = SSMConfig(version=2, d_state=d_state or 64, headdim=min(64, 2 * d_model // 4), chunk_size=64)
        if name == "mamba2":
            pattern = "M" * n_layers
        elif name == "hybrid":
            # attention second from the end, SSM first: "M*" for 2 layers, "MM*M" for 4
            pattern = "M" * (n_layers - 2) + "M*" if n_layers <= 3 else "M" * (n_layers - 2) + "*M"
        else:
            pattern = "*-" * n_layers
            attn = AttentionConfig(num_heads=heads, rotary_emb_dim=d_model // heads)
    return ModelConfig(
        d_model=d_model,
        vocab_size=vocab_size,
        pattern=pattern,
        ssm=ssm,
        attn=attn,
        mlp=MLPConfig(d_intermediate=2 * d_model),
    )


def build_task_model(
    name: str, vocab_size: int, d_model: int = 64, n_layers: int = 2, d_state: int | None = None
) -> LanguageModel:
    """A freshly initialized task model (see the module docstring for the five `name`s)."""
    config = task_model_config(name, vocab_size, d_model, n_layers, d_state)
    model = LanguageModel(config)
    if name == "lti":
        s = config.ssm
        for i, block in enumerate(model.backbone.layers):
            block.mixer = LTIMamba1(
                d_model, s.d_state, s.d_conv, s.expand, s.dt_rank, s.dt_min, s.dt_max, s.dt_init_floor,
                s.conv_bias, s.bias, layer_idx=i,
            )  # fmt: skip
        model.init_weights()
    return model
