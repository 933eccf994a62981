"""The sequential SSD backward (opt-in, `MAMBAKIT_SSD_BWD_PATH=sequential`: right on the H200, but its
kernel took 9.0 ms at the benchmark anchor, seqlen 8192, against ~4.6 ms for the chunked backward).

One program per (batch, head) walks the sequence in reverse, SUB rows at a time, carrying dR, the
gradient of the state after the current sub-block (from d final_state at the end). For each chunk it
first recomputes the states R_k entering its sub-blocks from the saved chunk state (a short forward
walk, kept in a scratch buffer), then, per sub-block, with cs relative to R_k, cse its value at the
sub-block's last row, W_ts = (C_t . B_s) exp(cs_t - cs_s) for t >= s (one document) and
wout_s = exp(cse - cs_s) delta_s:
    d(delta_s x_s) = sum_t W_ts dy_t + exp(cse - cs_s) dR B_s           -> dx, d delta (direct)
    dB_s = delta_s sum_t exp(cs_t - cs_s) (dy_t . x_s) C_t + wout_s dR^T x_s
    dC_t = exp(cs_t) dy_t R_k + sum_s exp(cs_t - cs_s) delta_s (dy_t . x_s) B_s
    d a_u = sum of all (t >= u, s < u) pairs through position u:
          = sum_{t >= u} rowcum_t[u] + sum_{t >= u} w_t + exp(cse) <dR, R_k> + sum_{s < u} v_s
      with M_ts = W_ts delta_s (dy_t . x_s), rowcum_t[u] = sum_{s < u} M_ts, w_t = exp(cs_t) dy_t . (R_k C_t)
      (t reads R_k), v_s = wout_s x_s . (dR B_s) (s feeds dR)
    dR <- exp(cse) dR + sum_t exp(cs_t) dy_t C_t^T
d a is the gradient of a_u = delta_u A; d delta = direct + A d a and dA = sum delta d a. Written as a
sum over the pairs that straddle u, d a never forms the large row and column sums whose difference
the chunked backward takes (see `bwd_chunk.py`). dB and dC are summed over the heads of a group by
atomic adds (float32; the order of the adds varies between runs). A float64 prototype of these
formulas matched autograd to ~1e-15 (2026-12-01).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from mambakit.ops._triton_math import exp_ftz
from mambakit.ops.ssd.triton._common import dot_in_fp32, dot_precision, interpreting, pow2_at_least
from mambakit.ops.ssd.triton.chunk_scan import carry_state


@triton.jit
def ssd_bwd_seq_kernel(
    x_ptr, B_ptr, C_ptr, dy_ptr, D_ptr, seq_ptr, delta_ptr, cs_ptr, states_ptr, dfinal_ptr, scratch_ptr,
    dx_ptr, ddelta_ptr, da_ptr, dB_ptr, dC_ptr, dD_ptr, dh0_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group, nsub,
    sx_b, sx_l, sx_h, sx_p,
    sB_b, sB_l, sB_g, sB_n,
    sC_b, sC_l, sC_g, sC_n,
    sy_b, sy_l, sy_h, sy_p,
    sdx_b, sdx_l, sdx_h, sdx_p,
    ss_b, ss_l,
    HAS_D: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_DFINAL: tl.constexpr,
    SUB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(0)
    b = tl.program_id(1)
    g = h // heads_per_group
    ngroups = nheads // heads_per_group
    ACC = states_ptr.dtype.element_ty
    XDT = x_ptr.dtype.element_ty  # tensor-core operand dtype
    DOT = XDT
    if DOT_F32:  # see _common.dot_in_fp32: operands still rounded to XDT first, as on a GPU
        DOT = tl.float32

    offs_q = tl.arange(0, SUB)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    pmask = offs_p < headdim
    nmask = offs_n < dstate
    pn_mask = pmask[:, None] & nmask[None, :]
    pn_off = offs_p[:, None] * dstate + offs_n[None, :]
    bh = b * nheads + h
    dcs_base = bh * seqlen
    scratch = scratch_ptr + bh * nsub * BLOCK_P * BLOCK_N + offs_p[:, None] * BLOCK_N + offs_n[None, :]
    tri = offs_q[:, None] >= offs_q[None, :]  # (t, s): t >= s

    if HAS_DFINAL:
        dRT = tl.load(dfinal_ptr + bh * headdim * dstate + pn_off, mask=pn_mask, other=0.0).to(ACC)
    else:
        dRT = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)  # (headdim, dstate)
    if HAS_D:
        Dp = tl.load(D_ptr + h * headdim + offs_p, mask=pmask, other=0.0).to(ACC)
        dD = tl.zeros((BLOCK_P,), dtype=ACC)

    for ci in range(nchunks):
        c = nchunks - 1 - ci
        start = c * chunk_size
        chunk_len = tl.minimum(chunk_size, seqlen - start)
        nsub_c = tl.cdiv(chunk_len, SUB)

        # 1. the states entering the chunk's sub-blocks, from the saved chunk state
        RT = tl.load(states_ptr + ((b * nchunks + c) * nheads + h) * headdim * dstate + pn_off, mask=pn_mask)
        cs_ref = (start * 0).to(ACC)
        seq_ref = 0
        if HAS_SEQ:
            seq_ref = tl.load(seq_ptr + b * ss_b + tl.maximum(start - 1, 0) * ss_l)
        for k in range(nsub_c):
            tl.store(scratch + k * BLOCK_P * BLOCK_N, RT)
            r = k * SUB + offs_q
            rmask = r < chunk_len
            t = start + r
            cs_r = tl.load(cs_ptr + dcs_base + t, mask=rmask, other=0.0)
            e = tl.minimum(k * SUB + SUB, chunk_len) - 1
            cs_e = tl.load(cs_ptr + dcs_base + start + e)
            delta_r = tl.load(delta_ptr + dcs_base + t, mask=rmask, other=0.0)
            seq_r = cs_r  # unused stand-ins without seq_idx
            seq_e = cs_e
            if HAS_SEQ:
                seq_r = tl.load(seq_ptr + b * ss_b + t * ss_l, mask=rmask, other=0)
                seq_e = tl.load(seq_ptr + b * ss_b + (start + e) * ss_l)
            xT = tl.load(
                x_ptr + b * sx_b + t[None, :] * sx_l + h * sx_h + offs_p[:, None] * sx_p,
                mask=pmask[:, None] & rmask[None, :],
                other=0.0,
            )
            Br = tl.load(
                B_ptr + b * sB_b + t[:, None] * sB_l + g * sB_g + offs_n[None, :] * sB_n,
                mask=rmask[:, None] & nmask[None, :],
                other=0.0,
            ).to(XDT).to(DOT)  # fmt: skip
            RT = carry_state(
                RT, xT, Br, cs_r, delta_r, rmask, seq_r, cs_ref, seq_ref, cs_e, seq_e, HAS_SEQ, PREC
            )
            cs_ref = cs_e
            if HAS_SEQ:
                seq_ref = seq_e

        # 2. the sub-blocks in reverse
        for kk in range(nsub_c):
            k = nsub_c - 1 - kk
            q0 = k * SUB
            r = q0 + offs_q
            rmask = r < chunk_len
            t = start + r
            RTk = tl.load(scratch + k * BLOCK_P * BLOCK_N)
            cs_r = tl.load(cs_ptr + dcs_base + t, mask=rmask, other=0.0)
            delta_r = tl.load(delta_ptr + dcs_base + t, mask=rmask, other=0.0)
            # cs at the row before the sub-block (0 at the chunk start)
            before = cs_ptr + dcs_base + start + q0 - 1 + offs_q * 0
            cs_ref = tl.sum(tl.load(before, mask=(offs_q == 0) & (offs_q * 0 + q0 > 0), other=0.0), 0)
            e = tl.minimum(q0 + SUB, chunk_len) - 1
            cs_e = tl.load(cs_ptr + dcs_base + start + e)
            scale = exp_ftz(cs_r - cs_ref)  # t reads R_k
            to_end = exp_ftz(cs_e - cs_r)  # s feeds the state leaving the sub-block
            decay = exp_ftz(cs_e - cs_ref)
            keep = tri & rmask[None, :] & rmask[:, None]
            if HAS_SEQ:
                seq_r = tl.load(seq_ptr + b * ss_b + t * ss_l, mask=rmask, other=0)
                seq_ref = tl.load(seq_ptr + b * ss_b + tl.maximum(start + q0 - 1, 0) * ss_l)
                seq_e = tl.load(seq_ptr + b * ss_b + (start + e) * ss_l)
                scale = tl.where(seq_r == seq_ref, scale, 0.0)
                to_end = tl.where(seq_r == seq_e, to_end, 0.0)
                decay = tl.where(seq_e == seq_ref, decay, 0.0)
                keep = keep & (seq_r[:, None] == seq_r[None, :])
            scale = tl.where(rmask, scale, 0.0)
            to_end = tl.where(rmask, to_end, 0.0)
            wout = to_end * delta_r

            io = rmask[:, None] & pmask[None, :]
            xr = tl.load(
                x_ptr + b * sx_b + t[:, None] * sx_l + h * sx_h + offs_p[None, :] * sx_p, mask=io, other=0.0
            )
            dyr = tl.load(dy_ptr + b * sy_b + t[:, None] * sy_l + h * sy_h + offs_p[None, :] * sy_p, mask=io,
                          other=0.0).to(ACC)  # fmt: skip
            Br = tl.load(
                B_ptr + b * sB_b + t[:, None] * sB_l + g * sB_g + offs_n[None, :] * sB_n,
                mask=rmask[:, None] & nmask[None, :],
                other=0.0,
            ).to(XDT).to(DOT)  # fmt: skip
            Cr = tl.load(
                C_ptr + b * sC_b + t[:, None] * sC_l + g * sC_g + offs_n[None, :] * sC_n,
                mask=rmask[:, None] & nmask[None, :],
                other=0.0,
            ).to(XDT).to(DOT)  # fmt: skip
            x_d = xr.to(XDT).to(DOT)
            dy_d = dyr.to(XDT).to(DOT)
            xf = xr.to(ACC)

            decay_ts = exp_ftz(tl.where(keep, cs_r[:, None] - cs_r[None, :], float("-inf")))  # (t, s)
            W = tl.dot(Cr, tl.trans(Br), input_precision=PREC).to(ACC) * decay_ts
            dyx = tl.dot(dy_d, tl.trans(x_d), input_precision=PREC).to(ACC)  # (t, s): dy_t . x_s
            dRB = tl.dot(Br, tl.trans(dRT.to(XDT).to(DOT)), input_precision=PREC).to(ACC)  # (s, P): dR B_s

            # d(delta_s x_s), dx, d delta (direct)
            dxdt = tl.dot(tl.trans(W.to(XDT).to(DOT)), dy_d, input_precision=PREC).to(ACC)
            dxdt += dRB * to_end[:, None]
            dxr = dxdt * delta_r[:, None]
            if HAS_D:
                dxr += dyr * Dp[None, :]
                dD += tl.sum(dyr * xf, 0)
            tl.store(dx_ptr + b * sdx_b + t[:, None] * sdx_l + h * sdx_h + offs_p[None, :] * sdx_p,
                     dxr.to(dx_ptr.dtype.element_ty), mask=io)  # fmt: skip
            tl.store(ddelta_ptr + dcs_base + t, tl.sum(dxdt * xf, 1), mask=rmask)

            # dB and dC, summed over the group's heads
            E = decay_ts * dyx  # (t, s)
            dBr = tl.dot(tl.trans(E.to(XDT).to(DOT)), Cr, input_precision=PREC).to(ACC) * delta_r[:, None]
            dBr += tl.dot(x_d, dRT.to(XDT).to(DOT), input_precision=PREC).to(ACC) * wout[:, None]
            dCr = tl.dot(dy_d, RTk.to(XDT).to(DOT), input_precision=PREC).to(ACC) * scale[:, None]
            dCr += tl.dot((E * delta_r[None, :]).to(XDT).to(DOT), Br, input_precision=PREC).to(ACC)
            tn = rmask[:, None] & nmask[None, :]
            bc_off = (
                b * seqlen * ngroups * dstate + t[:, None] * ngroups * dstate + g * dstate + offs_n[None, :]
            )
            tl.atomic_add(dB_ptr + bc_off, dBr, mask=tn, sem="relaxed")  # plain sums: no ordering needed
            tl.atomic_add(dC_ptr + bc_off, dCr, mask=tn, sem="relaxed")

            # d a: the pairs straddling each position
            M = W * delta_r[None, :] * dyx
            rowcum = tl.cumsum(M, 1) - M  # [t, u] = sum_{s < u} M_ts
            intra = tl.sum(tl.where(tri, rowcum, 0.0), 0)  # sum over t >= u
            ypast = tl.dot(Cr, tl.trans(RTk.to(XDT).to(DOT)), input_precision=PREC).to(ACC)  # (t, P): R_k C_t
            w_t = scale * tl.sum(dyr * ypast, 1)
            v_s = wout * tl.sum(xf * dRB, 1)
            const = decay * tl.sum(tl.sum(dRT * RTk, 1), 0)
            suffix_w = tl.sum(w_t, 0) - tl.cumsum(w_t, 0) + w_t
            prefix_v = tl.cumsum(v_s, 0) - v_s
            tl.store(da_ptr + dcs_base + t, intra + suffix_w + const + prefix_v, mask=rmask)

            # the gradient of the state entering the sub-block
            dyT = tl.trans(dyr * scale[:, None]).to(XDT).to(DOT)  # (P, t)
            dRT = dRT * decay + tl.dot(dyT, Cr, input_precision=PREC).to(ACC)

    tl.store(dh0_ptr + bh * headdim * dstate + pn_off, dRT, mask=pn_mask)
    if HAS_D:
        tl.store(dD_ptr + bh * headdim + offs_p, dD, mask=pmask)


def launch_config() -> tuple[int, int, int]:
    """(SUB, num_warps, num_stages): `MAMBAKIT_SSD_BWD_SEQ_CONFIG="SUB,num_warps,num_stages"`, else 16-row
    steps under the interpreter (so that the tests' chunks hold several) and (64, 4, 1) on a GPU, the
    fastest of `benchmarks/gpu_ssd_tiles.py --which bwdseq` on the H200 (9.0 ms at the anchor against
    12.7-14.7 for the others, 2026-12-01): the program holds two (headdim x dstate) fp32 states and
    several (SUB x SUB) fp32 tiles at once."""
    env = os.environ.get("MAMBAKIT_SSD_BWD_SEQ_CONFIG")
    if env:
        sub, warps, stages = (int(v) for v in env.split(","))
        return sub, warps, stages
    return (16, 4, 1) if interpreting() else (64, 4, 1)


def sequential_backward(
    dy: torch.Tensor,
    dfinal: torch.Tensor | None,
    x: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    states: torch.Tensor,
    delta: torch.Tensor,
    cs: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """dx (x's shape and dtype), d delta (direct) and d a (batch, nheads, seqlen), dB and dC (B's
    shape and dtype), dD ((nheads, headdim) or None) and d initial_state, from dy (y's gradient before
    the z gate), d final_state (or None) and what the forward saved (its chunk states, delta, cs)."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nchunks = math.ceil(seqlen / chunk_size)
    acc = states.dtype
    dev = x.device
    sub, warps, stages = launch_config()
    block_p, block_n = pow2_at_least(headdim), pow2_at_least(dstate)
    nsub = math.ceil(chunk_size / sub)
    scratch = torch.empty(batch * nheads * nsub * block_p * block_n, device=dev, dtype=acc)
    dx = torch.empty_like(x)
    ddelta = torch.empty_like(delta)
    da = torch.empty_like(delta)
    dB = torch.zeros(B.shape, device=dev, dtype=acc)
    dC = torch.zeros(C.shape, device=dev, dtype=acc)
    dD = torch.empty(batch, nheads, headdim, device=dev, dtype=acc) if D is not None else None
    dh0 = torch.empty(batch, nheads, headdim, dstate, device=dev, dtype=acc)
    dfinal_c = None if dfinal is None else dfinal.to(acc).contiguous()
    seq_strides = (0, 0) if seq_idx is None else seq_idx.stride()
    ssd_bwd_seq_kernel[(nheads, batch)](
        x, B, C, dy, D, seq_idx, delta, cs, states, dfinal_c, scratch,
        dx, ddelta, da, dB, dC, dD, dh0,
        seqlen, nheads, headdim, dstate, chunk_size, nchunks, nheads // ngroups, nsub,
        *x.stride(), *B.stride(), *C.stride(), *dy.stride(), *dx.stride(), *seq_strides,
        HAS_D=D is not None, HAS_SEQ=seq_idx is not None, HAS_DFINAL=dfinal_c is not None,
        SUB=sub, BLOCK_P=block_p, BLOCK_N=block_n, PREC=dot_precision(x.dtype), DOT_F32=dot_in_fp32(x.dtype),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return (
        dx, ddelta, da, dB.to(B.dtype), dC.to(C.dtype), None if dD is None else dD.sum(0).to(D.dtype), dh0,
    )  # fmt: skip
