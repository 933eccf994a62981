"""Triton backend of `mamba1_block_step`: a Mamba-1 block's decoding step in three kernels.

Why: at batch 1 a decoding step's kernels each take a few microseconds whatever their work, and the
unfused block is ~7 of them (norm, in_proj, conv, x_proj, state update, out_proj, ...; 130M Mamba-1
on an H200: ~23 us a block, while its weights stream in ~1 us). Each kernel here does the work that
needs no result of another program:
1. `_in_conv_kernel`, one program per block of channels: the residual add and the RMS norm (every
   program recomputes them from the (d_model,) row, which costs less than a kernel boundary; program 0
   writes the new residual), the channels' rows of in_proj (x and z), the depthwise conv step with
   SiLU (its conv state updated in place), and the channels' share of x_proj, written as one partial
   sum per program.
2. `_ssm_kernel`, one program per block of channels: sums the x_proj partials in a fixed order (the
   step is deterministic: no atomics), applies dt_proj, softplus and the state update, and writes the
   gated y.
3. `_gemv_kernel`: out_proj, a block of output rows per program.
Values are rounded to the model's dtype where the unfused block's ops return them (normed input, x and
z, the conv output, dt_low/B/C, y, out); every sum is in float32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mambakit.ops._launch import next_power_of_2
from mambakit.ops.selective_scan.triton.scan_fwd import _softplus


@triton.jit
def _in_conv_kernel(
    hid_ptr, res_ptr, res_out_ptr, nw_ptr, W_in_ptr, cs_ptr, cw_ptr, cb_ptr, W_x_ptr, xz_ptr, part_ptr,
    eps, d_model, d_inner, d_conv, n_xproj, nblocks, s_cs_b, s_cs_d, s_cs_w,
    HAS_RES: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_X: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    DT = W_in_ptr.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    hid = hid_ptr + b * d_model
    res = res_ptr + b * d_model

    ssq = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, d_model, BLOCK_K):
        k = k0 + offs_k
        ok = k < d_model
        r = tl.load(hid + k, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            r += tl.load(res + k, mask=ok, other=0.0).to(tl.float32)
        ssq += r * r
        if pid == 0:
            tl.store(res_out_ptr + b * d_model + k, r.to(res_out_ptr.dtype.element_ty), mask=ok)
    rstd = 1.0 / tl.sqrt(tl.sum(ssq, 0) / d_model + eps)

    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    ok_c = offs_c < d_inner
    acc_x = tl.zeros([BLOCK_C, BLOCK_K], tl.float32)
    acc_z = tl.zeros([BLOCK_C, BLOCK_K], tl.float32)
    for k0 in range(0, d_model, BLOCK_K):
        k = k0 + offs_k
        ok = k < d_model
        r = tl.load(hid + k, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            r += tl.load(res + k, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(nw_ptr + k, mask=ok, other=0.0).to(tl.float32)
        normed = (r * rstd * w).to(DT).to(tl.float32)
        m = ok_c[:, None] & ok[None, :]
        rows = W_in_ptr + offs_c[:, None] * d_model + k[None, :]
        acc_x += tl.load(rows, mask=m, other=0.0).to(tl.float32) * normed[None, :]
        acc_z += tl.load(rows + d_inner * d_model, mask=m, other=0.0).to(tl.float32) * normed[None, :]
    x = tl.sum(acc_x, 1).to(DT).to(tl.float32)
    z = tl.sum(acc_z, 1).to(DT).to(tl.float32)

    # conv window (BLOCK_C, BLOCK_W): the d_conv - 1 cached inputs, then x
    offs_w = tl.arange(0, BLOCK_W)
    cs = cs_ptr + b * s_cs_b + offs_c[:, None] * s_cs_d + offs_w[None, :] * s_cs_w
    in_state = ok_c[:, None] & (offs_w[None, :] < d_conv - 1)
    window = tl.load(cs, mask=in_state, other=0.0).to(tl.float32)
    window = tl.where(offs_w[None, :] == d_conv - 1, x[:, None], window)
    taps = tl.load(cw_ptr + offs_c[:, None] * d_conv + offs_w[None, :],
                   mask=ok_c[:, None] & (offs_w[None, :] < d_conv), other=0.0).to(tl.float32)  # fmt: skip
    conv = tl.sum(window * taps, 1)
    if HAS_CONV_BIAS:
        conv += tl.load(cb_ptr + offs_c, mask=ok_c, other=0.0).to(tl.float32)
    xc = (conv / (1.0 + tl.exp(-conv))).to(DT).to(tl.float32)
    # the new state is the window shifted left by one, selected in registers: reloading the state would
    # read what another thread of this program may already have overwritten
    shift = offs_w[None, None, :] == offs_w[None, :, None] + 1
    new_state = tl.sum(tl.where(shift, window[:, None, :], 0.0), 2)
    tl.store(cs, new_state.to(cs_ptr.dtype.element_ty), mask=in_state)

    offs_x = tl.arange(0, BLOCK_X)
    W_x = tl.load(W_x_ptr + offs_x[:, None] * d_inner + offs_c[None, :],
                  mask=(offs_x[:, None] < n_xproj) & ok_c[None, :], other=0.0).to(tl.float32)  # fmt: skip
    tl.store(part_ptr + (b * nblocks + pid) * BLOCK_X + offs_x, tl.sum(W_x * xc[None, :], 1))
    tl.store(xz_ptr + b * 2 * d_inner + offs_c, xc, mask=ok_c)
    tl.store(xz_ptr + b * 2 * d_inner + d_inner + offs_c, z, mask=ok_c)


@triton.jit
def _ssm_kernel(
    part_ptr, xz_ptr, W_dt_ptr, dt_bias_ptr, A_log_ptr, D_ptr, h_ptr, y_ptr,
    d_inner, dstate, dt_rank, nblocks, s_h_b, s_h_d, s_h_n,
    HAS_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_X: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    DT = y_ptr.dtype.element_ty
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    ok_r = offs_r < dt_rank
    ok_n = offs_n < dstate
    dt_low = tl.zeros([BLOCK_R], tl.float32)
    Bv = tl.zeros([BLOCK_N], tl.float32)
    Cv = tl.zeros([BLOCK_N], tl.float32)
    for p0 in range(0, nblocks, BLOCK_P):
        p = p0 + offs_p
        rows = part_ptr + (b * nblocks + p[:, None]) * BLOCK_X
        ok_p = (p < nblocks)[:, None]
        dt_low += tl.sum(tl.load(rows + offs_r[None, :], mask=ok_p & ok_r[None, :], other=0.0), 0)
        Bv += tl.sum(tl.load(rows + dt_rank + offs_n[None, :], mask=ok_p & ok_n[None, :], other=0.0), 0)
        C_rows = rows + dt_rank + dstate
        Cv += tl.sum(tl.load(C_rows + offs_n[None, :], mask=ok_p & ok_n[None, :], other=0.0), 0)
    dt_low = dt_low.to(DT).to(tl.float32)
    Bv = Bv.to(DT).to(tl.float32)
    Cv = Cv.to(DT).to(tl.float32)

    offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    ok_c = offs_c < d_inner
    W_dt = tl.load(W_dt_ptr + offs_c[:, None] * dt_rank + offs_r[None, :],
                   mask=ok_c[:, None] & ok_r[None, :], other=0.0).to(tl.float32)  # fmt: skip
    delta = tl.sum(W_dt * dt_low[None, :], 1)
    delta += tl.load(dt_bias_ptr + offs_c, mask=ok_c, other=0.0).to(tl.float32)
    delta = tl.where(ok_c, _softplus(delta), 0.0)
    x = tl.load(xz_ptr + b * 2 * d_inner + offs_c, mask=ok_c, other=0.0)
    z = tl.load(xz_ptr + b * 2 * d_inner + d_inner + offs_c, mask=ok_c, other=0.0)
    ok_cn = ok_c[:, None] & ok_n[None, :]
    A_log = tl.load(A_log_ptr + offs_c[:, None] * dstate + offs_n[None, :], mask=ok_cn, other=0.0)
    A = -tl.exp(A_log.to(tl.float32))
    h_ptrs = h_ptr + b * s_h_b + offs_c[:, None] * s_h_d + offs_n[None, :] * s_h_n
    h = tl.load(h_ptrs, mask=ok_cn, other=0.0).to(tl.float32)
    h = tl.exp(delta[:, None] * A) * h + (delta * x)[:, None] * Bv[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=ok_cn)
    y = tl.sum(h * Cv[None, :], 1)
    if HAS_D:
        y += tl.load(D_ptr + offs_c, mask=ok_c, other=0.0).to(tl.float32) * x
    y *= z / (1.0 + tl.exp(-z))
    tl.store(y_ptr + b * d_inner + offs_c, y.to(DT), mask=ok_c)


@triton.jit
def _gemv_kernel(v_ptr, W_ptr, out_ptr, n_out, n_in, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[b] = W @ v[b]: W (n_out, n_in) contiguous, v (batch, n_in), out (batch, n_out)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ok_m = offs_m < n_out
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        k = k0 + offs_k
        ok = k < n_in
        v = tl.load(v_ptr + b * n_in + k, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(W_ptr + offs_m[:, None] * n_in + k[None, :], mask=ok_m[:, None] & ok[None, :], other=0.0)
        acc += w.to(tl.float32) * v[None, :]
    tl.store(out_ptr + b * n_out + offs_m, tl.sum(acc, 1).to(out_ptr.dtype.element_ty), mask=ok_m)


# Tile choices, read at every call so that `benchmarks/gpu_block_step.py` can sweep them in one process.
# in_channels: channels a program of the first kernel (None: about 128 programs, 16 to 64);
# in_k: columns of in_proj a loop step; ssm_channels: channels a program of the second kernel;
# out_rows: rows of out_proj a program (None: about 128 programs, 8 to 64); out_k: its columns a step;
# out_cublas: out_proj as F.linear (cuBLAS) instead of the third kernel.
TILES = {
    "in_channels": None,
    "in_k": 256,
    "ssm_channels": 16,
    "out_rows": None,
    "out_k": 512,
    "out_cublas": False,
}


def _per_program(n: int, lo: int, hi: int, target_programs: int = 128) -> int:
    """A power of two in [lo, hi] near n / target_programs: about one wave of programs on an H100/H200."""
    return min(hi, max(lo, next_power_of_2(triton.cdiv(n, target_programs))))


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
    n_xproj = x_proj_weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    hidden = hidden.contiguous()
    residual = None if residual is None else residual.contiguous()
    in_w, x_w, out_w = in_proj_weight.contiguous(), x_proj_weight.contiguous(), out_proj_weight.contiguous()
    conv_w, dt_w, A_log, D = conv_weight.contiguous(), dt_proj_weight.contiguous(), A_log.contiguous(), D
    res_dtype = torch.promote_types(dtype, torch.float32) if residual_in_fp32 else dtype
    res_out = torch.empty(batch, d_model, device=dev, dtype=res_dtype)

    block_c = TILES["in_channels"] or _per_program(d_inner, 16, 64)
    nblocks = triton.cdiv(d_inner, block_c)
    block_x = next_power_of_2(n_xproj)
    block_k = min(TILES["in_k"], next_power_of_2(d_model))
    xz = torch.empty(batch, 2, d_inner, device=dev, dtype=torch.float32)
    partials = torch.empty(batch, nblocks, block_x, device=dev, dtype=torch.float32)
    _in_conv_kernel[(nblocks, batch)](
        hidden, residual if residual is not None else hidden, res_out, norm_weight, in_w, conv_state, conv_w,
        conv_bias if conv_bias is not None else conv_w, x_w, xz, partials,
        norm_eps, d_model, d_inner, d_conv, n_xproj, nblocks,
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        HAS_RES=residual is not None, HAS_CONV_BIAS=conv_bias is not None, BLOCK_C=block_c,
        BLOCK_K=block_k, BLOCK_W=next_power_of_2(d_conv), BLOCK_X=block_x,
        num_warps=4 if block_c <= 16 else 8,
    )  # fmt: skip

    y = torch.empty(batch, d_inner, device=dev, dtype=dtype)
    ssm_block = TILES["ssm_channels"]
    _ssm_kernel[(triton.cdiv(d_inner, ssm_block), batch)](
        partials, xz, dt_w, dt_bias, A_log, D if D is not None else dt_bias, ssm_state, y,
        d_inner, dstate, dt_rank, nblocks, ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2),
        HAS_D=D is not None, BLOCK_C=ssm_block, BLOCK_N=next_power_of_2(dstate),
        BLOCK_R=next_power_of_2(dt_rank), BLOCK_P=32, BLOCK_X=block_x, num_warps=4,
    )  # fmt: skip

    if TILES["out_cublas"]:
        return torch.nn.functional.linear(y, out_w), res_out
    out = torch.empty(batch, d_model, device=dev, dtype=dtype)
    block_m = TILES["out_rows"] or _per_program(d_model, 8, 64)
    _gemv_kernel[(triton.cdiv(d_model, block_m), batch)](
        y,
        out_w,
        out,
        d_model,
        d_inner,
        BLOCK_M=block_m,
        BLOCK_K=min(TILES["out_k"], next_power_of_2(d_inner)),
        num_warps=4 if block_m <= 8 else 8,
    )
    return out, res_out


# A custom op that declares its in-place writes, so torch.compile and CUDA graph capture through it see
# the block step as one opaque, mutating node.
_block_step_op = torch.library.custom_op(
    "mambakit::mamba1_block_step", mutates_args=("conv_state", "ssm_state")
)(_block_step)


@_block_step_op.register_fake
def _(hidden, residual, norm_weight, norm_eps, residual_in_fp32, in_proj_weight, conv_state, conv_weight,
      conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, ssm_state, out_proj_weight):  # fmt: skip
    res_dtype = torch.promote_types(hidden.dtype, torch.float32) if residual_in_fp32 else hidden.dtype
    return torch.empty_like(hidden), torch.empty(hidden.shape, dtype=res_dtype, device=hidden.device)


def mamba1_block_step_impl(*args) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backend of `mambakit.ops.mamba1_block_step` (arguments already checked)."""
    return _block_step_op(*args)
