"""Position-wise MLP layer of hybrid models: SwiGLU or squared-ReLU; it keeps no decoding state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mambakit.layers.packing import check_hidden, resolve_seq_idx

ACTIVATIONS = ("swiglu", "relu2")


class MLP(nn.Module):
    """fc1 -> activation -> fc2. swiglu: fc1 gives y | gate (d_intermediate each), out = fc2(y * silu(gate));
    relu2: out = fc2(relu(fc1(x)) ** 2). hidden (batch, seqlen, d_model) -> (batch, seqlen, d_model)."""

    def __init__(
        self,
        d_model: int,
        d_intermediate: int,
        activation: str = "swiglu",
        bias: bool = False,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if d_intermediate <= 0:
            raise ValueError(f"d_intermediate must be positive, got {d_intermediate}")
        kw = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.activation = activation
        self.layer_idx = layer_idx
        width = 2 * d_intermediate if activation == "swiglu" else d_intermediate
        self.fc1 = nn.Linear(d_model, width, bias=bias, **kw)
        self.fc2 = nn.Linear(d_intermediate, d_model, bias=bias, **kw)

    def forward(
        self,
        hidden_states: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: None = None,
    ) -> torch.Tensor:
        """Each position alone, so seq_idx, cu_seqlens and cache change nothing (they are still checked)."""
        check_hidden(hidden_states, self.d_model)
        resolve_seq_idx(seq_idx, cu_seqlens, hidden_states.shape[0], hidden_states.shape[1])
        h = self.fc1(hidden_states)
        if self.activation == "swiglu":
            y, gate = h.chunk(2, dim=-1)
            h = y * F.silu(gate)
        else:
            h = F.relu(h).square()
        return self.fc2(h)

    def step(self, hidden_states: torch.Tensor, cache: None = None) -> torch.Tensor:
        check_hidden(hidden_states, self.d_model, step=True)
        return self.forward(hidden_states)

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int, dtype=None, device=None, ssm_dtype=None
    ) -> None:
        return None  # an MLP keeps no state
