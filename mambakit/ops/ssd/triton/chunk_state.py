"""Per-chunk kernels before the sequential pass: the in-chunk cumulative decay, and each chunk's own
state (forward) or the gradient its outputs send to the state entering it (backward).

`chunk_cumsum_kernel` processes dt (bias, softplus, clamp) into delta and the in-chunk cumsum cs of
delta * A, both (batch, nheads, seqlen), which every later kernel reads.

`chunk_state_fwd_kernel`: one program per (headdim block x dstate block) tile of one (batch, chunk,
head) computes what the chunk adds to the state by itself,
    L[c] = sum_s exp(cs_end - cs_s) * delta_s * x_s B_s^T        (tl.dot, tensor cores)
(with seq_idx only the chunk's last document contributes), writing it where `state_passing` then turns
it, in place, into the state entering c.
`chunk_state_bwd_kernel`: the same tile program for the backward,
    dS_out[c] = sum_t exp(cs_t) * dy_t^T C_t
(with seq_idx only rows still in the document the entering state belongs to), which the reverse
`state_passing` turns into the gradients of the chunk states.

Both walk a chunk SUB rows at a time (small operand tiles, so that a whole dstate fits one tile and
x or dy is read once). All chunks run in parallel (batch * nchunks * nheads programs at a whole-state
tile); only the light elementwise passing is sequential over chunks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mambakit.ops._triton_math import exp_ftz
from mambakit.ops.ssd.triton._common import process_dt


@triton.jit
def chunk_cumsum_kernel(
    dt_ptr, A_ptr, bias_ptr, delta_ptr, cs_ptr,
    seqlen, nheads, chunk_size, nchunks, dt_min, dt_max,
    sdt_b, sdt_l, sdt_h,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0) // nchunks
    c = tl.program_id(0) % nchunks
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    q = tl.arange(0, BLOCK_Q)
    t = c * chunk_size + q
    qmask = (q < chunk_size) & (t < seqlen)
    hmask = offs_h < nheads
    mask = qmask[:, None] & hmask[None, :]
    ACC = cs_ptr.dtype.element_ty
    A = tl.load(A_ptr + offs_h, mask=hmask, other=0.0).to(ACC)
    bias = tl.zeros((BLOCK_H,), dtype=ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_h, mask=hmask, other=0.0).to(ACC)
    # dt is (batch, seqlen, nheads): a (positions x heads) tile reads whole rows of heads
    dt = tl.load(dt_ptr + b * sdt_b + t[:, None] * sdt_l + offs_h[None, :] * sdt_h, mask=mask, other=0.0)
    delta = tl.where(mask, process_dt(dt.to(ACC), bias[None, :], SOFTPLUS, HAS_LIMIT, dt_min, dt_max), 0.0)
    cs = tl.cumsum(delta * A[None, :], axis=0)
    out = (b * nheads + offs_h[None, :]) * seqlen + t[:, None]  # (batch, nheads, seqlen)
    tl.store(delta_ptr + out, delta, mask=mask)
    tl.store(cs_ptr + out, cs, mask=mask)


@triton.jit
def _state_tile(
    v_ptr, m_ptr, cs_ptr, delta_ptr, seq_ptr, out_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group,
    sv_b, sv_l, sv_h, sv_p,
    sm_b, sm_l, sm_g, sm_n,
    ss_b, ss_l,
    FORWARD: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_Q: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    """out[b, c, h] tile = sum_t w_t * v_t^T m_t over chunk c: v = x, m = B, w = exp(cs_end - cs) * delta
    forward; v = dy, m = C, w = exp(cs) backward."""
    pid_pn = tl.program_id(0)
    b = tl.program_id(1) // nchunks
    c = tl.program_id(1) % nchunks
    h = tl.program_id(2)
    npb = tl.cdiv(headdim, BLOCK_P)
    pb = pid_pn % npb
    nb = pid_pn // npb
    ACC = out_ptr.dtype.element_ty
    XDT = m_ptr.dtype.element_ty  # tensor-core operand dtype
    DOT = XDT
    if DOT_F32:  # see _common.dot_in_fp32: operands still rounded to XDT first, as on a GPU
        DOT = tl.float32
    g = h // heads_per_group

    offs_s = tl.arange(0, SUB)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    pmask = offs_p < headdim
    nmask = offs_n < dstate
    dcs_base = (b * nheads + h) * seqlen  # delta / cs are (batch, nheads, seqlen)
    start = c * chunk_size
    last = tl.minimum(start + chunk_size, seqlen) - 1
    cs_end = tl.load(cs_ptr + dcs_base + last)
    if HAS_SEQ:
        if FORWARD:  # the chunk's last document is the one its state carries on
            seq_keep = tl.load(seq_ptr + b * ss_b + last * ss_l)
        else:  # the document the entering state belongs to
            seq_keep = tl.load(seq_ptr + b * ss_b + tl.maximum(start - 1, 0) * ss_l)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
    for sb in tl.static_range(0, BLOCK_Q, SUB):
        q = sb + offs_s
        t = start + q
        qmask = (q < chunk_size) & (t < seqlen)
        cs = tl.load(cs_ptr + dcs_base + t, mask=qmask, other=0.0)
        if FORWARD:
            w = exp_ftz(cs_end - cs) * tl.load(delta_ptr + dcs_base + t, mask=qmask, other=0.0)
        else:
            w = exp_ftz(cs)
        if HAS_SEQ:
            seq = tl.load(seq_ptr + b * ss_b + t * ss_l, mask=qmask, other=0)
            w = tl.where(seq == seq_keep, w, 0.0)
        w = tl.where(qmask, w, 0.0)
        v = tl.load(
            v_ptr + b * sv_b + t[:, None] * sv_l + h * sv_h + offs_p[None, :] * sv_p,
            mask=qmask[:, None] & pmask[None, :],
            other=0.0,
        )
        m = tl.load(
            m_ptr + b * sm_b + t[:, None] * sm_l + g * sm_g + offs_n[None, :] * sm_n,
            mask=qmask[:, None] & nmask[None, :],
            other=0.0,
        )
        vw = (v.to(ACC) * w[:, None]).to(XDT).to(DOT)
        acc += tl.dot(tl.trans(vw), m.to(XDT).to(DOT), input_precision=PREC).to(ACC)
    # out is contiguous (batch, nchunks, nheads, headdim, dstate)
    st_off = ((b * nchunks + c) * nheads + h) * headdim * dstate
    pn_off = offs_p[:, None] * dstate + offs_n[None, :]
    tl.store(out_ptr + st_off + pn_off, acc, mask=pmask[:, None] & nmask[None, :])


@triton.jit
def chunk_state_fwd_kernel(
    x_ptr, B_ptr, cs_ptr, delta_ptr, seq_ptr, states_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group,
    sx_b, sx_l, sx_h, sx_p,
    sB_b, sB_l, sB_g, sB_n,
    ss_b, ss_l,
    HAS_SEQ: tl.constexpr,
    BLOCK_Q: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    _state_tile(
        x_ptr, B_ptr, cs_ptr, delta_ptr, seq_ptr, states_ptr,
        seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group,
        sx_b, sx_l, sx_h, sx_p, sB_b, sB_l, sB_g, sB_n, ss_b, ss_l,
        True, HAS_SEQ, BLOCK_Q, SUB, BLOCK_P, BLOCK_N, PREC, DOT_F32,
    )  # fmt: skip


@triton.jit
def chunk_state_bwd_kernel(
    dy_ptr, C_ptr, cs_ptr, seq_ptr, G_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group,
    sy_b, sy_l, sy_h, sy_p,
    sC_b, sC_l, sC_g, sC_n,
    ss_b, ss_l,
    HAS_SEQ: tl.constexpr,
    BLOCK_Q: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    _state_tile(  # no delta backward: cs_ptr stands in for it, never read
        dy_ptr, C_ptr, cs_ptr, cs_ptr, seq_ptr, G_ptr,
        seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group,
        sy_b, sy_l, sy_h, sy_p, sC_b, sC_l, sC_g, sC_n, ss_b, ss_l,
        False, HAS_SEQ, BLOCK_Q, SUB, BLOCK_P, BLOCK_N, PREC, DOT_F32,
    )  # fmt: skip
