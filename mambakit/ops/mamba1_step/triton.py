"""Triton backend of `mamba1_block_step`: a Mamba-1 block's decoding step in four kernels.

Why: at batch 1 a decoding step's kernels each take a few microseconds whatever their work, and the
unfused block is ~7 of them (norm, in_proj, conv, x_proj, state update, out_proj, ...; 130M Mamba-1
on an H200: ~23 us a block, while its weights stream in ~1 us). Each kernel here does the work that
needs no result of another program:
1. `_in_conv_kernel`, one program per block of channels: the residual add and the RMS norm (every
   program recomputes them from the (d_model,) row, which costs less than a kernel boundary; program 0
   writes the new residual), the channels' rows of in_proj (x and z), and the depthwise conv step with
   SiLU (its conv state updated in place).
2. `_gemv_kernel`: x_proj (dt_low, B, C), a few output rows per program. x_proj sums over every
   channel; summing per-program partials inside the next kernel instead cost ~5 us (H200, first
   version), and atomics would make the step nondeterministic.
3. `_ssm_kernel`, one program per block of channels: dt_proj, softplus, the state update and the
   gated y.
4. `_gemv_kernel`: out_proj, a block of output rows per program.
Values are rounded to the model's dtype where the unfused block's ops return them (normed input, x and
z, the conv output, dt_low/B/C, y, out); every sum is in float32 and in a fixed order.
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
    hid_ptr, res_ptr, res_out_ptr, nw_ptr, W_in_ptr, cs_ptr, cw_ptr, cb_ptr, xz_ptr,
    eps, d_model, d_inner, d_conv, s_cs_b, s_cs_d, s_cs_w,
    HAS_RES: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """Residual add, RMS norm, the x and z rows of in_proj for BLOCK_C channels, their conv step + SiLU.
    BLOCK_K >= d_model: the whole row is one load, so every load of the program is in flight at once."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    DT = W_in_ptr.dtype.element_ty
    k = tl.arange(0, BLOCK_K)
    ok = k < d_model
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    ok_c = offs_c < d_inner
    # the weight tiles first: their loads do not wait on the norm's reductions (measured on an H200,
    # 1.4B: the weights loaded after the norm made this kernel latency-bound)
    m = ok_c[:, None] & ok[None, :]
    rows = W_in_ptr + offs_c[:, None] * d_model + k[None, :]
    w_x = tl.load(rows, mask=m, other=0.0)
    w_z = tl.load(rows + d_inner * d_model, mask=m, other=0.0)
    wait_for_inputs(USE_PDL)
    normed = add_norm_row(hid_ptr, res_ptr, res_out_ptr, nw_ptr, b, k, ok, d_model, eps, pid == 0,
                          HAS_RES, DT)  # fmt: skip
    x = tl.sum(w_x.to(tl.float32) * normed[None, :], 1)
    z = tl.sum(w_z.to(tl.float32) * normed[None, :], 1)
    x = x.to(DT).to(tl.float32)
    z = z.to(DT).to(tl.float32)

    xc = conv_silu_step(cs_ptr, cw_ptr, cb_ptr, b, offs_c, ok_c, x, d_conv, s_cs_b, s_cs_d, s_cs_w,
                        HAS_CONV_BIAS, BLOCK_W, DT)  # fmt: skip
    tl.store(xz_ptr + b * 2 * d_inner + offs_c, xc, mask=ok_c)
    tl.store(xz_ptr + b * 2 * d_inner + d_inner + offs_c, z, mask=ok_c)


@triton.jit
def _gemv_kernel(
    v_ptr, W_ptr, out_ptr, n_out, n_in, s_v_b, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ONE_TILE: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """out[b] = W @ v[b], rounded to out's dtype: W (n_out, n_in) contiguous, v (batch, n_in) with row
    stride s_v_b, out (batch, n_out) contiguous. ONE_TILE (BLOCK_K >= n_in) takes one load of W, made
    before waiting on v: a loop step waits for its loads, and at decoding sizes that wait, not
    bandwidth, is the cost."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ok_m = offs_m < n_out
    offs_k = tl.arange(0, BLOCK_K)
    W_rows = W_ptr + offs_m[:, None] * n_in
    if ONE_TILE:
        ok = offs_k < n_in
        w = tl.load(W_rows + offs_k[None, :], mask=ok_m[:, None] & ok[None, :], other=0.0)
        wait_for_inputs(USE_PDL)
        v = tl.load(v_ptr + b * s_v_b + offs_k, mask=ok, other=0.0).to(tl.float32)
        acc = tl.sum(w.to(tl.float32) * v[None, :], 1)
    else:
        wait_for_inputs(USE_PDL)
        acc = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, n_in, BLOCK_K):
            k = k0 + offs_k
            ok = k < n_in
            v = tl.load(v_ptr + b * s_v_b + k, mask=ok, other=0.0).to(tl.float32)
            w = tl.load(W_rows + k[None, :], mask=ok_m[:, None] & ok[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * v[None, :], 1)
    tl.store(out_ptr + b * n_out + offs_m, acc.to(out_ptr.dtype.element_ty), mask=ok_m)


@triton.jit
def _ssm_kernel(
    xp_ptr, xz_ptr, W_dt_ptr, dt_bias_ptr, A_log_ptr, D_ptr, h_ptr, y_ptr,
    d_inner, dstate, dt_rank, s_h_b, s_h_d, s_h_n,
    HAS_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    """dt_proj, softplus, the state update and the gated y for BLOCK_C channels; xp (batch, dt_rank +
    2 dstate) is x_proj's output (dt_low, B, C), already rounded to the model's dtype."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    ok_r = offs_r < dt_rank
    ok_n = offs_n < dstate
    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    ok_c = offs_c < d_inner
    ok_cn = ok_c[:, None] & ok_n[None, :]
    # the parameters and the state first (see wait_for_inputs)
    W_dt = tl.load(W_dt_ptr + offs_c[:, None] * dt_rank + offs_r[None, :],
                   mask=ok_c[:, None] & ok_r[None, :], other=0.0).to(tl.float32)  # fmt: skip
    bias = tl.load(dt_bias_ptr + offs_c, mask=ok_c, other=0.0).to(tl.float32)
    A_log = tl.load(A_log_ptr + offs_c[:, None] * dstate + offs_n[None, :], mask=ok_cn, other=0.0)
    if HAS_D:
        D = tl.load(D_ptr + offs_c, mask=ok_c, other=0.0).to(tl.float32)
    h_ptrs = h_ptr + b * s_h_b + offs_c[:, None] * s_h_d + offs_n[None, :] * s_h_n
    h = tl.load(h_ptrs, mask=ok_cn, other=0.0).to(tl.float32)  # only this kernel writes it
    wait_for_inputs(USE_PDL)

    xp = xp_ptr + b * (dt_rank + 2 * dstate)
    dt_low = tl.load(xp + offs_r, mask=ok_r, other=0.0).to(tl.float32)
    Bv = tl.load(xp + dt_rank + offs_n, mask=ok_n, other=0.0).to(tl.float32)
    Cv = tl.load(xp + dt_rank + dstate + offs_n, mask=ok_n, other=0.0).to(tl.float32)
    delta = tl.sum(W_dt * dt_low[None, :], 1) + bias
    delta = tl.where(ok_c, _softplus(delta), 0.0)
    x = tl.load(xz_ptr + b * 2 * d_inner + offs_c, mask=ok_c, other=0.0)
    z = tl.load(xz_ptr + b * 2 * d_inner + d_inner + offs_c, mask=ok_c, other=0.0)
    A = -tl.exp(A_log.to(tl.float32))
    h = tl.exp(delta[:, None] * A) * h + (delta * x)[:, None] * Bv[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=ok_cn)
    y = tl.sum(h * Cv[None, :], 1)
    if HAS_D:
        y += D * x
    y *= z / (1.0 + tl.exp(-z))
    tl.store(y_ptr + b * d_inner + offs_c, y.to(y_ptr.dtype.element_ty), mask=ok_c)


# Tile choices, read at every call so that `benchmarks/gpu_block_step.py` can sweep them in one process.
# A program of a GEMV-like kernel holds a (rows, K) tile, K the whole input row (a power of two, at
# most `max_k` for the plain GEMV); `*_elems` is the tile size a program aims at, `per_thread` the
# elements a thread (which sets the warps, 1 to 8). in / x / out: in_proj (+ norm + conv, at least
# `in_min_channels` channels of an x and a z row each), x_proj, out_proj; ssm_channels: channels a
# program of the state update; *_cublas: that projection as F.linear (cuBLAS) instead. Two in_proj
# channels a program were the best at both 130M (0.262 -> 0.247 ms, a 4096-element tile) and 1.4B
# (an 8192-element tile, the minimum) (H200, batch 1, PDL; benchmarks/results/h200-2026-12-02).
TILES = {"in_elems": 4096, "in_min_channels": 2, "x_elems": 4096, "out_elems": 4096, "max_k": 4096,
         "per_thread": 64, "ssm_channels": 8, "x_cublas": False, "out_cublas": False}  # fmt: skip


def _gemv(v: torch.Tensor, W: torch.Tensor, elems: int) -> torch.Tensor:
    """v (batch, n_in) (rows may be strided) @ W^T -> (batch, n_out) in W's dtype."""
    batch, n_in = v.shape
    n_out = W.shape[0]
    out = torch.empty(batch, n_out, device=v.device, dtype=W.dtype)
    block_k = min(next_power_of_2(n_in), TILES["max_k"])
    rows = tile_rows(n_out, block_k, elems)
    warps = tile_warps(rows * block_k, TILES["per_thread"])
    pdl = use_pdl(v)
    _gemv_kernel[(triton.cdiv(n_out, rows), batch)](
        v, W, out, n_out, n_in, v.stride(0), BLOCK_M=rows, BLOCK_K=block_k, ONE_TILE=block_k >= n_in,
        USE_PDL=pdl, num_warps=warps, launch_pdl=pdl,
    )  # fmt: skip
    return out


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
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: Optional[torch.Tensor],  # noqa: UP045
    ssm_state: torch.Tensor,
    out_proj_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, d_model = hidden.shape
    d_inner, d_conv = conv_weight.shape
    dt_rank, dstate = dt_proj_weight.shape[1], A_log.shape[1]
    dev, dtype = hidden.device, hidden.dtype
    hidden = hidden.contiguous()
    residual = None if residual is None else residual.contiguous()
    in_w, x_w, out_w = in_proj_weight.contiguous(), x_proj_weight.contiguous(), out_proj_weight.contiguous()
    conv_w, dt_w, A_log = conv_weight.contiguous(), dt_proj_weight.contiguous(), A_log.contiguous()
    # the kernels index every vector with unit stride (contiguous() is free for parameters)
    norm_weight, dt_bias = norm_weight.contiguous(), dt_bias.contiguous()
    conv_bias = None if conv_bias is None else conv_bias.contiguous()
    D = None if D is None else D.contiguous()
    res_out = torch.empty(batch, d_model, device=dev, dtype=residual_dtype(dtype, residual_in_fp32))

    # in_proj needs the whole row in one tile (the norm is computed from it): K = next power of two
    block_k = next_power_of_2(d_model)
    # two rows (x and z) a channel
    min_c = min(TILES["in_min_channels"], next_power_of_2(d_inner))
    block_c = max(min_c, tile_rows(d_inner, block_k, TILES["in_elems"] // 2))
    warps = tile_warps(2 * block_c * block_k, TILES["per_thread"])
    xz = torch.empty(batch, 2, d_inner, device=dev, dtype=torch.float32)
    pdl = use_pdl(hidden)
    _in_conv_kernel[(triton.cdiv(d_inner, block_c), batch)](
        hidden, residual if residual is not None else hidden, res_out, norm_weight, in_w, conv_state, conv_w,
        conv_bias if conv_bias is not None else conv_w, xz, norm_eps, d_model, d_inner, d_conv,
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        HAS_RES=residual is not None, HAS_CONV_BIAS=conv_bias is not None, BLOCK_C=block_c,
        BLOCK_K=block_k, BLOCK_W=next_power_of_2(d_conv), USE_PDL=pdl, num_warps=warps, launch_pdl=pdl,
    )  # fmt: skip

    x_conv = xz[:, 0]  # (batch, d_inner), rows strided by 2 d_inner
    if TILES["x_cublas"]:
        xp = torch.nn.functional.linear(x_conv.to(dtype), x_w).contiguous()
    else:
        xp = _gemv(x_conv, x_w, TILES["x_elems"])  # (batch, dt_rank + 2 dstate), rounded to dtype

    y = torch.empty(batch, d_inner, device=dev, dtype=dtype)
    ssm_block = TILES["ssm_channels"]
    _ssm_kernel[(triton.cdiv(d_inner, ssm_block), batch)](
        xp, xz, dt_w, dt_bias, A_log, D if D is not None else dt_bias, ssm_state, y,
        d_inner, dstate, dt_rank, ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2),
        HAS_D=D is not None, BLOCK_C=ssm_block, BLOCK_N=next_power_of_2(dstate),
        BLOCK_R=next_power_of_2(dt_rank), USE_PDL=pdl, num_warps=4, launch_pdl=pdl,
    )  # fmt: skip
    if TILES["out_cublas"]:
        return torch.nn.functional.linear(y, out_w), res_out
    return _gemv(y, out_w, TILES["out_elems"]), res_out


# A custom op that declares its in-place writes, so torch.compile and CUDA graph capture through it see
# the block step as one opaque, mutating node.
_block_step_op = torch.library.custom_op(
    "mambakit::mamba1_block_step", mutates_args=("conv_state", "ssm_state")
)(_block_step)


@_block_step_op.register_fake
def _(hidden, residual, norm_weight, norm_eps, residual_in_fp32, in_proj_weight, conv_state, conv_weight,
      conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, ssm_state, out_proj_weight):  # fmt: skip
    res_dtype = residual_dtype(hidden.dtype, residual_in_fp32)
    return torch.empty_like(hidden), torch.empty(hidden.shape, dtype=res_dtype, device=hidden.device)


# eager calls skip the dispatcher (ops/_eager.py): without a CUDA graph the decoding step is host-bound
_block_step_eager = EagerOp(_block_step_op, _block_step)


def mamba1_block_step_impl(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of `mambakit.ops.mamba1_block_step` (arguments already checked)."""
    return _block_step_eager(*args)
