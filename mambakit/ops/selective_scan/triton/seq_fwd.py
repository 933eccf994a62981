"""Triton forward kernel of the Mamba-1 selective scan that walks the sequence one step at a time, each
thread owning whole channels: the (dstate, BLOCK_D) state of a program lies in fp32 registers with every
channel's dstate values in one thread.

Why a step loop rather than the tile scan of `scan_fwd.py`: solved in order, the recurrence
h_t = exp(delta_t A) h_{t-1} + delta_t x_t B_t costs one exp and two multiply-adds per state element, while a
log-depth `tl.associative_scan` over a (BLOCK_L, BLOCK_D, dstate) tile does several times that work and
moves the tile between threads. The anchor problem (batch 4, dim 4096, dstate 16) has 16k channels: with
sequence chunks (`chunk_start_states`) that is enough threads to fill an H100/H200.

Layout: the state is (BLOCK_N, BLOCK_D) with channels on the last axis, so that each channel's dstate
values lie in one thread: the C contraction is a sum inside a thread, and the per-step loads of x, dt, z
(a value per channel, coalesced across the warp) need no exchange between threads. A first version with
the (BLOCK_D, dstate) orientation spread dstate over threads and ran at 6.3 ms on an H200 at L = 8192,
slower than the tile scan (5.1 ms).
The states (h0, hT, the decays) are (batch, nchunks, dstate, dim), channel-major, and A arrives
transposed, (dstate, dim) (`scan_fwd._channel_major`): Triton's coalescing pass orders a layout by the
memory order of the loads and stores, so these keep the state's layout channels-first. B_t and C_t are
loaded from loop-invariant row bases plus a scalar offset, without step masks (see `_load_step`), so
they load as 16-byte vectors. With 4 channels a thread (BLOCK_D 128 on one warp, the default) those
loads and their conversions serve 4 channels: 300 instructions a channel-step over the two passes,
against 319 for the (dim, dstate) order at 128 / 1 and 390 for it at 32 / 1 (sm_90 SASS, Triton 3.6,
2026-12-01), and 1.99 against 2.52 and 2.38 ms at the anchor, L = 8192, side by side on an H200.

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

from mambakit.ops._triton_tiles import load_tile, store_tile


@triton.jit
def _softplus(v):
    # Same threshold as torch.nn.functional.softplus (beta 1, threshold 20).
    return tl.where(v <= 20.0, tl.log(1.0 + tl.exp(v)), v)


@triton.jit
def step_delta(dt, dt_bias, mask_d, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, ACC: tl.constexpr):
    """delta of one step from its loaded dt (BLOCK_D,): plus the bias, through softplus, 0 where not
    mask_d (padded channels then decay by 1 and add nothing)."""
    delta = dt.to(ACC)
    if HAS_DT_BIAS:
        delta = delta + dt_bias
    if DT_SOFTPLUS:
        delta = _softplus(delta)
    return tl.where(mask_d, delta, 0.0)


@triton.jit
def _load_step(x_base, dt_base, z_base, B_base, C_base, si_base, step, s_x_l, s_dt_l, s_z_l, s_B_l, s_C_l,
               s_si_l, mask_d, mask_n, offs_d, HAS_Z: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
               WRITE_Y: tl.constexpr, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr):  # fmt: skip
    """The inputs of sequence step `step` (the caller keeps it inside the chunk, so no load needs a
    step mask). The row pointers are loop-invariant bases plus a scalar row offset: a per-element
    step mask, the dstate mask (where dstate fills BLOCK_N) and per-element pointers carried through
    the loop kept Triton from vectorizing B_t and C_t (sm_90 SASS: 32 scalar 2-byte loads and ~100
    instructions of address arithmetic and packing a step, 2026-12-01)."""
    step = step.to(tl.int64)  # 64-bit offsets: step * stride can pass 2**31
    x = load_tile(x_base + step * s_x_l, mask_d, EVEN_D)
    dt = load_tile(dt_base + step * s_dt_l, mask_d, EVEN_D)
    Bt = load_tile(B_base + step * s_B_l, mask_n, EVEN_N)
    Ct = Bt
    zt = x
    si = offs_d * 0  # a tensor either way: it is carried through the step loop
    if WRITE_Y:
        Ct = load_tile(C_base + step * s_C_l, mask_n, EVEN_N)
        if HAS_Z:
            zt = load_tile(z_base + step * s_z_l, mask_d, EVEN_D)
    if HAS_SEQ_IDX:
        # every channel reads the step's document id
        si = tl.load(si_base + step * s_si_l + offs_d * 0, mask=mask_d, other=0)
    return x, dt, Bt, Ct, zt, si


@triton.jit
def _program_channels(A_ptr, dt_bias_ptr, ngroups, dim_per_group, dstate, HAS_DT_BIAS: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                      A_T: tl.constexpr = False):  # fmt: skip
    """What a step-loop program of grid (batch x group, channel block, ...) works on: (b, g, offs_dg,
    mask_d, offs_d, offs_n, mask_n, mask_nd, A2, dt_bias). offs_dg are channel indices within the group,
    offs_d within dim; A2 (BLOCK_N, BLOCK_D) is A log2(e), so that exp(delta A) = exp2(delta A2), one
    multiply less per state element and step. Padded (n, d) get A = 0 (decay 1) and, loaded with the
    same masks, B = C = 0, so they never touch real outputs. A is (dim, dstate), or with A_T its
    transpose (dstate, dim) contiguous."""
    b = (tl.program_id(0) // ngroups).to(tl.int64)
    g = tl.program_id(0) % ngroups
    offs_dg = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_dg < dim_per_group
    offs_d = g * dim_per_group + offs_dg
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < dstate
    mask_nd = mask_n[:, None] & mask_d[None, :]
    if A_T:
        A_at = A_ptr + offs_n[:, None] * (dim_per_group * ngroups) + offs_d[None, :]
    else:
        A_at = A_ptr + offs_d[None, :] * dstate + offs_n[:, None]
    A2 = tl.load(A_at, mask=mask_nd, other=0.0).to(ACC)
    A2 = A2 * 1.4426950408889634  # log2(e)
    dt_bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_DT_BIAS:
        dt_bias = tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    return b, g, offs_dg, mask_d, offs_d, offs_n, mask_n, mask_nd, A2, dt_bias


@triton.jit
def selective_scan_fwd_seq_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, h0_ptr, seq_idx_ptr,
    y_ptr, hT_ptr, P_ptr, ckpt_ptr,
    seqlen, dim, dstate, dim_per_group, ngroups, nchunks, chunk_len, nseg,
    s_x_b, s_x_l, s_dt_b, s_dt_l, s_B_b, s_B_l, s_B_g, s_C_b, s_C_l, s_C_g,
    s_z_b, s_z_l, s_y_b, s_y_l, s_si_b, s_si_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, DT_SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
    WRITE_Y: tl.constexpr, WRITE_DECAY: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
    EVEN_D: tl.constexpr = False, EVEN_N: tl.constexpr = False, CKPT_SEG: tl.constexpr = 0,
):  # fmt: skip
    """CKPT_SEG > 0 (the backward's checkpoint pass, `seq_bwd.py`): instead of the end state, store the
    state at the start of every segment of CKPT_SEG steps to ckpt_ptr, (batch, nchunks * nseg, dstate,
    dim), segment s of chunk c at row c * nseg + s."""
    pid_c = tl.program_id(2)
    # A and the states are channel-major here (see the module docstring)
    b, g, offs_dg, mask_d, offs_d, offs_n, mask_n, mask_nd, A2, dt_bias = _program_channels(
        A_ptr, dt_bias_ptr, ngroups, dim_per_group, dstate, HAS_DT_BIAS, ACC, BLOCK_D, BLOCK_N, True
    )
    Dv = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    state_offs = ((b * nchunks + pid_c) * dstate + offs_n[:, None]) * dim + offs_d[None, :]
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

    ckpt = ckpt_ptr + ((b * nchunks + pid_c) * nseg * dstate + offs_n[:, None]) * dim + offs_d[None, :]

    # Loop-invariant row bases; each step adds its scalar row offset (see _load_step).
    x_base = x_ptr + b * s_x_b + offs_d
    dt_base = dt_ptr + b * s_dt_b + offs_d
    z_base = z_ptr + b * s_z_b + offs_d
    y_base = y_ptr + b * s_y_b + offs_d
    B_base = B_ptr + b * s_B_b + g * s_B_g + offs_n
    C_base = C_ptr + b * s_C_b + g * s_C_g + offs_n
    si_base = seq_idx_ptr + b * s_si_b
    prev_seq = offs_dg * 0
    if HAS_SEQ_IDX:
        prev_seq = tl.load(si_base + tl.maximum(l_begin - 1, 0).to(tl.int64) * s_si_l + offs_dg * 0)

    # Inputs of steps t (set 0) and t + 1 (set 1); the loop loads step t + 2 before computing step t
    # (past the chunk's end: its last step again, never used).
    last = l_end - 1
    y_off = l_begin.to(tl.int64) * s_y_l  # carried as a 64-bit scalar: t * s_y_l can pass 2**31
    x0, dt0, B0, C0, z0, si0 = _load_step(
        x_base, dt_base, z_base, B_base, C_base, si_base, l_begin, s_x_l, s_dt_l, s_z_l, s_B_l, s_C_l, s_si_l,
        mask_d, mask_n, offs_dg, HAS_Z, HAS_SEQ_IDX, WRITE_Y, EVEN_D, EVEN_N,
    )  # fmt: skip
    x1, dt1, B1, C1, z1, si1 = _load_step(
        x_base, dt_base, z_base, B_base, C_base, si_base, tl.minimum(l_begin + 1, last),
        s_x_l, s_dt_l, s_z_l, s_B_l, s_C_l, s_si_l,
        mask_d, mask_n, offs_dg, HAS_Z, HAS_SEQ_IDX, WRITE_Y, EVEN_D, EVEN_N,
    )  # fmt: skip
    for t in tl.range(l_begin, l_end, num_stages=NUM_STAGES):
        x2, dt2, B2, C2, z2, si2 = _load_step(
            x_base, dt_base, z_base, B_base, C_base, si_base, tl.minimum(t + 2, last),
            s_x_l, s_dt_l, s_z_l, s_B_l, s_C_l, s_si_l,
            mask_d, mask_n, offs_dg, HAS_Z, HAS_SEQ_IDX, WRITE_Y, EVEN_D, EVEN_N,
        )  # fmt: skip
        if CKPT_SEG > 0:
            if (t - l_begin) % CKPT_SEG == 0:
                tl.store(ckpt, h, mask=mask_nd)
                ckpt += dstate * dim
        x = x0.to(ACC)
        delta = step_delta(dt0, dt_bias, mask_d, HAS_DT_BIAS, DT_SOFTPLUS, ACC)
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
            store_tile(y_base + y_off, y.to(y_ptr.dtype.element_ty), mask_d, EVEN_D)
        x0, dt0, B0, C0, z0, si0 = x1, dt1, B1, C1, z1, si1
        x1, dt1, B1, C1, z1, si1 = x2, dt2, B2, C2, z2, si2
        y_off += s_y_l

    if CKPT_SEG == 0:
        tl.store(hT_ptr + state_offs, h.to(hT_ptr.dtype.element_ty), mask=mask_nd)
    if WRITE_DECAY:
        decay = tl.where(alive[None, :], tl.exp2(A2 * delta_sum[None, :]), 0.0)
        tl.store(P_ptr + state_offs, decay.to(P_ptr.dtype.element_ty), mask=mask_nd)
