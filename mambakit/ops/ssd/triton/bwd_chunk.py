"""Backward passes 2-4: per-chunk gradients, in parallel over (batch, chunk, row block, head or group).

With L_ts = exp(cs_t - cs_s) for s <= t in one chunk (and one document), dy the gradient of y before
the z gate, S the state entering the chunk and G the gradient of what the chunk adds to the state
leaving it (from `chunk_state_bwd` and the reverse `state_passing`):
  dx kernel, rows s of one head (what position s influenced):
    dxdt_s = sum_{t >= s} (C_t . B_s) L_ts dy_t + exp(cs_end - cs_s) G B_s
    dx_s = delta_s dxdt_s + D dy_s;   ddelta_s (direct) = x_s . dxdt_s
  dB kernel, rows s, summed over the heads of a group:
    dB_s = sum_heads delta_s [ sum_{t >= s} L_ts (x_s . dy_t) C_t + exp(cs_end - cs_s) G^T x_s ]
  dC kernel, rows t, summed over the heads of a group (what position t read):
    dC_t = sum_heads [ sum_{s <= t} L_ts delta_s (dy_t . x_s) B_s + exp(cs_t) S^T dy_t ]
    dcs_t (row part) = dy_t . (y_t - D x_t), recomputed in fp32 from the same products (a bf16 y
    saved by the forward would lose too much to cancellation in d A)
The dcs identity: every exp(cs_t - cs_s) term adds its value to dcs_t and subtracts it from dcs_s
(likewise exp(cs_end - cs_s): to the chunk's last position, from s). Summed over a row those values
are dy_t . y_t (before D), over a column delta_s x_s . dxdt_s. The two sides cancel largely, so the dx
kernel recomputes its column shares in fp32 from the same products as the row side (an extra
x dy^T product) instead of reusing dxdt, whose tensor-core operands were rounded to bf16.
The group kernels loop over blocks of the other position outside and over heads inside: the inner
loop is then straight-line work, the group's C B^T block is computed once for all its heads, and
only the dB / dC accumulator is carried (a position loop nested in a head loop made the compiler
spill registers). A program sums `heads_per_prog` heads; several programs per group write partial
sums.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mambakit.ops._triton_math import exp_ftz
from mambakit.ops._triton_tiles import load_tile, store_tile
from mambakit.ops.ssd.triton._common import causal_decay, causal_keep, chunk_tuned


@chunk_tuned(reset_to_zero=("dD_ptr",))
@triton.jit
def chunk_bwd_dx_kernel(
    x_ptr, B_ptr, C_ptr, D_ptr, seq_ptr, delta_ptr, cs_ptr, G_ptr, dy_ptr,
    dx_ptr, ddelta_ptr, dcs_col_ptr, dcs_st_ptr, dD_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group, tune_bucket,
    sx_b, sx_l, sx_h, sx_p,
    sB_b, sB_l, sB_g, sB_n,
    sC_b, sC_l, sC_g, sC_n,
    sy_b, sy_l, sy_h, sy_p,
    sdx_b, sdx_l, sdx_h, sdx_p,
    ss_b, ss_l,
    HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr, FULL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0)
    nmb = tl.num_programs(0)
    b = tl.program_id(1) // nchunks
    c = tl.program_id(1) % nchunks
    h = tl.program_id(2)
    g = h // heads_per_group
    ACC = G_ptr.dtype.element_ty
    XDT = x_ptr.dtype.element_ty  # tensor-core operand dtype
    DOT = XDT
    if DOT_F32:  # see _common.dot_in_fp32: operands still rounded to XDT first, as on a GPU
        DOT = tl.float32
    start = c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - start)
    last = start + chunk_len - 1

    s_idx = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    smask = s_idx < chunk_len
    pmask = offs_p < headdim
    nmask = offs_n < dstate
    ts = start + s_idx
    sp_mask = smask[:, None] & pmask[None, :]
    dcs_base = (b * nheads + h) * seqlen

    Bs = (
        load_tile(
            B_ptr + b * sB_b + ts[:, None] * sB_l + g * sB_g + offs_n[None, :] * sB_n,
            smask[:, None] & nmask[None, :],
            FULL,
        )
        .to(XDT)
        .to(DOT)
    )
    cs_s = load_tile(cs_ptr + dcs_base + ts, smask, FULL)
    delta_s = load_tile(delta_ptr + dcs_base + ts, smask, FULL)
    cs_end = tl.load(cs_ptr + dcs_base + last)

    # through the state leaving the chunk
    st_off = ((b * nchunks + c) * nheads + h) * headdim * dstate
    G = load_tile(
        G_ptr + st_off + offs_p[:, None] * dstate + offs_n[None, :], pmask[:, None] & nmask[None, :], FULL
    )  # (BLOCK_P, BLOCK_N), as stored
    scale = exp_ftz(cs_end - cs_s)
    if HAS_SEQ:
        seq_s = tl.load(seq_ptr + b * ss_b + ts * ss_l, mask=smask, other=0)
        seq_end = tl.load(seq_ptr + b * ss_b + last * ss_l)
        scale = tl.where(seq_s == seq_end, scale, 0.0)
    scale = tl.where(smask, scale, 0.0)
    dxdt = tl.dot(Bs, tl.trans(G.to(XDT).to(DOT)), input_precision=PREC).to(ACC) * scale[:, None]
    xs_acc = load_tile(
        x_ptr + b * sx_b + ts[:, None] * sx_l + h * sx_h + offs_p[None, :] * sx_p, sp_mask, FULL
    )
    xs_dot = xs_acc.to(XDT).to(DOT)
    xs_acc = xs_acc.to(ACC)
    # d cs column shares, in fp32 from the very products the row and chunk-end shares use, so that
    # their cancellation is exact up to fp32 (bf16-rounded dot operands would leave ~1e-1 in d A)
    col_state = tl.sum(xs_acc * dxdt, 1) * delta_s
    col_chunk = tl.zeros((BLOCK_M,), dtype=ACC)

    # through the outputs of this chunk at t >= s
    for k0 in range(m * BLOCK_M, chunk_len, BLOCK_K):
        t_idx = k0 + tl.arange(0, BLOCK_K)
        tmask = t_idx < chunk_len
        tt = start + t_idx
        # C_t . B_s, recomputed per head: as many bytes as reading a shared fp32 copy, and the product
        # comes out in the layout of x dy^T below, which a loaded copy did not (Triton then formed
        # the decays twice, once per layout: 730 against 432 instructions a diagonal tile, sm_90)
        Ct = (
            load_tile(
                C_ptr + b * sC_b + tt[:, None] * sC_l + g * sC_g + offs_n[None, :] * sC_n,
                tmask[:, None] & nmask[None, :],
                FULL,
            )
            .to(XDT)
            .to(DOT)
        )
        cbT = tl.dot(Bs, tl.trans(Ct), input_precision=PREC).to(ACC)
        dyt = (
            load_tile(
                dy_ptr + b * sy_b + tt[:, None] * sy_l + h * sy_h + offs_p[None, :] * sy_p,
                tmask[:, None] & pmask[None, :],
                FULL,
            )
            .to(XDT)
            .to(DOT)
        )
        cs_t = load_tile(cs_ptr + dcs_base + tt, tmask, FULL)
        keep, masked = causal_keep(s_idx, t_idx, tmask, k0 < (m + 1) * BLOCK_M, FULL, HAS_SEQ)
        if HAS_SEQ:
            seq_t = tl.load(seq_ptr + b * ss_b + tt * ss_l, mask=tmask, other=0)
            keep = keep & (seq_s[:, None] == seq_t[None, :])
        Lt = causal_decay(cs_t[None, :] - cs_s[:, None], keep, masked)  # (BLOCK_M, BLOCK_K)
        W = cbT * Lt  # (BLOCK_M, BLOCK_K): (C_t . B_s) exp(cs_t - cs_s)
        dxdt += tl.dot(W.to(XDT).to(DOT), dyt, input_precision=PREC).to(ACC)
        xdy = tl.dot(xs_dot, tl.trans(dyt), input_precision=PREC).to(ACC)
        col_chunk += tl.sum(W * xdy, 1)

    xs = xs_acc
    dx = dxdt * delta_s[:, None]
    if HAS_D:
        dys = load_tile(
            dy_ptr + b * sy_b + ts[:, None] * sy_l + h * sy_h + offs_p[None, :] * sy_p, sp_mask, FULL
        ).to(ACC)
        Dp = load_tile(D_ptr + h * headdim + offs_p, pmask, FULL).to(ACC)
        dx += dys * Dp[None, :]
        dD = tl.sum(dys * xs, 0)
        store_tile(dD_ptr + (((b * nchunks + c) * nmb + m) * nheads + h) * headdim + offs_p, dD, pmask, FULL)
    store_tile(
        dx_ptr + b * sdx_b + ts[:, None] * sdx_l + h * sdx_h + offs_p[None, :] * sdx_p,
        dx.to(dx_ptr.dtype.element_ty),
        sp_mask,
        FULL,
    )
    store_tile(ddelta_ptr + dcs_base + ts, tl.sum(xs * dxdt, 1), smask, FULL)
    store_tile(dcs_col_ptr + dcs_base + ts, col_chunk * delta_s + col_state, smask, FULL)
    store_tile(dcs_st_ptr + dcs_base + ts, col_state, smask, FULL)


@chunk_tuned
@triton.jit
def chunk_bwd_dB_kernel(
    x_ptr, C_ptr, seq_ptr, delta_ptr, cs_ptr, G_ptr, dy_ptr,
    dB_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group, heads_per_prog, nsplit,
    tune_bucket,
    sx_b, sx_l, sx_h, sx_p,
    sC_b, sC_l, sC_g, sC_n,
    sy_b, sy_l, sy_h, sy_p,
    ss_b, ss_l,
    HAS_SEQ: tl.constexpr, FULL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0)
    batch = tl.num_programs(1) // nchunks
    b = tl.program_id(1) // nchunks
    c = tl.program_id(1) % nchunks
    g = tl.program_id(2) // nsplit
    split = tl.program_id(2) % nsplit
    ACC = G_ptr.dtype.element_ty
    XDT = x_ptr.dtype.element_ty  # tensor-core operand dtype
    DOT = XDT
    if DOT_F32:  # see _common.dot_in_fp32: operands still rounded to XDT first, as on a GPU
        DOT = tl.float32
    start = c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - start)
    last = start + chunk_len - 1
    h0 = g * heads_per_group + split * heads_per_prog

    s_idx = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    smask = s_idx < chunk_len
    pmask = offs_p < headdim
    nmask = offs_n < dstate
    ts = start + s_idx
    sp_mask = smask[:, None] & pmask[None, :]
    if HAS_SEQ:
        seq_s = tl.load(seq_ptr + b * ss_b + ts * ss_l, mask=smask, other=0)
        seq_end = tl.load(seq_ptr + b * ss_b + last * ss_l)
    dB = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)

    # through the state leaving the chunk
    for j in range(heads_per_prog):
        h = h0 + j
        dcs_base = (b * nheads + h) * seqlen
        cs_s = load_tile(cs_ptr + dcs_base + ts, smask, FULL)
        delta_s = load_tile(delta_ptr + dcs_base + ts, smask, FULL)
        cs_end = tl.load(cs_ptr + dcs_base + last)
        xs = (
            load_tile(
                x_ptr + b * sx_b + ts[:, None] * sx_l + h * sx_h + offs_p[None, :] * sx_p, sp_mask, FULL
            )
            .to(XDT)
            .to(DOT)
        )
        st_off = ((b * nchunks + c) * nheads + h) * headdim * dstate
        G = load_tile(
            G_ptr + st_off + offs_p[:, None] * dstate + offs_n[None, :], pmask[:, None] & nmask[None, :], FULL
        )  # (BLOCK_P, BLOCK_N)
        scale = exp_ftz(cs_end - cs_s) * delta_s
        if HAS_SEQ:
            scale = tl.where(seq_s == seq_end, scale, 0.0)
        dB += tl.dot(xs, G.to(XDT).to(DOT), input_precision=PREC).to(ACC) * scale[:, None]

    # through the outputs of this chunk at t >= s
    for k0 in range(m * BLOCK_M, chunk_len, BLOCK_K):
        t_idx = k0 + tl.arange(0, BLOCK_K)
        tmask = t_idx < chunk_len
        tt = start + t_idx
        Ct = (
            load_tile(
                C_ptr + b * sC_b + tt[:, None] * sC_l + g * sC_g + offs_n[None, :] * sC_n,
                tmask[:, None] & nmask[None, :],
                FULL,
            )
            .to(XDT)
            .to(DOT)
        )
        keep, masked = causal_keep(s_idx, t_idx, tmask, k0 < (m + 1) * BLOCK_M, FULL, HAS_SEQ)
        if HAS_SEQ:
            seq_t = tl.load(seq_ptr + b * ss_b + tt * ss_l, mask=tmask, other=0)
            keep = keep & (seq_s[:, None] == seq_t[None, :])
        for j in range(heads_per_prog):
            h = h0 + j
            dcs_base = (b * nheads + h) * seqlen
            cs_s = load_tile(cs_ptr + dcs_base + ts, smask, FULL)
            delta_s = load_tile(delta_ptr + dcs_base + ts, smask, FULL)
            cs_t = load_tile(cs_ptr + dcs_base + tt, tmask, FULL)
            xs = (
                load_tile(
                    x_ptr + b * sx_b + ts[:, None] * sx_l + h * sx_h + offs_p[None, :] * sx_p, sp_mask, FULL
                )
                .to(XDT)
                .to(DOT)
            )
            dyt = (
                load_tile(
                    dy_ptr + b * sy_b + tt[:, None] * sy_l + h * sy_h + offs_p[None, :] * sy_p,
                    tmask[:, None] & pmask[None, :],
                    FULL,
                )
                .to(XDT)
                .to(DOT)
            )
            Lt = causal_decay(cs_t[None, :] - cs_s[:, None], keep, masked)  # (BLOCK_M, BLOCK_K)
            xdy = tl.dot(xs, tl.trans(dyt), input_precision=PREC).to(ACC)
            dB += tl.dot((xdy * Lt * delta_s[:, None]).to(XDT).to(DOT), Ct, input_precision=PREC).to(ACC)

    # partial sums: (nsplit, batch, seqlen, ngroups, dstate), contiguous
    ngroups = nheads // heads_per_group
    dB_off = (((split * batch + b) * seqlen + ts[:, None]) * ngroups + g) * dstate
    store_tile(dB_ptr + dB_off + offs_n[None, :], dB, smask[:, None] & nmask[None, :], FULL)


@chunk_tuned
@triton.jit
def chunk_bwd_dC_kernel(
    x_ptr, B_ptr, C_ptr, seq_ptr, delta_ptr, cs_ptr, states_ptr, dy_ptr,
    dC_ptr, dcs_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group, heads_per_prog, nsplit,
    tune_bucket,
    sx_b, sx_l, sx_h, sx_p,
    sB_b, sB_l, sB_g, sB_n,
    sC_b, sC_l, sC_g, sC_n,
    sy_b, sy_l, sy_h, sy_p,
    ss_b, ss_l,
    HAS_SEQ: tl.constexpr, FULL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0)
    batch = tl.num_programs(1) // nchunks
    b = tl.program_id(1) // nchunks
    c = tl.program_id(1) % nchunks
    g = tl.program_id(2) // nsplit
    split = tl.program_id(2) % nsplit
    ACC = states_ptr.dtype.element_ty
    XDT = x_ptr.dtype.element_ty  # tensor-core operand dtype
    DOT = XDT
    if DOT_F32:  # see _common.dot_in_fp32: operands still rounded to XDT first, as on a GPU
        DOT = tl.float32
    start = c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - start)

    r = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    rmask = r < chunk_len
    pmask = offs_p < headdim
    nmask = offs_n < dstate
    t = start + r
    if HAS_SEQ:
        seq_r = tl.load(seq_ptr + b * ss_b + t * ss_l, mask=rmask, other=0)
        seq_prev = tl.load(seq_ptr + b * ss_b + tl.maximum(start - 1, 0) * ss_l)
    dC = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    hi = tl.minimum((m + 1) * BLOCK_M, chunk_len)
    Cr = (
        load_tile(
            C_ptr + b * sC_b + t[:, None] * sC_l + g * sC_g + offs_n[None, :] * sC_n,
            rmask[:, None] & nmask[None, :],
            FULL,
        )
        .to(XDT)
        .to(DOT)
    )

    # heads inside, positions outside: the innermost loop is straight-line work on one head, so the
    # only values carried across it are the dC accumulator (nested position loops inside a head loop
    # made the compiler spill); dcs, per head, is accumulated in memory by this program alone.
    for j in range(heads_per_prog):
        h = g * heads_per_group + split * heads_per_prog + j
        dcs_base = (b * nheads + h) * seqlen
        cs_r = load_tile(cs_ptr + dcs_base + t, rmask, FULL)
        dyr = (
            load_tile(
                dy_ptr + b * sy_b + t[:, None] * sy_l + h * sy_h + offs_p[None, :] * sy_p,
                rmask[:, None] & pmask[None, :],
                FULL,
            )
            .to(XDT)
            .to(DOT)
        )
        st_off = ((b * nchunks + c) * nheads + h) * headdim * dstate
        S = load_tile(
            states_ptr + st_off + offs_p[:, None] * dstate + offs_n[None, :],
            pmask[:, None] & nmask[None, :],
            FULL,
        )  # (BLOCK_P, BLOCK_N)
        scale = exp_ftz(cs_r)
        if HAS_SEQ:
            scale = tl.where(seq_r == seq_prev, scale, 0.0)
        dyS = tl.dot(dyr, S.to(XDT).to(DOT), input_precision=PREC).to(ACC) * scale[:, None]
        dC += dyS
        store_tile(
            dcs_ptr + dcs_base + t, tl.sum(dyS * Cr.to(ACC), 1), rmask, FULL
        )  # dy_t . (state part of y_t)

    for k0 in range(0, hi, BLOCK_K):
        # dcs rows are read back below: make every thread's earlier stores visible first
        tl.debug_barrier()
        s_idx = k0 + tl.arange(0, BLOCK_K)
        smask = s_idx < chunk_len
        ts = start + s_idx
        Bs = (
            load_tile(
                B_ptr + b * sB_b + ts[:, None] * sB_l + g * sB_g + offs_n[None, :] * sB_n,
                smask[:, None] & nmask[None, :],
                FULL,
            )
            .to(XDT)
            .to(DOT)
        )
        cb = tl.dot(Cr, tl.trans(Bs), input_precision=PREC).to(ACC)  # shared by the heads of the group
        keep, masked = causal_keep(r, s_idx, smask, k0 + BLOCK_K > m * BLOCK_M, FULL, HAS_SEQ, True)
        if HAS_SEQ:
            seq_s = tl.load(seq_ptr + b * ss_b + ts * ss_l, mask=smask, other=0)
            keep = keep & (seq_r[:, None] == seq_s[None, :])
        for j in range(heads_per_prog):
            h = g * heads_per_group + split * heads_per_prog + j
            dcs_base = (b * nheads + h) * seqlen
            cs_r = load_tile(cs_ptr + dcs_base + t, rmask, FULL)
            dyr = (
                load_tile(
                    dy_ptr + b * sy_b + t[:, None] * sy_l + h * sy_h + offs_p[None, :] * sy_p,
                    rmask[:, None] & pmask[None, :],
                    FULL,
                )
                .to(XDT)
                .to(DOT)
            )
            xs = (
                load_tile(
                    x_ptr + b * sx_b + ts[:, None] * sx_l + h * sx_h + offs_p[None, :] * sx_p,
                    smask[:, None] & pmask[None, :],
                    FULL,
                )
                .to(XDT)
                .to(DOT)
            )
            cs_s = load_tile(cs_ptr + dcs_base + ts, smask, FULL)
            delta_s = load_tile(delta_ptr + dcs_base + ts, smask, FULL)
            L = causal_decay(cs_r[:, None] - cs_s[None, :], keep, masked)
            dyx = tl.dot(dyr, tl.trans(xs), input_precision=PREC).to(ACC)  # (BLOCK_M, BLOCK_K)
            E = dyx * L * delta_s[None, :]
            dC += tl.dot(E.to(XDT).to(DOT), Bs, input_precision=PREC).to(ACC)
            # dy_t . (chunk part of y_t), recomputed in fp32; rows t belong to this program alone
            dcs_old = load_tile(dcs_ptr + dcs_base + t, rmask, FULL)
            store_tile(dcs_ptr + dcs_base + t, dcs_old + tl.sum(E * cb, 1), rmask, FULL)

    ngroups = nheads // heads_per_group
    dC_off = (((split * batch + b) * seqlen + t[:, None]) * ngroups + g) * dstate
    store_tile(dC_ptr + dC_off + offs_n[None, :], dC, rmask[:, None] & nmask[None, :], FULL)
