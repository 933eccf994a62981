"""Triton kernels of the RMS norms: one forward and one backward serve all three public norms.

Inputs are viewed as rows (M, dim) split into groups of G channels; a program normalizes a
(BLOCK_M rows, one group) tile with statistics in float32 (float64 for float64 inputs). Flags pick the
variant: HAS_Z (gated; NORM_BEFORE_GATE chooses where the gate goes), HAS_RES (residual added first).

    h    = x (+ residual)          or x * silu(z) when gating before the norm
    rstd = 1 / sqrt(mean_group(h^2) + eps)
    y    = h * rstd * w            (* silu(z) when gating after the norm)

The backward recomputes h and rstd (cheaper than saving them) and writes one partial dweight row per
program, which the caller sums: deterministic, no atomics.
"""

import triton
import triton.language as tl


@triton.jit
def norm_fwd_kernel(
    x_ptr, z_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr,
    n_rows, eps,
    stride_xm, stride_zm, stride_rm, stride_ym, stride_om,
    G: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, HAS_RES: tl.constexpr,
    STORE_RES: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * G + tl.arange(0, BLOCK_G)
    rows64 = rows.to(tl.int64)[:, None]
    mask = (rows < n_rows)[:, None] & (tl.arange(0, BLOCK_G) < G)[None, :]
    h = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(ACC)
    if HAS_RES:
        h += tl.load(res_ptr + rows64 * stride_rm + cols[None, :], mask=mask, other=0.0).to(ACC)
    if STORE_RES:
        tl.store(
            res_out_ptr + rows64 * stride_om + cols[None, :], h.to(res_out_ptr.dtype.element_ty), mask=mask
        )
    if HAS_Z:
        z = tl.load(z_ptr + rows64 * stride_zm + cols[None, :], mask=mask, other=0.0).to(ACC)
        gate = z / (1.0 + tl.exp(-z))
        if not NORM_BEFORE_GATE:
            h = h * gate
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / G + eps)
    w = tl.load(w_ptr + cols, mask=tl.arange(0, BLOCK_G) < G, other=0.0).to(ACC)
    y = h * rstd[:, None] * w[None, :]
    if HAS_Z:
        if NORM_BEFORE_GATE:
            y = y * gate
    tl.store(y_ptr + rows64 * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def norm_bwd_kernel(
    x_ptr, z_ptr, res_ptr, w_ptr, dy_ptr, dres_out_ptr,
    dx_ptr, dz_ptr, dres_ptr, dw_part_ptr,
    n_rows, eps, iters, dim,
    stride_xm, stride_zm, stride_rm, stride_dym, stride_dom, stride_dxm, stride_dzm, stride_drm,
    G: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_DRES_OUT: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    """Program (i, g) handles `iters` row blocks of group g. With xhat = h * rstd:
        dxhat = dy * w (* gate)          dw += dy * xhat (* gate)
        dh    = rstd * (dxhat - xhat * mean(dxhat * xhat))
    then through the gate (dx = dh * gate, dz = dh * x * silu'(z) before the norm; dz = dy * xhat * w *
    silu'(z) after it) and, for the residual variant, plus the gradient of the residual output."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    cols = g * G + tl.arange(0, BLOCK_G)
    col_ok = tl.arange(0, BLOCK_G) < G
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    # dweight stays elementwise over the program's row blocks and is summed over rows once at the end:
    # a sum over rows crosses warps (shared memory, barriers), too costly at every block
    dw_acc = tl.zeros((BLOCK_M, BLOCK_G), dtype=ACC)
    for it in range(iters):
        rows = (pid * iters + it) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows64 = rows.to(tl.int64)[:, None]
        mask = (rows < n_rows)[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(ACC)
        if HAS_RES:
            x += tl.load(res_ptr + rows64 * stride_rm + cols[None, :], mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + rows64 * stride_dym + cols[None, :], mask=mask, other=0.0).to(ACC)
        h = x
        if HAS_Z:
            z = tl.load(z_ptr + rows64 * stride_zm + cols[None, :], mask=mask, other=0.0).to(ACC)
            sig = 1.0 / (1.0 + tl.exp(-z))
            gate = z * sig
            dgate_dz = sig * (1.0 + z * (1.0 - sig))
            if not NORM_BEFORE_GATE:
                h = x * gate
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / G + eps)
        xhat = h * rstd[:, None]
        if HAS_Z and NORM_BEFORE_GATE:
            dz = dy * xhat * w[None, :] * dgate_dz
            dy = dy * gate
        dw_acc += dy * xhat
        dxhat = dy * w[None, :]
        dh = (dxhat - xhat * (tl.sum(dxhat * xhat, axis=1) / G)[:, None]) * rstd[:, None]
        if HAS_Z and not NORM_BEFORE_GATE:
            dz = dh * x * dgate_dz
            dh = dh * gate
        if HAS_Z:
            tl.store(dz_ptr + rows64 * stride_dzm + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if HAS_DRES_OUT:
            dh += tl.load(dres_out_ptr + rows64 * stride_dom + cols[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(dx_ptr + rows64 * stride_dxm + cols[None, :], dh.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_RES:
            tl.store(
                dres_ptr + rows64 * stride_drm + cols[None, :], dh.to(dres_ptr.dtype.element_ty), mask=mask
            )
    tl.store(dw_part_ptr + pid.to(tl.int64) * dim + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
