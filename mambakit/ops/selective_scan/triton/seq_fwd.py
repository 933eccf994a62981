"""Triton forward kernel of the Mamba-1 selective scan that walks the sequence one step at a time, with the
(BLOCK_D, dstate) state in fp32 registers.

Why a step loop rather than the tile scan of `scan_fwd.py`: the recurrence h_t = exp(delta_t A) h_{t-1} +
delta_t x_t B_t costs one exp and two fused multiply-adds per state element when solved in order, while a
log-depth `tl.associative_scan` over a (BLOCK_L, BLOCK_D, dstate) tile does several times that work and
moves the tile between threads. The anchor problem (batch 4, dim 4096, dstate 16) has 262k independent
state elements: enough to fill an H100/H200 with a few states per thread, so order over time costs no
parallelism. The loads of step t do not depend on the state, so the loop is software-pipelined
(`tl.range(..., num_stages=...)`) to keep several steps' loads in flight.

Prediction (anchor, L = 8192): 2.1 G state updates; the exp unit (16 per clock per SM) caps them at about
0.5 ms, the 1.08 GB of traffic at about 0.25-0.36 ms: target 0.6-0.9 ms (tile-scan kernel: 5.1 ms;
official CUDA: 2.73 ms).

One program per (batch, group, block of BLOCK_D channels, sequence chunk); with several chunks (small batch,
long sequence) the chunk start states come from `chunk_start_states` in `scan_fwd.py`, which this kernel
also serves (WRITE_Y=False, WRITE_DECAY=True: each chunk's end state from zero and its decay product).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _softplus(v):
    # Same threshold as torch.nn.functional.softplus (beta 1, threshold 20).
    return tl.where(v <= 20.0, tl.log(1.0 + tl.exp(v)), v)


@triton.jit
def selective_scan_fwd_seq_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, h0_ptr, seq_idx_ptr,
    y_ptr, hT_ptr, P_ptr,
    seqlen, dim, dstate, dim_per_group, ngroups, nchunks, chunk_len,
    s_x_b, s_x_l, s_dt_b, s_dt_l, s_B_b, s_B_l, s_B_g, s_C_b, s_C_l, s_C_g,
    s_z_b, s_z_l, s_y_b, s_y_l, s_si_b, s_si_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, DT_SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
    WRITE_Y: tl.constexpr, WRITE_DECAY: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    pid_bg = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2)
    b = (pid_bg // ngroups).to(tl.int64)
    g = pid_bg % ngroups
    offs_dg = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_dg < dim_per_group
    offs_d = g * dim_per_group + offs_dg
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]

    # exp(delta A) as exp2(delta (A log2 e)): one multiply less per state element and step.
    # Padded (d, n) get A = 0 (decay 1) and B = C = 0, so they never touch real outputs.
    A2 = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(ACC) * LOG2E
    dt_bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_DT_BIAS:
        dt_bias = tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    Dv = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    state_offs = ((b * nchunks + pid_c) * dim + offs_d[:, None]) * dstate + offs_n[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + state_offs, mask=mask_dn, other=0.0).to(ACC)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    decay = tl.full((BLOCK_D, BLOCK_N), 1.0, dtype=ACC)
    l_begin = pid_c * chunk_len
    l_end = tl.minimum(l_begin + chunk_len, seqlen)

    # Row pointers advance one step per iteration (64-bit pointer arithmetic: t * stride can pass 2**31).
    l0 = l_begin.to(tl.int64)
    x_row = x_ptr + b * s_x_b + l0 * s_x_l + offs_d
    dt_row = dt_ptr + b * s_dt_b + l0 * s_dt_l + offs_d
    z_row = z_ptr + b * s_z_b + l0 * s_z_l + offs_d
    y_row = y_ptr + b * s_y_b + l0 * s_y_l + offs_d
    B_row = B_ptr + b * s_B_b + l0 * s_B_l + g * s_B_g + offs_n
    C_row = C_ptr + b * s_C_b + l0 * s_C_l + g * s_C_g + offs_n
    si_row = seq_idx_ptr + b * s_si_b + l0 * s_si_l
    prev_seq = 0
    if HAS_SEQ_IDX:
        prev_seq = tl.load(si_row - tl.where(l_begin > 0, s_si_l, 0))

    for t in tl.range(l_begin, l_end, num_stages=NUM_STAGES):
        x = tl.load(x_row, mask=mask_d, other=0.0).to(ACC)
        delta = tl.load(dt_row, mask=mask_d, other=0.0).to(ACC)
        Bt = tl.load(B_row, mask=mask_n, other=0.0).to(ACC)
        if HAS_DT_BIAS:
            delta = delta + dt_bias
        if DT_SOFTPLUS:
            delta = _softplus(delta)
        delta = tl.where(mask_d, delta, 0.0)
        dA = tl.exp2(delta[:, None] * A2)
        if HAS_SEQ_IDX:
            cur_seq = tl.load(si_row)
            # A new document starts: the previous state is taken as zero, i.e. its decay is zero.
            dA = tl.where((t > 0) & (cur_seq != prev_seq), 0.0, dA)
            prev_seq = cur_seq
        h = dA * h + (delta * x)[:, None] * Bt[None, :]
        if WRITE_DECAY:
            decay = decay * dA
        if WRITE_Y:
            Ct = tl.load(C_row, mask=mask_n, other=0.0).to(ACC)
            y = tl.sum(h * Ct[None, :], axis=1)
            if HAS_D:
                y += Dv * x
            if HAS_Z:
                zt = tl.load(z_row, mask=mask_d, other=0.0).to(ACC)
                y *= zt / (1.0 + tl.exp(-zt))
            tl.store(y_row, y.to(y_ptr.dtype.element_ty), mask=mask_d)
        x_row += s_x_l
        dt_row += s_dt_l
        z_row += s_z_l
        y_row += s_y_l
        B_row += s_B_l
        C_row += s_C_l
        si_row += s_si_l

    tl.store(hT_ptr + state_offs, h.to(hT_ptr.dtype.element_ty), mask=mask_dn)
    if WRITE_DECAY:
        tl.store(P_ptr + state_offs, decay.to(P_ptr.dtype.element_ty), mask=mask_dn)
