"""Mamba-2 mixer (Dao & Gu 2024): multi-head SSD with one input projection and a gated RMSNorm.

Data flow, shapes (batch, seqlen, ...):
    in_proj: hidden (d_model) -> z (d_inner) | x (d_inner) | B, C (ngroups * d_state each) | dt (nheads)
    xBC = silu(causal_conv1d(x | B | C))
    y = ssd(x (nheads, headdim), dt, A = -exp(A_log), B, C (ngroups, d_state), D, dt_bias, softplus)
    y = gated_rms_norm(y, z) over groups of d_inner // ngroups channels
    out_proj: y (d_inner) -> d_model
Parameter names follow the official state-spaces checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mambakit import ops
from mambakit.layers.norm import GatedRMSNorm
from mambakit.layers.packing import check_hidden, check_state_batch, cu_seqlens_as_seq_idx
from mambakit.layers.ssm_init import cache_ssm_dtype, dt_bias_init, no_weight_decay, state_dtype
from mambakit.layers.state import MambaState
from mambakit.layers.step_ops import fused_block_step, fused_step_applies, step_ops


class Mamba2(nn.Module):
    fused_step_batch_width = 2048  # see layers/step_ops.fused_step_applies

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, math.inf),
        chunk_size: int = 256,
        conv_bias: bool = True,
        bias: bool = False,
        norm_before_gate: bool = False,
        norm_eps: float = 1e-5,
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
        if headdim <= 0 or self.d_inner % headdim != 0:
            raise ValueError(f"headdim={headdim} must divide d_inner = expand * d_model = {self.d_inner}")
        self.headdim = headdim
        self.nheads = self.d_inner // headdim
        if ngroups <= 0 or self.nheads % ngroups != 0:
            raise ValueError(f"ngroups={ngroups} must divide nheads = d_inner / headdim = {self.nheads}")
        lo, hi = A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {A_init_range!r}")
        self.ngroups = ngroups
        self.dt_limit = tuple(dt_limit)
        self.chunk_size = chunk_size
        self.layer_idx = layer_idx
        self.conv_dim = self.d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=bias, **kw)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            d_conv,
            groups=self.conv_dim,
            padding=d_conv - 1,
            bias=conv_bias,
            **kw,
        )
        self.dt_bias = nn.Parameter(dt_bias_init(self.nheads, dt_min, dt_max, dt_init_floor, **kw))
        A = torch.empty(self.nheads, device=device, dtype=torch.float32).uniform_(lo, hi)
        self.A_log = nn.Parameter(torch.log(A).to(dtype or torch.float32))
        self.D = nn.Parameter(torch.ones(self.nheads, device=device, dtype=dtype or torch.float32))
        self.norm = GatedRMSNorm(self.d_inner, norm_eps, self.d_inner // ngroups, norm_before_gate, **kw)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **kw)
        no_weight_decay(self.A_log, self.D, self.dt_bias)

    def _conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight[:, 0, :]  # (conv_dim, d_conv)

    def _split_xbc(self, xBC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., conv_dim) -> x (..., nheads, headdim), B and C (..., ngroups, d_state)."""
        gn = self.ngroups * self.d_state
        x, B, C = xBC.split([self.d_inner, gn, gn], dim=-1)
        lead = xBC.shape[:-1]
        return (
            x.reshape(*lead, self.nheads, self.headdim),
            B.reshape(*lead, self.ngroups, self.d_state),
            C.reshape(*lead, self.ngroups, self.d_state),
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: MambaState | None = None,
    ) -> torch.Tensor:
        """hidden_states (batch, seqlen, d_model) -> (batch, seqlen, d_model).

        With `cache` this is a prefill (continuing from the cached state when it has consumed
        tokens) that writes the final conv and SSM states back. seq_idx (batch, seqlen) or
        cu_seqlens (nseqs + 1,) (batch 1, not with a cache) mark packed documents.
        """
        check_hidden(hidden_states, self.d_model)
        batch, seqlen, _ = hidden_states.shape
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("cu_seqlens cannot be combined with cache: use seq_idx for a packed prefill")
            if seq_idx is not None:
                raise ValueError("pass either seq_idx or cu_seqlens, not both")
        conv_init = ssm_init = None
        if cache is not None:
            check_state_batch("cache", cache.ssm_state.shape[0], batch)
            if cache.seqlen_offset > 0:
                # clones: the buffers are overwritten below and may be saved for backward
                conv_init = cache.conv_state.clone()
                ssm_init = cache.ssm_state.to(state_dtype(self.A_log.dtype), copy=True)  # scans take fp32
        want_state = cache is not None
        # the conv takes document ids only; the scan takes cu_seqlens itself
        conv_seq_idx = seq_idx
        if cu_seqlens is not None:
            conv_seq_idx = cu_seqlens_as_seq_idx(cu_seqlens, batch, seqlen)

        z, xBC, dt = self.in_proj(hidden_states).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        conv = ops.causal_conv1d(
            xBC, self._conv_weight(), self.conv1d.bias, "silu", conv_init, want_state, conv_seq_idx
        )
        xBC, conv_final = conv if want_state else (conv, None)
        x, B, C = self._split_xbc(xBC)
        A = -torch.exp(self.A_log.to(state_dtype(self.A_log.dtype)))
        scan = ops.ssd(
            x, dt, A, B, C, self.chunk_size, self.D, None, self.dt_bias, True, self.dt_limit,
            ssm_init, want_state, seq_idx, cu_seqlens,
        )  # fmt: skip
        y, ssm_final = scan if want_state else (scan, None)
        if cache is not None:
            with torch.no_grad():
                cache.conv_state.copy_(conv_final)
                cache.ssm_state.copy_(ssm_final)
            cache.seqlen_offset += seqlen
        y = self.norm(y.reshape(batch, seqlen, self.d_inner), z)
        return self.out_proj(y)

    def step(self, hidden_states: torch.Tensor, cache: MambaState) -> torch.Tensor:
        """One token: hidden_states (batch, 1, d_model) -> (batch, 1, d_model); advances `cache` in place."""
        check_hidden(hidden_states, self.d_model, step=True)
        batch = hidden_states.shape[0]
        check_state_batch("cache", cache.ssm_state.shape[0], batch)
        step = step_ops(hidden_states)  # direct backend calls on CPU: see layers/step_ops.py
        z, xBC, dt = self.in_proj(hidden_states[:, 0]).split(
            [self.d_inner, self.conv_dim, self.nheads], dim=-1
        )
        xBC = step.causal_conv1d_update(xBC, cache.conv_state, self._conv_weight(), self.conv1d.bias, "silu")
        x, B, C = self._split_xbc(xBC)
        # A = -exp(A_log) is formed inside the step: on a GPU that saves a cast, an exp and a negation
        # kernel a layer and token; never cached, so in-place writes to A_log are always seen
        y = step.ssd_state_update(
            cache.ssm_state, x, dt, self.A_log, B, C, self.D, None, self.dt_bias, True, self.dt_limit,
            A_is_log=True,
        )  # fmt: skip
        cache.seqlen_offset += 1
        n = self.norm
        y = step.gated_rms_norm(
            y.reshape(batch, self.d_inner), z, n.weight, n.eps, n.group_size, n.norm_before_gate
        )
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
        `ops.mamba2_block_step`: (batch, 1, d_model) in and out, like `Block.step`. Returns None where
        that op does not apply (`layers.step_ops.fused_step_applies`); the block then steps unfused."""
        if not fused_step_applies(self, hidden_states, residual, cache):
            return None
        n = self.norm
        return fused_block_step(
            ops.mamba2_block_step, self.d_model, hidden_states, residual, cache, norm.weight, norm.eps,
            residual_in_fp32, self.in_proj.weight, cache.conv_state, self._conv_weight(), self.conv1d.bias,
            self.dt_bias, self.A_log, self.D, self.dt_limit, cache.ssm_state, self.ngroups, n.weight, n.eps,
            n.group_size, n.norm_before_gate, self.out_proj.weight,
        )  # fmt: skip

    def allocate_inference_cache(
        self,
        batch_size: int,
        max_seqlen: int,
        dtype: torch.dtype | None = None,
        device=None,
        ssm_dtype: torch.dtype | None = None,
    ) -> MambaState:
        """Zero state: conv (batch, conv_dim, d_conv - 1) in `dtype`; SSM (batch, nheads, headdim,
        d_state) in `ssm_dtype`, default float32 (bfloat16 halves it; see `ops.ssd_state_update`)."""
        device = device or self.out_proj.weight.device
        dtype = dtype or self.out_proj.weight.dtype
        return MambaState(
            conv_state=torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            ssm_state=torch.zeros(
                batch_size,
                self.nheads,
                self.headdim,
                self.d_state,
                device=device,
                dtype=cache_ssm_dtype(self.A_log.dtype, ssm_dtype),
            ),
        )
