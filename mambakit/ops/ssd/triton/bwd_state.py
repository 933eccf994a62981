"""Backward, first pass (then `bwd_chunk`): gradients of the states.

T_c, the gradient of the state entering chunk c, obeys (decay_c = exp(cs_end of c), zero across a
document boundary inside c)
    T_nchunks = d final_state,   T_c = dS_out[c] + decay_c * T_{c+1},   d initial_state = T_0
where dS_out[c] = sum_t exp(cs_t) dy_t^T C_t is what the outputs of c read from the state (tl.dot).
Here one program owns a (headdim block x dstate block) tile of one (batch, chunk, head), all chunks in
parallel, and writes dS_out[c] into G; `state_passing` then walks the chunks in reverse and turns G[c]
into T_{c+1} in place (the gradient of what chunk c adds to the state, read by the chunk kernels),
together with each block's share of decay_c <T_{c+1}, S_c>, the gradient of chunk c's total
log-decay through the carried state. The chunk's own exp(cs_end - cs_s) weights add their share to
cs_end from the dx kernel, where the same numbers are subtracted at each s.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_state_bwd_kernel(
    dy_ptr, C_ptr, seq_ptr, cs_ptr,
    G_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group,
    sy_b, sy_l, sy_h, sy_p,
    sC_b, sC_l, sC_g, sC_n,
    ss_b, ss_l,
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
    ACC = G_ptr.dtype.element_ty
    XDT = C_ptr.dtype.element_ty  # tensor-core operand dtype
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
    pn_off = offs_p[:, None] * dstate + offs_n[None, :]
    dcs_base = (b * nheads + h) * seqlen
    start = c * chunk_size
    if HAS_SEQ:
        seq_prev = tl.load(seq_ptr + b * ss_b + tl.maximum(start - 1, 0) * ss_l)
    # SUB rows at a time: small operand tiles, so a whole dstate fits one program's tile
    dS_out = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
    for sb in tl.static_range(0, BLOCK_Q, SUB):
        q = sb + offs_s
        t = start + q
        qmask = (q < chunk_size) & (t < seqlen)
        w = tl.exp(tl.load(cs_ptr + dcs_base + t, mask=qmask, other=0.0))
        if HAS_SEQ:
            seq = tl.load(seq_ptr + b * ss_b + t * ss_l, mask=qmask, other=0)
            w = tl.where(seq == seq_prev, w, 0.0)
        w = tl.where(qmask, w, 0.0)
        dy = tl.load(
            dy_ptr + b * sy_b + t[:, None] * sy_l + h * sy_h + offs_p[None, :] * sy_p,
            mask=qmask[:, None] & pmask[None, :],
            other=0.0,
        )
        Ct = tl.load(
            C_ptr + b * sC_b + t[:, None] * sC_l + g * sC_g + offs_n[None, :] * sC_n,
            mask=qmask[:, None] & nmask[None, :],
            other=0.0,
        )
        dyw = (dy.to(ACC) * w[:, None]).to(XDT).to(DOT)
        dS_out += tl.dot(tl.trans(dyw), Ct.to(XDT).to(DOT), input_precision=PREC).to(ACC)
    st_off = ((b * nchunks + c) * nheads + h) * headdim * dstate
    tl.store(G_ptr + st_off + pn_off, dS_out, mask=pn_mask)
