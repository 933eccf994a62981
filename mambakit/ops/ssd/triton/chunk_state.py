"""Forward pass 1 of 3: dt processing, in-chunk cumulative decay and each chunk's own state.

One program owns a (headdim block x dstate block) tile of one (batch, chunk, head) and computes what
the chunk adds to the state by itself,
    L[c] = sum_s exp(cs_end - cs_s) * delta_s * x_s B_s^T        (tl.dot, tensor cores),
writing it where `state_passing` then turns it, in place, into the state entering c. Programs with
tile (0, 0) also write delta and the in-chunk cumsum cs of delta * A, which the passing, the output
pass and backward read. A chunk is walked SUB rows at a time, once. With seq_idx, only the last
document of a chunk contributes.
All chunks run in parallel (batch * nchunks * nheads programs at a whole-state tile); only the light
elementwise passing is sequential over chunks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mambakit.ops.ssd.triton._common import process_dt


@triton.jit
def chunk_state_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, bias_ptr, B_ptr, seq_ptr,
    delta_ptr, cs_ptr, states_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group, dt_min, dt_max,
    sx_b, sx_l, sx_h, sx_p,
    sdt_b, sdt_l, sdt_h,
    sB_b, sB_l, sB_g, sB_n,
    ss_b, ss_l,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    BLOCK_Q: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    pid_pn = tl.program_id(0)
    b = tl.program_id(1) // nchunks
    c = tl.program_id(1) % nchunks
    h = tl.program_id(2)
    npb = tl.cdiv(headdim, BLOCK_P)
    pb = pid_pn % npb
    nb = pid_pn // npb
    ACC = states_ptr.dtype.element_ty
    XDT = x_ptr.dtype.element_ty  # tensor-core operand dtype
    DOT = XDT
    if DOT_F32:  # see _common.dot_in_fp32: operands still rounded to XDT first, as on a GPU
        DOT = tl.float32
    g = h // heads_per_group

    offs_s = tl.arange(0, SUB)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    pmask = offs_p < headdim
    nmask = offs_n < dstate
    pn_mask = pmask[:, None] & nmask[None, :]
    # states is contiguous (batch, nchunks, nheads, headdim, dstate)
    pn_off = offs_p[:, None] * dstate + offs_n[None, :]

    A = tl.load(A_ptr + h).to(ACC)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + h).to(ACC)
    dcs_base = (b * nheads + h) * seqlen  # delta / cs are (batch, nheads, seqlen)
    start = c * chunk_size
    last = tl.minimum(start + chunk_size, seqlen) - 1
    if HAS_SEQ:
        seq_end = tl.load(seq_ptr + b * ss_b + last * ss_l)

    # SUB rows at a time (small operand tiles, so that a whole dstate fits one tile and x is read once).
    # Each sub-block's rows are weighted by their decay to the sub-block's end, and the sum so far
    # decays by the sub-block's total: one pass, and every factor is <= 1 (no overflow).
    carry = 0.0  # cs at the end of the previous sub-block
    local = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
    for sb in tl.static_range(0, BLOCK_Q, SUB):
        q = sb + offs_s
        t = start + q
        qmask = (q < chunk_size) & (t < seqlen)
        dt = tl.load(dt_ptr + b * sdt_b + t * sdt_l + h * sdt_h, mask=qmask, other=0.0).to(ACC)
        delta = tl.where(qmask, process_dt(dt, bias, SOFTPLUS, HAS_LIMIT, dt_min, dt_max), 0.0)
        a = delta * A
        cs = carry + tl.cumsum(a, axis=0)
        sb_total = tl.sum(a, axis=0)
        writer = qmask & ((offs_s * 0 + pid_pn) == 0)  # one tile per (batch, chunk, head) writes delta, cs
        tl.store(delta_ptr + dcs_base + t, delta, mask=writer)
        tl.store(cs_ptr + dcs_base + t, cs, mask=writer)
        w = tl.exp(carry + sb_total - cs) * delta
        carry += sb_total
        if HAS_SEQ:
            seq = tl.load(seq_ptr + b * ss_b + t * ss_l, mask=qmask, other=0)
            w = tl.where(seq == seq_end, w, 0.0)
        w = tl.where(qmask, w, 0.0)
        x = tl.load(
            x_ptr + b * sx_b + t[:, None] * sx_l + h * sx_h + offs_p[None, :] * sx_p,
            mask=qmask[:, None] & pmask[None, :],
            other=0.0,
        )
        Bt = tl.load(
            B_ptr + b * sB_b + t[:, None] * sB_l + g * sB_g + offs_n[None, :] * sB_n,
            mask=qmask[:, None] & nmask[None, :],
            other=0.0,
        )
        xw = (x.to(ACC) * w[:, None]).to(XDT).to(DOT)
        part = tl.dot(tl.trans(xw), Bt.to(XDT).to(DOT), input_precision=PREC).to(ACC)
        local = local * tl.exp(sb_total) + part

    st_off = ((b * nchunks + c) * nheads + h) * headdim * dstate
    tl.store(states_ptr + st_off + pn_off, local, mask=pn_mask)
