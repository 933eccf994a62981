"""Triton forward kernel of the Mamba-1 selective scan that walks the sequence one step at a time, each
thread owning whole channels: the (dstate, BLOCK_D) state of a program lies in fp32 registers with every
channel's dstate values in one thread.

Why a step loop rather than the tile scan of `scan_fwd.py`: solved in order, the recurrence
h_t = exp(delta_t A) h_{t-1} + delta_t x_t B_t costs one exp and two multiply-adds per state element, while a
log-depth `tl.associative_scan` over a (BLOCK_L, BLOCK_D, dstate) tile does several times that work and
moves the tile between threads. The anchor problem (batch 4, dim 4096, dstate 16) has 16k channels: with
sequence chunks (`chunk_start_states`) that is enough threads to fill an H100/H200.

Layout: the state is (BLOCK_N, BLOCK_D) with channels on the last axis, so Triton's default layout gives
consecutive threads consecutive channels and keeps the dstate axis inside a thread: the C contraction is a
sum inside a thread, and the per-step loads of x, dt, z (one value per thread, coalesced across the warp)
need no exchange between threads. A first version with the (BLOCK_D, dstate) orientation spread dstate
over threads and ran at 6.3 ms on an H200 at L = 8192, slower than the tile scan (5.1 ms).

Latency: each step's loads do not depend on the state, so the loop keeps the next two steps' inputs in
flight (loaded two iterations ahead, carried in registers): a step's compute never waits on its own loads.

Prediction (anchor, L = 8192): 2.1 G state updates at one exp each cap it at about 0.5 ms on the exp unit;
the 1.08 GB of traffic at about 0.25-0.36 ms: target 0.6-1.0 ms (official CUDA: 2.73 ms on an H100).

One program per (batch, group, block of BLOCK_D channels, sequence chunk); with several chunks the chunk
start states come from `chunk_start_states` in `scan_fwd.py`, which this kernel also serves
(WRITE_Y=False, WRITE_DECAY=True: each chunk's end state from zero and its decay product).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _softplus(v):
    # Same threshold as torch.nn.functional.softplus (beta 1, threshold 20).
    return tl.where(v <= 20.0, tl.log(1.0 + tl.exp(v)), v)


@triton.jit
def _load_step(x_row, dt_row, z_row, B_row, C_row, si_row, step, l_end, mask_d, mask_n, offs_d, offs_n,
               HAS_Z: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, WRITE_Y: tl.constexpr):  # fmt: skip
    """The inputs of step `step` (zeros at and past l_end, the end of the chunk)."""
    # (Masks are built as vectors: Triton's interpreter rejects a vector mask `&` a scalar condition.)
    ok_d = mask_d & (offs_d * 0 + step < l_end)
    ok_n = mask_n & (offs_n * 0 + step < l_end)
    x = tl.load(x_row, mask=ok_d, other=0.0)
    dt = tl.load(dt_row, mask=ok_d, other=0.0)
    Bt = tl.load(B_row, mask=ok_n, other=0.0)
    Ct = Bt
    zt = x
    si = offs_d * 0  # a tensor either way: it is carried through the step loop
    if WRITE_Y:
        Ct = tl.load(C_row, mask=ok_n, other=0.0)
        if HAS_Z:
            zt = tl.load(z_row, mask=ok_d, other=0.0)
    if HAS_SEQ_IDX:
        si = tl.load(si_row + offs_d * 0, mask=ok_d, other=0)  # every channel reads the step's id
    return x, dt, Bt, Ct, zt, si


@triton.jit
def _program_channels(A_ptr, dt_bias_ptr, ngroups, dim_per_group, dstate, HAS_DT_BIAS: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """What a step-loop program of grid (batch x group, channel block, ...) works on: (b, g, offs_dg,
    mask_d, offs_d, offs_n, mask_n, mask_nd, A2, dt_bias). offs_dg are channel indices within the group,
    offs_d within dim; A2 (BLOCK_N, BLOCK_D) is A log2(e), so that exp(delta A) = exp2(delta A2), one
    multiply less per state element and step. Padded (n, d) get A = 0 (decay 1) and, loaded with the
    same masks, B = C = 0, so they never touch real outputs."""
    b = (tl.program_id(0) // ngroups).to(tl.int64)
    g = tl.program_id(0) % ngroups
    offs_dg = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_dg < dim_per_group
    offs_d = g * dim_per_group + offs_dg
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < dstate
    mask_nd = mask_n[:, None] & mask_d[None, :]
    A2 = tl.load(A_ptr + offs_d[None, :] * dstate + offs_n[:, None], mask=mask_nd, other=0.0).to(ACC)
    A2 = A2 * 1.4426950408889634  # log2(e)
    dt_bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_DT_BIAS:
        dt_bias = tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    return b, g, offs_dg, mask_d, offs_d, offs_n, mask_n, mask_nd, A2, dt_bias


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
    pid_c = tl.program_id(2)
    b, g, offs_dg, mask_d, offs_d, offs_n, mask_n, mask_nd, A2, dt_bias = _program_channels(
        A_ptr, dt_bias_ptr, ngroups, dim_per_group, dstate, HAS_DT_BIAS, ACC, BLOCK_D, BLOCK_N
    )
    Dv = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    state_offs = ((b * nchunks + pid_c) * dim + offs_d[None, :]) * dstate + offs_n[:, None]
    if HAS_H0:
        h = tl.load(h0_ptr + state_offs, mask=mask_nd, other=0.0).to(ACC)
    else:
        h = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    # The chunk's decay product prod_t exp(delta_t A) is exp(A sum_t delta_t), or 0 once a document
    # boundary has reset the state: one add per channel and step instead of a multiply per state element.
    delta_sum = tl.zeros((BLOCK_D,), dtype=ACC)
    alive = mask_d
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
    prev_seq = offs_dg * 0
    if HAS_SEQ_IDX:
        prev_seq = tl.load(si_row - tl.where(l_begin > 0, s_si_l, 0) + offs_dg * 0)

    # Inputs of steps t (set 0) and t + 1 (set 1); the loop loads step t + 2 before computing step t.
    x0, dt0, B0, C0, z0, si0 = _load_step(
        x_row, dt_row, z_row, B_row, C_row, si_row, l_begin, l_end, mask_d, mask_n, offs_dg, offs_n,
        HAS_Z, HAS_SEQ_IDX, WRITE_Y,
    )  # fmt: skip
    x1, dt1, B1, C1, z1, si1 = _load_step(
        x_row + s_x_l, dt_row + s_dt_l, z_row + s_z_l, B_row + s_B_l, C_row + s_C_l, si_row + s_si_l,
        l_begin + 1, l_end, mask_d, mask_n, offs_dg, offs_n, HAS_Z, HAS_SEQ_IDX, WRITE_Y,
    )  # fmt: skip
    for t in tl.range(l_begin, l_end, num_stages=NUM_STAGES):
        x2, dt2, B2, C2, z2, si2 = _load_step(
            x_row + 2 * s_x_l, dt_row + 2 * s_dt_l, z_row + 2 * s_z_l, B_row + 2 * s_B_l, C_row + 2 * s_C_l,
            si_row + 2 * s_si_l, t + 2, l_end, mask_d, mask_n, offs_dg, offs_n, HAS_Z, HAS_SEQ_IDX, WRITE_Y,
        )  # fmt: skip
        x = x0.to(ACC)
        delta = dt0.to(ACC)
        if HAS_DT_BIAS:
            delta = delta + dt_bias
        if DT_SOFTPLUS:
            delta = _softplus(delta)
        delta = tl.where(mask_d, delta, 0.0)
        dA = tl.exp2(A2 * delta[None, :])
        if HAS_SEQ_IDX:
            # A new document starts: the previous state is taken as zero, i.e. its decay is zero.
            reset = (t > 0) & (si0 != prev_seq)
            dA = tl.where(reset[None, :], 0.0, dA)
            alive = alive & (reset == 0)
            prev_seq = si0
        h = dA * h + B0.to(ACC)[:, None] * (delta * x)[None, :]
        if WRITE_DECAY:
            delta_sum += delta
        if WRITE_Y:
            y = tl.sum(h * C0.to(ACC)[:, None], axis=0)
            if HAS_D:
                y += Dv * x
            if HAS_Z:
                zt = z0.to(ACC)
                y *= zt / (1.0 + tl.exp(-zt))
            tl.store(y_row, y.to(y_ptr.dtype.element_ty), mask=mask_d)
        x0, dt0, B0, C0, z0, si0 = x1, dt1, B1, C1, z1, si1
        x1, dt1, B1, C1, z1, si1 = x2, dt2, B2, C2, z2, si2
        x_row += s_x_l
        dt_row += s_dt_l
        z_row += s_z_l
        y_row += s_y_l
        B_row += s_B_l
        C_row += s_C_l
        si_row += s_si_l

    tl.store(hT_ptr + state_offs, h.to(hT_ptr.dtype.element_ty), mask=mask_nd)
    if WRITE_DECAY:
        decay = tl.where(alive[None, :], tl.exp2(A2 * delta_sum[None, :]), 0.0)
        tl.store(P_ptr + state_offs, decay.to(P_ptr.dtype.element_ty), mask=mask_nd)
