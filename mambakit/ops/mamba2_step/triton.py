"""Triton backend of `mamba2_block_step`: a Mamba-2 block's decoding step in three kernels.

The unfused block is about six kernels a token (norm, in_proj, conv, state update, gated norm,
out_proj), each a few microseconds at batch 1 whatever its work. Here (as in `ops/mamba1_step`):
1. `_in_conv_kernel`: residual add and RMS norm (every program recomputes them from the (d_model,) row;
   program 0 writes the new residual), a block of in_proj's rows (z | xBC | dt), and for the xBC rows the
   depthwise conv step with SiLU (conv state updated in place);
2. `_state_kernel`: per (head, block of headdim): softplus and dt_limit, the SSD state update and
   y = C h + D x;
3. `_gated_norm_out_kernel`: the gated RMS norm (every program recomputes the group statistics from the
   (d_inner,) row) and a block of out_proj's rows.
No atomics (deterministic); every GEMV tile is the whole input row in one load, the weights loaded
first (see `ops/_step_tiles.py`). Values are rounded to the model's dtype where the unfused ops return.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mambakit.ops._eager import EagerOp
from mambakit.ops._launch import next_power_of_2, use_pdl
from mambakit.ops._step_tiles import tile_rows, tile_warps
from mambakit.ops._triton_step import add_norm_row, conv_silu_step, wait_for_inputs
from mambakit.ops.norm.reference import residual_dtype
from mambakit.ops.selective_scan.triton.scan_fwd import _softplus


@triton.jit
def _in_conv_kernel(
    hid_ptr, res_ptr, res_out_ptr, nw_ptr, W_in_ptr, cs_ptr, cw_ptr, cb_ptr, out_ptr,
    eps, d_model, d_inner, conv_dim, n_rows, d_conv, s_cs_b, s_cs_d, s_cs_w,
    HAS_RES: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    DT = W_in_ptr.dtype.element_ty
    k = tl.arange(0, BLOCK_K)
    ok = k < d_model
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    ok_r = offs_r < n_rows
    w = tl.load(
        W_in_ptr + offs_r[:, None] * d_model + k[None, :], mask=ok_r[:, None] & ok[None, :], other=0.0
    )
    wait_for_inputs(USE_PDL)
    normed = add_norm_row(hid_ptr, res_ptr, res_out_ptr, nw_ptr, b, k, ok, d_model, eps, pid == 0,
                          HAS_RES, DT)  # fmt: skip
    val = tl.sum(w.to(tl.float32) * normed[None, :], 1).to(DT).to(tl.float32)

    # rows d_inner .. d_inner + conv_dim are xBC: their conv step (other rows pass through)
    c = offs_r - d_inner
    is_conv = ok_r & (c >= 0) & (c < conv_dim)
    xc = conv_silu_step(cs_ptr, cw_ptr, cb_ptr, b, c, is_conv, val, d_conv, s_cs_b, s_cs_d, s_cs_w,
                        HAS_CONV_BIAS, BLOCK_W, DT)  # fmt: skip
    tl.store(out_ptr + b * n_rows + offs_r, tl.where(is_conv, xc, val), mask=ok_r)


@triton.jit
def _state_kernel(
    zxbcdt_ptr, dt_bias_ptr, A_log_ptr, D_ptr, h_ptr, y_ptr,
    dt_lo, dt_hi, d_inner, conv_dim, n_rows, nheads, headdim, dstate, heads_per_group, ngroups,
    s_h_b, s_h_h, s_h_p, s_h_n,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_LIMIT: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    nblk = tl.cdiv(headdim, BLOCK_P)
    head = pid // nblk
    g = head // heads_per_group
    offs_p = (pid % nblk) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok_p = offs_p < headdim
    offs_n = tl.arange(0, BLOCK_N)
    ok_n = offs_n < dstate
    ok_pn = ok_p[:, None] & ok_n[None, :]
    # the parameters and the state first (see wait_for_inputs)
    bias = tl.load(dt_bias_ptr + head).to(tl.float32)
    A = -tl.exp(tl.load(A_log_ptr + head).to(tl.float32))
    if HAS_D:
        if D_PER_CHANNEL:
            D = tl.load(D_ptr + head * headdim + offs_p, mask=ok_p, other=0.0).to(tl.float32)
        else:
            D = tl.load(D_ptr + head).to(tl.float32)
    h_ptrs = h_ptr + b * s_h_b + head * s_h_h + offs_p[:, None] * s_h_p + offs_n[None, :] * s_h_n
    h = tl.load(h_ptrs, mask=ok_pn, other=0.0).to(tl.float32)  # only this kernel writes it
    wait_for_inputs(USE_PDL)
    row = zxbcdt_ptr + b * n_rows
    x = tl.load(row + d_inner + head * headdim + offs_p, mask=ok_p, other=0.0)
    Bv = tl.load(row + 2 * d_inner + g * dstate + offs_n, mask=ok_n, other=0.0)
    Cv = tl.load(row + 2 * d_inner + (ngroups + g) * dstate + offs_n, mask=ok_n, other=0.0)
    delta = _softplus(tl.load(row + d_inner + conv_dim + head) + bias)
    if HAS_LIMIT:
        delta = tl.minimum(tl.maximum(delta, dt_lo), dt_hi)
    h = tl.exp(delta * A) * h + (delta * x)[:, None] * Bv[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=ok_pn)
    y = tl.sum(h * Cv[None, :], 1)
    if HAS_D:
        y += D * x
    tl.store(y_ptr + b * d_inner + head * headdim + offs_p, y.to(y_ptr.dtype.element_ty), mask=ok_p)


@triton.jit
def _gated_norm_out_kernel(
    y_ptr, zxbcdt_ptr, gw_ptr, W_out_ptr, out_ptr, eps, d_model, d_inner, n_rows, group_size, ngroups,
    NORM_BEFORE_GATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    DT = out_ptr.dtype.element_ty
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ok_m = offs_m < d_model
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_S)
    ok_gs = (offs_g[:, None] < ngroups) & (offs_s[None, :] < group_size)
    chan = offs_g[:, None] * group_size + offs_s[None, :]  # (BLOCK_G, BLOCK_S) channel index
    W = tl.load(W_out_ptr + offs_m[:, None, None] * d_inner + chan[None, :, :],
                mask=ok_m[:, None, None] & ok_gs[None, :, :], other=0.0)  # fmt: skip
    gw = tl.load(gw_ptr + chan, mask=ok_gs, other=0.0).to(tl.float32)
    wait_for_inputs(USE_PDL)
    y = tl.load(y_ptr + b * d_inner + chan, mask=ok_gs, other=0.0).to(tl.float32)
    z = tl.load(zxbcdt_ptr + b * n_rows + chan, mask=ok_gs, other=0.0)
    gate = z / (1.0 + tl.exp(-z))
    v = y if NORM_BEFORE_GATE else y * gate
    rstd = 1.0 / tl.sqrt(tl.sum(v * v, 1) / group_size + eps)
    normed = v * rstd[:, None] * gw
    if NORM_BEFORE_GATE:
        normed = normed * gate
    normed = normed.to(DT).to(tl.float32)
    out = tl.sum(tl.sum(W.to(tl.float32) * normed[None, :, :], 2), 1)
    tl.store(out_ptr + b * d_model + offs_m, out.to(DT), mask=ok_m)


# Tile choices, read at every call (benchmarks/gpu_block_step.py sweeps them). in_proj: `in_elems` the
# tile size a program aims at (at least 4 rows), `per_thread` elements a thread (sets the warps);
# out_proj: `out_rows` rows a program (at most `out_max_elems` a tile), on `out_warps` warps;
# headdim_block: headdim rows of a state-update program. Swept at batch 1 with PDL (H200,
# benchmarks/results/h200-2026-12-02 calls 2-3): per_thread 128 (1 warp for 4096-element in_proj
# tiles, not 2): 0.245 -> 0.217 ms at 130M, 1.230 -> 1.195 at 1.3B; out_proj tiles of 8 rows on 4
# warps were the best at both sizes (1.3B: 1.115 ms).
TILES = {"in_elems": 4096, "per_thread": 128, "out_rows": 8, "out_max_elems": 32768, "out_warps": 4,
         "headdim_block": 16}  # fmt: skip


def _block_step(
    hidden: torch.Tensor,
    residual: Optional[torch.Tensor],  # noqa: UP045
    norm_weight: torch.Tensor,
    norm_eps: float,
    residual_in_fp32: bool,
    in_proj_weight: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: Optional[torch.Tensor],  # noqa: UP045
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: Optional[torch.Tensor],  # noqa: UP045
    dt_limit: list[float],  # a custom op's schema takes no tuples
    ssm_state: torch.Tensor,
    ngroups: int,
    gate_norm_weight: torch.Tensor,
    gate_norm_eps: float,
    gate_group_size: int,
    norm_before_gate: bool,
    out_proj_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, d_model = hidden.shape
    _, nheads, headdim, dstate = ssm_state.shape
    d_inner = nheads * headdim
    conv_dim, d_conv = conv_weight.shape
    n_rows = in_proj_weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    hidden = hidden.contiguous()
    residual = None if residual is None else residual.contiguous()
    in_w, out_w, conv_w = in_proj_weight.contiguous(), out_proj_weight.contiguous(), conv_weight.contiguous()
    # the kernels index every vector with unit stride (contiguous() is free for parameters)
    norm_weight, gate_norm_weight = norm_weight.contiguous(), gate_norm_weight.contiguous()
    dt_bias, A_log = dt_bias.contiguous(), A_log.contiguous()
    conv_bias = None if conv_bias is None else conv_bias.contiguous()
    D = None if D is None else D.contiguous()
    res_out = torch.empty(batch, d_model, device=dev, dtype=residual_dtype(dtype, residual_in_fp32))

    block_k = next_power_of_2(d_model)
    # at least 4 rows a program: each program also reads the (d_model,) row for the norm, which for a
    # 1-row tile of the 2.7B preset (d_model 2560) would be ~2x its weight bytes (not measured there;
    # at 130M and 1.3B, 4 rows is the default's or measured equal to it)
    block_r = max(min(4, next_power_of_2(n_rows)), tile_rows(n_rows, block_k, TILES["in_elems"]))
    zxbcdt = torch.empty(batch, n_rows, device=dev, dtype=torch.float32)
    pdl = use_pdl(hidden)
    _in_conv_kernel[(triton.cdiv(n_rows, block_r), batch)](
        hidden, residual if residual is not None else hidden, res_out, norm_weight, in_w, conv_state, conv_w,
        conv_bias if conv_bias is not None else conv_w, zxbcdt, norm_eps, d_model, d_inner, conv_dim, n_rows,
        d_conv, conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        HAS_RES=residual is not None, HAS_CONV_BIAS=conv_bias is not None, BLOCK_R=block_r, BLOCK_K=block_k,
        BLOCK_W=next_power_of_2(d_conv), USE_PDL=pdl, launch_pdl=pdl,
        num_warps=tile_warps(block_r * block_k, TILES["per_thread"]),
    )  # fmt: skip

    y = torch.empty(batch, d_inner, device=dev, dtype=dtype)
    block_p = min(TILES["headdim_block"], next_power_of_2(headdim))
    lo, hi = dt_limit
    _state_kernel[(nheads * triton.cdiv(headdim, block_p), batch)](
        zxbcdt, dt_bias, A_log, D if D is not None else dt_bias, ssm_state, y,
        lo, hi, d_inner, conv_dim, n_rows, nheads, headdim, dstate, nheads // ngroups, ngroups,
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), ssm_state.stride(3),
        HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.ndim == 2,
        HAS_LIMIT=(lo, hi) != (0.0, float("inf")), BLOCK_P=block_p, BLOCK_N=next_power_of_2(dstate),
        USE_PDL=pdl, num_warps=4, launch_pdl=pdl,
    )  # fmt: skip

    out = torch.empty(batch, d_model, device=dev, dtype=dtype)
    groups = d_inner // gate_group_size
    block_g, block_s = next_power_of_2(groups), next_power_of_2(gate_group_size)
    # at most out_max_elems a tile (the largest measured; more would be > 256 weights a thread)
    block_m = min(TILES["out_rows"], tile_rows(d_model, block_g * block_s, TILES["out_max_elems"]))
    _gated_norm_out_kernel[(triton.cdiv(d_model, block_m), batch)](
        y, zxbcdt, gate_norm_weight, out_w, out, gate_norm_eps, d_model, d_inner, n_rows, gate_group_size,
        groups, NORM_BEFORE_GATE=bool(norm_before_gate), BLOCK_M=block_m, BLOCK_G=block_g, BLOCK_S=block_s,
        USE_PDL=pdl, launch_pdl=pdl, num_warps=TILES["out_warps"],
    )  # fmt: skip
    return out, res_out


# A custom op that declares its in-place writes, so torch.compile and CUDA graph capture through it see
# the block step as one opaque, mutating node.
_block_step_op = torch.library.custom_op(
    "mambakit::mamba2_block_step", mutates_args=("conv_state", "ssm_state")
)(_block_step)


@_block_step_op.register_fake
def _(hidden, residual, norm_weight, norm_eps, residual_in_fp32, in_proj_weight, conv_state, conv_weight,
      conv_bias, dt_bias, A_log, D, dt_limit, ssm_state, ngroups, gate_norm_weight, gate_norm_eps,
      gate_group_size, norm_before_gate, out_proj_weight):  # fmt: skip
    res_dtype = residual_dtype(hidden.dtype, residual_in_fp32)
    return torch.empty_like(hidden), torch.empty(hidden.shape, dtype=res_dtype, device=hidden.device)


# eager calls skip the dispatcher (ops/_eager.py): without a CUDA graph the decoding step is host-bound
_block_step_eager = EagerOp(_block_step_op, _block_step)


def mamba2_block_step_impl(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of `mambakit.ops.mamba2_block_step` (arguments already checked)."""
    args = list(args)
    args[12] = [float(v) for v in args[12]]  # dt_limit, as a list for the custom op's schema
    return _block_step_eager(*args)
