"""Mamba-1 mixer (Gu & Dao 2023): gated selective SSM block with a causal depthwise conv.

Data flow, shapes (batch, seqlen, ...):
    in_proj: hidden (d_model) -> x, z (d_inner each)
    x = silu(causal_conv1d(x))
    x_proj: x -> dt_low (dt_rank), B, C (d_state each);  dt = dt_proj.weight @ dt_low
    y = selective_scan(x, dt, A = -exp(A_log), B, C, D, z, dt_bias = dt_proj.bias, softplus)
    out_proj: y (d_inner) -> d_model
Parameter names follow the official state-spaces checkpoints.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mambakit import ops
from mambakit.layers.packing import check_hidden, check_state_batch, resolve_seq_idx
from mambakit.layers.ssm_init import (
    cache_ssm_dtype,
    dt_bias_init,
    no_reinit,
    no_weight_decay,
    state_dtype,
)
from mambakit.layers.state import MambaState
from mambakit.layers.step_ops import fused_block_step, fused_step_applies, step_ops

# The unfused step applies dt_proj inside the state update (one GEMV kernel less a token) while
# batch * d_inner * dt_rank, the weight elements that kernel reads (once per row), stays at most this.
# H200, bf16, graph replay (docs/benchmarks.md, tenth session): 1.4B (4096 x 128) batch 64 3.22 ms
# in the step vs 2.66 as a GEMM, batch 16 2.21 vs 2.16; 130M (1536 x 48) batch 64 0.72 vs 0.75,
# batch 16 0.61 vs 0.66.
DT_PROJ_IN_STEP_MAX_ELEMENTS = 6 * 2**20


class Mamba1(nn.Module):
    fused_step_batch_width = 3072  # see layers/step_ops.fused_step_applies

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        if not (isinstance(self.dt_rank, int) and self.dt_rank > 0):
            raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **kw)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias, **kw
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **kw)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **kw)
        with torch.no_grad():
            bound = self.dt_rank**-0.5
            self.dt_proj.weight.uniform_(-bound, bound)
            self.dt_proj.bias.copy_(dt_bias_init(self.d_inner, dt_min, dt_max, dt_init_floor, device=device))
        # S4D-real: A[d, n] = -(n + 1) for every channel
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A).to(dtype or torch.float32))
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device, dtype=dtype or torch.float32))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **kw)
        no_weight_decay(self.A_log, self.D, self.dt_proj.bias)
        no_reinit(self.dt_proj.weight, self.dt_proj.bias)

    def _conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight[:, 0, :]  # (d_inner, d_conv)

    def _ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (..., d_inner) -> dt (..., d_inner) without bias, B and C (..., 1, d_state)."""
        dt_low, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt_low, self.dt_proj.weight)  # the bias goes to the scan as dt_bias
        return dt, B.unsqueeze(-2), C.unsqueeze(-2)

    def _step_ssm_inputs(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A decoding step's x (batch, d_inner) -> (dt_low (batch, dt_rank), B, C (batch, 1, d_state),
        dt_proj's weight): the step op applies dt_proj itself. At large batch (DT_PROJ_IN_STEP_MAX_ELEMENTS)
        it returns (dt (batch, d_inner), B, C, None) instead: the step op's kernel reads dt_proj's
        weight once per row, where one GEMM over the batch reads it once."""
        dt_low, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if x.shape[0] * self.dt_proj.weight.numel() > DT_PROJ_IN_STEP_MAX_ELEMENTS:
            return F.linear(dt_low, self.dt_proj.weight), B.unsqueeze(-2), C.unsqueeze(-2), None
        return dt_low, B.unsqueeze(-2), C.unsqueeze(-2), self.dt_proj.weight

    def forward(
        self,
        hidden_states: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: MambaState | None = None,
    ) -> torch.Tensor:
        """hidden_states (batch, seqlen, d_model) -> (batch, seqlen, d_model).

        With `cache` (from `allocate_inference_cache`) this is a prefill: it continues from the
        cached state when the cache has consumed tokens and writes the final state back.
        seq_idx (batch, seqlen) or cu_seqlens (nseqs + 1,) mark packed documents.
        """
        check_hidden(hidden_states, self.d_model)
        batch, seqlen, _ = hidden_states.shape
        seq_idx = resolve_seq_idx(seq_idx, cu_seqlens, batch, seqlen)
        conv_init = ssm_init = None
        if cache is not None:
            check_state_batch("cache", cache.ssm_state.shape[0], batch)
            if cache.seqlen_offset > 0:
                # clones: the buffers are overwritten below and may be saved for backward
                conv_init = cache.conv_state.clone()
                ssm_init = cache.ssm_state.to(state_dtype(self.A_log.dtype), copy=True)  # scans take fp32
        want_state = cache is not None

        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)
        conv = ops.causal_conv1d(
            x, self._conv_weight(), self.conv1d.bias, "silu", conv_init, want_state, seq_idx
        )
        x, conv_final = conv if want_state else (conv, None)
        dt, B, C = self._ssm_inputs(x)
        A = -torch.exp(self.A_log.to(state_dtype(self.A_log.dtype)))
        scan = ops.selective_scan(
            x, dt, A, B, C, self.D, z, self.dt_proj.bias, True, ssm_init, want_state, seq_idx
        )
        y, ssm_final = scan if want_state else (scan, None)
        if cache is not None:
            with torch.no_grad():
                cache.conv_state.copy_(conv_final)
                cache.ssm_state.copy_(ssm_final)
            cache.seqlen_offset += seqlen
        return self.out_proj(y)

    def step(self, hidden_states: torch.Tensor, cache: MambaState) -> torch.Tensor:
        """One token: hidden_states (batch, 1, d_model) -> (batch, 1, d_model); advances `cache` in place."""
        check_hidden(hidden_states, self.d_model, step=True)
        check_state_batch("cache", cache.ssm_state.shape[0], hidden_states.shape[0])
        step = step_ops(hidden_states)  # direct backend calls on CPU: see layers/step_ops.py
        x, z = self.in_proj(hidden_states[:, 0]).chunk(2, dim=-1)
        x = step.causal_conv1d_update(x, cache.conv_state, self._conv_weight(), self.conv1d.bias, "silu")
        dt, B, C, dt_proj_weight = self._step_ssm_inputs(x)
        # A = -exp(A_log) (see Mamba2.step) and dt = dt_proj(dt_low) are formed inside the step: on a GPU
        # that is one kernel where there were five
        y = step.selective_state_update(
            cache.ssm_state, x, dt, self.A_log, B, C, self.D, z, self.dt_proj.bias, True, A_is_log=True,
            dt_proj_weight=dt_proj_weight,
        )  # fmt: skip
        cache.seqlen_offset += 1
        return self.out_proj(y).unsqueeze(1)

    def block_step(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
        norm: nn.Module,
        residual_in_fp32: bool,
        cache: MambaState,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The enclosing pre-norm block's step (residual add, `norm`, this layer) as one op,
        `ops.mamba1_block_step`: (batch, 1, d_model) in and out, like `Block.step`. Returns None where
        that op does not apply, and the block then takes its unfused step."""
        if not fused_step_applies(self, hidden_states, residual, cache):
            return None
        return fused_block_step(
            ops.mamba1_block_step, self.d_model, hidden_states, residual, cache, norm.weight, norm.eps,
            residual_in_fp32, self.in_proj.weight, cache.conv_state, self._conv_weight(), self.conv1d.bias,
            self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias, self.A_log, self.D, cache.ssm_state,
            self.out_proj.weight,
        )  # fmt: skip

    def allocate_inference_cache(
        self,
        batch_size: int,
        max_seqlen: int,
        dtype: torch.dtype | None = None,
        device=None,
        ssm_dtype: torch.dtype | None = None,
    ) -> MambaState:
        """Zero state: conv (batch, d_inner, d_conv - 1) in `dtype`, SSM (batch, d_inner, d_state) in
        `ssm_dtype`, default float32 (bfloat16 halves it; see `ops.selective_state_update`)."""
        device = device or self.out_proj.weight.device
        dtype = dtype or self.out_proj.weight.dtype
        return MambaState(
            conv_state=torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            ssm_state=torch.zeros(
                batch_size,
                self.d_inner,
                self.d_state,
                device=device,
                dtype=cache_ssm_dtype(self.A_log.dtype, ssm_dtype),
            ),
        )
