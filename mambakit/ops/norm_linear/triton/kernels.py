"""Triton kernel of norm + linear for a few rows (a decoding step's batch): one GEMV with the norm inside.

Program p owns BLOCK_N output features for all M (<= BLOCK_M) rows. The input rows are small (M x K,
a few KiB), so every program recomputes their norm instead of a separate norm kernel writing it out:

    pass 1 over K:  h = x (+ residual), or x * silu(z) when gating before the norm
                    ss[m, g] += sum of h^2 over the tile (a tile lies inside one norm group g)
    pass 2 over K:  y = h * rsqrt(ss[m, g] / G + eps) * norm_weight (* silu(z) when gating after)
                    acc += y (rounded to the weight's dtype, as the unfused layers do) @ W[n, k]^T
    out = acc (+ bias)

The weight tile streams from memory once; pass 1 only touches the input rows (L2 resident). Program 0
also writes the residual sum. `tl.dot` wants at least 16 rows: the rows beyond M are masked zeros.
"""

import triton
import triton.language as tl


@triton.jit
def _input_tile(
    x_ptr, z_ptr, res_ptr, offs_m, offs_k, mask_mk, s_xm, s_zm, s_rm,
    HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, HAS_RES: tl.constexpr,
):  # fmt: skip
    """(total, h, gate): total = x (+ residual), h = what the norm's statistics read, gate = silu(z)."""
    total = tl.load(x_ptr + offs_m[:, None] * s_xm + offs_k[None, :], mask=mask_mk, other=0.0).to(tl.float32)
    if HAS_RES:
        total += tl.load(res_ptr + offs_m[:, None] * s_rm + offs_k[None, :], mask=mask_mk, other=0.0).to(
            tl.float32
        )
    h = total
    gate = total  # unused unless HAS_Z
    if HAS_Z:
        z = tl.load(z_ptr + offs_m[:, None] * s_zm + offs_k[None, :], mask=mask_mk, other=0.0).to(tl.float32)
        gate = z / (1.0 + tl.exp(-z))
        if not NORM_BEFORE_GATE:
            h = total * gate
    return total, h, gate


@triton.jit
def norm_linear_kernel(
    x_ptr, z_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr,
    M, N, K, eps,
    s_xm, s_zm, s_rm, s_wn, s_om, s_rom,
    G: tl.constexpr, NG: tl.constexpr,
    HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, HAS_RES: tl.constexpr, STORE_RES: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    groups = tl.arange(0, NG)

    ss = tl.zeros((BLOCK_M, NG), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_mk = mask_m[:, None] & (offs_k < K)[None, :]
        _, h, _ = _input_tile(
            x_ptr, z_ptr, res_ptr, offs_m, offs_k, mask_mk, s_xm, s_zm, s_rm, HAS_Z, NORM_BEFORE_GATE, HAS_RES
        )
        ss += tl.where(groups[None, :] == k0 // G, tl.sum(h * h, axis=1)[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(ss / G + eps)

    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * s_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask_mk = mask_m[:, None] & mask_k[None, :]
        total, h, gate = _input_tile(
            x_ptr, z_ptr, res_ptr, offs_m, offs_k, mask_mk, s_xm, s_zm, s_rm, HAS_Z, NORM_BEFORE_GATE, HAS_RES
        )
        if STORE_RES:
            if pid == 0:
                tl.store(
                    res_out_ptr + offs_m[:, None] * s_rom + offs_k[None, :],
                    total.to(res_out_ptr.dtype.element_ty),
                    mask=mask_mk,
                )
        r = tl.sum(tl.where(groups[None, :] == k0 // G, rstd, 0.0), axis=1)
        nw = tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        y = h * r[:, None] * nw[None, :]
        if HAS_Z:
            if NORM_BEFORE_GATE:
                y = y * gate
        w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        # rounded to the input's dtype first: the unfused norm returns it and the linear layer reads it
        y = y.to(x_ptr.dtype.element_ty).to(w.dtype)
        if DOT_FP32:  # bf16 tiles under the interpreter: see ssd/triton/_common.dot_in_fp32
            y = y.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(y, tl.trans(w), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + offs_m[:, None] * s_om + offs_n[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )
