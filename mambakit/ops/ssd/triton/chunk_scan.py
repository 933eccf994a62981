"""Forward pass 3 of 3: the output of every chunk, in parallel over (batch, chunk, head, row block).

For rows t of chunk c (in-chunk cumulative decay cs, state S entering c from `chunk_state`):
    y_t = exp(cs_t) * C_t S^T                                                (the past, via the state)
        + sum_{s <= t in c} (C_t . B_s) * exp(cs_t - cs_s) * delta_s * x_s    (the chunk, quadratic form)
        + D * x_t ;   y_t *= silu(z_t) when z is given.
C B^T is recomputed per head instead of being stored per group: it costs tensor-core time that is
cheaper than writing and re-reading a (chunk x chunk) matrix per (chunk, group). With seq_idx, the
state term applies only to rows still in the document the state belongs to, and the quadratic term
only to pairs in one document.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mambakit.ops.ssd.triton._common import chunk_tuned


@chunk_tuned
@triton.jit
def chunk_scan_fwd_kernel(
    x_ptr, B_ptr, C_ptr, z_ptr, D_ptr, seq_ptr, delta_ptr, cs_ptr, states_ptr, cb_ptr,
    y_ptr, ypre_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group, tune_bucket,
    sx_b, sx_l, sx_h, sx_p,
    sB_b, sB_l, sB_g, sB_n,
    sC_b, sC_l, sC_g, sC_n,
    sz_b, sz_l, sz_h, sz_p,
    sy_b, sy_l, sy_h, sy_p,
    ss_b, ss_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, USE_CB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    npb = tl.cdiv(headdim, BLOCK_P)
    h = tl.program_id(0) // npb
    pb = tl.program_id(0) % npb
    m = tl.program_id(1)
    b = tl.program_id(2) // nchunks
    c = tl.program_id(2) % nchunks
    g = h // heads_per_group
    ACC = states_ptr.dtype.element_ty
    XDT = x_ptr.dtype.element_ty  # tensor-core operand dtype
    DOT = XDT
    if DOT_F32:  # see _common.dot_in_fp32: operands still rounded to XDT first, as on a GPU
        DOT = tl.float32
    start = c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - start)

    r = m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows, as in-chunk positions
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    rmask = r < chunk_len
    pmask = offs_p < headdim
    nmask = offs_n < dstate
    t = start + r
    dcs_base = (b * nheads + h) * seqlen

    cs_r = tl.load(cs_ptr + dcs_base + t, mask=rmask, other=0.0)
    Cr = (
        tl.load(
            C_ptr + b * sC_b + t[:, None] * sC_l + g * sC_g + offs_n[None, :] * sC_n,
            mask=rmask[:, None] & nmask[None, :],
            other=0.0,
        )
        .to(XDT)
        .to(DOT)
    )

    # the past, through the state entering this chunk
    st_off = ((b * nchunks + c) * nheads + h) * headdim * dstate
    S = tl.load(
        states_ptr + st_off + offs_p[None, :] * dstate + offs_n[:, None],
        mask=pmask[None, :] & nmask[:, None],
        other=0.0,
    )  # (BLOCK_N, BLOCK_P): S^T
    scale = tl.exp(cs_r)
    if HAS_SEQ:
        seq_r = tl.load(seq_ptr + b * ss_b + t * ss_l, mask=rmask, other=0)
        seq_prev = tl.load(seq_ptr + b * ss_b + tl.maximum(start - 1, 0) * ss_l)
        scale = tl.where(seq_r == seq_prev, scale, 0.0)
    acc = tl.dot(Cr, S.to(XDT).to(DOT), input_precision=PREC).to(ACC) * scale[:, None]

    # the chunk itself: causal, so only columns up to this row block's end
    hi = tl.minimum((m + 1) * BLOCK_M, chunk_len)
    cb_base = ((b * nchunks + c) * (nheads // heads_per_group) + g) * chunk_size * chunk_size
    for k0 in range(0, hi, BLOCK_K):
        s_idx = k0 + tl.arange(0, BLOCK_K)
        smask = s_idx < chunk_len
        ts = start + s_idx
        if USE_CB:  # shared by the heads of the group, from `chunk_cb`
            cb = tl.load(
                cb_ptr + cb_base + r[:, None] * chunk_size + s_idx[None, :],
                mask=rmask[:, None] & smask[None, :],
                other=0.0,
            ).to(ACC)
        else:
            Bs = (
                tl.load(
                    B_ptr + b * sB_b + ts[:, None] * sB_l + g * sB_g + offs_n[None, :] * sB_n,
                    mask=smask[:, None] & nmask[None, :],
                    other=0.0,
                )
                .to(XDT)
                .to(DOT)
            )
            cb = tl.dot(Cr, tl.trans(Bs), input_precision=PREC).to(ACC)  # (BLOCK_M, BLOCK_K)
        cs_s = tl.load(cs_ptr + dcs_base + ts, mask=smask, other=0.0)
        delta_s = tl.load(delta_ptr + dcs_base + ts, mask=smask, other=0.0)
        keep = (r[:, None] >= s_idx[None, :]) & smask[None, :]
        if HAS_SEQ:
            seq_s = tl.load(seq_ptr + b * ss_b + ts * ss_l, mask=smask, other=0)
            keep = keep & (seq_r[:, None] == seq_s[None, :])
        L = tl.exp(tl.where(keep, cs_r[:, None] - cs_s[None, :], float("-inf")))
        scores = cb * L * delta_s[None, :]
        xs = (
            tl.load(
                x_ptr + b * sx_b + ts[:, None] * sx_l + h * sx_h + offs_p[None, :] * sx_p,
                mask=smask[:, None] & pmask[None, :],
                other=0.0,
            )
            .to(XDT)
            .to(DOT)
        )
        acc += tl.dot(scores.to(XDT).to(DOT), xs, input_precision=PREC).to(ACC)

    io_mask = rmask[:, None] & pmask[None, :]
    if HAS_D:
        xr = tl.load(
            x_ptr + b * sx_b + t[:, None] * sx_l + h * sx_h + offs_p[None, :] * sx_p, mask=io_mask, other=0.0
        ).to(ACC)
        Dp = tl.load(D_ptr + h * headdim + offs_p, mask=pmask, other=0.0).to(ACC)  # D as (nheads, headdim)
        acc += xr * Dp[None, :]
    y_off = b * sy_b + t[:, None] * sy_l + h * sy_h + offs_p[None, :] * sy_p
    if HAS_Z:
        tl.store(ypre_ptr + y_off, acc.to(ypre_ptr.dtype.element_ty), mask=io_mask)
        zr = tl.load(
            z_ptr + b * sz_b + t[:, None] * sz_l + h * sz_h + offs_p[None, :] * sz_p, mask=io_mask, other=0.0
        ).to(ACC)
        acc = acc * zr * tl.sigmoid(zr)
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=io_mask)
