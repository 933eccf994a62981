"""Triton backward kernel of the Mamba-1 selective scan that walks the sequence one step at a time, in
reverse, with a program's (dstate, BLOCK_D) state and adjoint in fp32 registers.

Math (per channel d and state n; a_t = exp(delta_t A), b_t = delta_t B_t x_t, h_t = a_t h_{t-1} + b_t; see
`scan_bwd.py`): the adjoint g_t = dL/dh_t obeys g_t = dyp_t C_t + a_{t+1} g_{t+1}; then
    dx_t = delta_t sum_n g_t B_t + D dyp_t,    ddelta_t = x_t sum_n g_t B_t + sum_n A g_t (h_t - b_t),
    dA = sum_t delta_t g_t (h_t - b_t),        dB_t = sum_d g_t delta_t x_t,    dC_t = sum_d dyp_t h_t.
dB_t and dC_t sum over channels, i.e. across lanes, and are written as one partial per program (batch,
seqlen, ngroups, nblocks, dstate), reduced by the launcher.

Why not the tile scan of `scan_bwd.py`: like the forward, its log-depth scans over (BLOCK_L, BLOCK_D,
dstate) tiles cost several times the work of solving the two recurrences in order (31 ms at the anchor,
batch 4, L 8192, dim 4096, dstate 16, on an H200).

States in reverse order without storing them all: a checkpoint pass (the forward's step loop,
`seq_fwd.py` with CKPT_SEG) walks each chunk forward from its start state and writes the state at the
start of every segment of SEG = 2 steps to a scratch buffer (batch, nchunks * nseg, dstate, dim). This
kernel walks the segments backward: it reloads a segment's start state, rebuilds the segment's states
forward into registers (h1, h2), then takes its steps in reverse.

Layout: A, the checkpoints, the chunk states and adjoints, the dA partials and dh0 are all channel-major,
(dstate, dim), as in the forward. Triton lays a (BLOCK_N, BLOCK_D) tile out after the memory order of its
loads and stores; with some of them (dim, dstate) and some (dstate, dim) (as until 2026-12-02) the
compiled kernel moved its tiles between two register layouts through shared memory several times a step
(sm_90, Triton 3.6: 30 layout conversions, 11.5 barriers a step; now 20 and 8). The checkpoint pass
used to be the first loop of this kernel, at its 32-channel blocks; in the forward's 128-channel blocks
it costs no more instructions a channel-step and leaves this kernel fewer live registers. Anchor, L =
8192, H200, side by side in one call: 12.91 -> 10.10 ms (SASS per channel-step over all passes 1,191 ->
1,006: the chunk-state pass 123, the adjoint pass 142 -> 130, the checkpoint pass 170 -> 144, the
reverse pass 757 -> 610).

Sequence chunks: when batch x channel blocks underfill the GPU, each chunk runs in its own program. Its
start state comes from the forward's chunk pass (`chunk_start_states`) and the adjoint entering it from
`_adjoint_chunk_kernel` below (each chunk's outgoing adjoint from a zero carry, and its decay product),
combined over chunks by the launcher.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mambakit.ops._launch import next_power_of_2
from mambakit.ops._triton_tiles import load_tile
from mambakit.ops.selective_scan.triton.scan_bwd import chunk_carries, grad_buffers, reduce_partials
from mambakit.ops.selective_scan.triton.scan_fwd import (
    _acc_dtype,
    _channel_major,
    _seq_chunk_override_or_sms,
    chunk_start_states,
    default_config,
    kernel_choice,
)
from mambakit.ops.selective_scan.triton.scan_fwd import _launch as fwd_launch
from mambakit.ops.selective_scan.triton.seq_fwd import _program_channels, _softplus, step_delta

_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _delta_at(dt_row, offs_d, dt_bias, ok_d, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
              ACC: tl.constexpr, VOLATILE: tl.constexpr = False):  # fmt: skip
    """(delta, v) at the row pointer dt_row: delta after bias and softplus, 0 where not ok_d; v the
    softplus argument. Row pointers are scalars, offset at the load: a pointer tensor kept live would hold
    two registers per element."""
    v = tl.load(dt_row + offs_d, mask=ok_d, other=0.0, volatile=VOLATILE).to(ACC)
    if HAS_DT_BIAS:
        v = v + dt_bias
    delta = v
    if DT_SOFTPLUS:
        delta = _softplus(v)
    return tl.where(ok_d, delta, 0.0), v


@triton.jit
def _reset_at(si_row, s_si_l, t, l_end, HAS_SEQ_IDX: tl.constexpr):
    """Whether step t (< l_end) starts a new document (its decay is then zero)."""
    reset = t < 0
    if HAS_SEQ_IDX:
        if (t > 0) & (t < l_end):
            reset = tl.load(si_row) != tl.load(si_row - s_si_l)
    return reset


@triton.jit
def _step_inputs(x_row, dt_row, B_row, C_row, z_row, dy_row, si_row,
s_si_l, t, l_end, dt_bias, mask_d, mask_n,
                 offs_dg, offs_d, offs_n, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
                 HAS_SEQ_IDX: tl.constexpr, DT_SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
                 REVERSE: tl.constexpr, VOLATILE: tl.constexpr):  # fmt: skip
    """Step t's (x, delta, v, reset, B_t, C_t, dy, z); C_t, dy, z only with REVERSE (else placeholders).
    Steps at or past l_end read as zeros: delta 0 (decay 1), no reset, so they change nothing."""
    ok_d = mask_d & (offs_dg * 0 + t < l_end)
    ok_n = mask_n & (offs_n * 0 + t < l_end)
    x = tl.load(x_row + offs_d, mask=ok_d, other=0.0, volatile=VOLATILE).to(ACC)
    delta, v = _delta_at(dt_row, offs_d, dt_bias, ok_d, HAS_DT_BIAS, DT_SOFTPLUS, ACC, VOLATILE)
    reset = _reset_at(si_row, s_si_l, t, l_end, HAS_SEQ_IDX)
    Bt = tl.load(B_row + offs_n, mask=ok_n, other=0.0, volatile=VOLATILE).to(ACC)
    Ct = Bt
    dy = x
    z = x
    if REVERSE:
        Ct = tl.load(C_row + offs_n, mask=ok_n, other=0.0, volatile=VOLATILE).to(ACC)
        dy = tl.load(dy_row + offs_d, mask=ok_d, other=0.0, volatile=VOLATILE).to(ACC)
        if HAS_Z:
            z = tl.load(z_row + offs_d, mask=ok_d, other=0.0, volatile=VOLATILE).to(ACC)
    return x, delta, v, reset, Bt, Ct, dy, z


@triton.jit
def _advance(h, A2, x, delta, reset, Bt, HAS_SEQ_IDX: tl.constexpr):
    """h_t = exp(delta A) h_{t-1} + delta B_t x (decay 0 at a reset)."""
    dA = tl.exp2(A2 * delta[None, :])
    if HAS_SEQ_IDX:
        dA = tl.where(reset, 0.0, dA)
    return dA * h + Bt[:, None] * (delta * x)[None, :]


@triton.jit
def _reverse_step(
    h, carry, dA_acc, dD_acc, dbias_acc, A2, Dv, x, delta, v, reset, Bt, Ct, dy, z,
    dx_row, ddt_row, dz_row, dBp_row, dCp_row, t, l_end, mask_d, mask_n, offs_dg, offs_d, offs_n,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """Step t in reverse, h the state after it; returns the adjoint carried into step t - 1 and the sums."""
    ok_d = mask_d & (offs_dg * 0 + t < l_end)
    ok_n = mask_n & (offs_n * 0 + t < l_end)
    if HAS_Z:
        y = tl.sum(h * Ct[:, None], axis=0)
        if HAS_D:
            y += Dv * x
        sz = 1.0 / (1.0 + tl.exp(-z))
        dz = dy * y * sz * (1.0 + z * (1.0 - sz))
        tl.store(dz_row + offs_d, dz.to(dz_row.dtype.element_ty), mask=ok_d)
        dyp = dy * z * sz
    else:
        dyp = dy
    g = carry + Ct[:, None] * dyp[None, :]
    dx_b = delta * x
    ah = h - Bt[:, None] * dx_b[None, :]  # a_t h_{t-1}
    gB = tl.sum(g * Bt[:, None], axis=0)
    gah = g * ah
    dA_acc += gah * delta[None, :]
    ddelta = x * gB + _LN2 * tl.sum(gah * A2, axis=0)  # A = A2 ln 2
    dx = delta * gB
    if HAS_D:
        dx += Dv * dyp
        dD_acc += dyp * x
    if DT_SOFTPLUS:
        ddelta = tl.where(v <= 20.0, ddelta / (1.0 + tl.exp(-v)), ddelta)
    ddelta = tl.where(ok_d, ddelta, 0.0)
    dbias_acc += ddelta
    tl.store(dx_row + offs_d, dx.to(dx_row.dtype.element_ty), mask=ok_d)
    tl.store(ddt_row + offs_d, ddelta.to(ddt_row.dtype.element_ty), mask=ok_d)
    # Sums over this program's channels (lanes of the warp); masked channels contribute zeros.
    tl.store(dBp_row + offs_n, tl.sum(g * dx_b[None, :], axis=1), mask=ok_n)
    tl.store(dCp_row + offs_n, tl.sum(h * dyp[None, :], axis=1), mask=ok_n)
    dA = tl.exp2(A2 * delta[None, :])
    if HAS_SEQ_IDX:
        dA = tl.where(reset, 0.0, dA)
    return dA * g, dA_acc, dD_acc, dbias_acc


@triton.jit
def selective_scan_bwd_seq_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, seq_idx_ptr,
    dy_ptr, carry_ptr, hbuf_ptr,
    dx_ptr, ddt_ptr, dz_ptr, dBp_ptr, dCp_ptr, dAp_ptr, dDp_ptr, dbiasp_ptr, dh0_ptr,
    seqlen, dim, dstate, dim_per_group, ngroups, nblocks, nchunks, chunk_len, nseg,
    s_x_b, s_x_l, s_dt_b, s_dt_l, s_B_b, s_B_l, s_B_g, s_C_b, s_C_l, s_C_g,
    s_z_b, s_z_l, s_si_b, s_si_l, s_dy_b, s_dy_l, s_dx_b, s_dx_l, s_ddt_b, s_ddt_l, s_dz_b, s_dz_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
    HAS_CARRY: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, DT_SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
    WRITE_DH0: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SEG: tl.constexpr,
    PRELOAD: tl.constexpr,
):  # fmt: skip
    """One program per (batch x group, block of BLOCK_D channels, sequence chunk). hbuf holds the state
    at the start of every segment of SEG steps (batch, nchunks * nseg, dstate, dim), written by the
    checkpoint pass; carry is the adjoint entering the chunk from after it, (batch, nchunks, dstate,
    dim), or absent (zeros). A is transposed, (dstate, dim), and the dA partials and dh0 are
    channel-major too.

    PRELOAD: the segment's rebuild loads every input of its steps at once (one wait on memory per segment)
    and the reverse steps use them; else the reverse steps reload theirs with volatile loads (which the
    compiler cannot merge with the rebuild's and keep live: fewer registers, one wait per step)."""
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2)
    b, g, offs_dg, mask_d, offs_d, offs_n, mask_n, mask_nd, A2, dt_bias = _program_channels(
        A_ptr, dt_bias_ptr, ngroups, dim_per_group, dstate, HAS_DT_BIAS, ACC, BLOCK_D, BLOCK_N, True
    )
    Dv = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    state_offs = ((b * nchunks + pid_c) * dstate + offs_n[:, None]) * dim + offs_d[None, :]
    hbuf = hbuf_ptr + ((b * nchunks + pid_c) * nseg * dstate + offs_n[:, None]) * dim + offs_d[None, :]
    seg_stride = dstate * dim

    l_begin = pid_c * chunk_len
    l_end = tl.minimum(l_begin + chunk_len, seqlen)
    nseg_here = tl.cdiv(l_end - l_begin, SEG)  # the segments the checkpoint pass wrote

    # Segments in reverse; `carry` is the adjoint flowing into the last state seen so far.
    if HAS_CARRY:
        carry = tl.load(carry_ptr + state_offs, mask=mask_nd, other=0.0).to(ACC)
    else:
        carry = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    dA_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    dD_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for i in range(0, nseg_here):
        s = nseg_here - 1 - i
        t = l_begin + s * SEG
        tt = t.to(tl.int64)
        h = tl.load(hbuf + s * seg_stride, mask=mask_nd, other=0.0)
        xr = x_ptr + b * s_x_b + tt * s_x_l
        dtr = dt_ptr + b * s_dt_b + tt * s_dt_l
        Br = B_ptr + b * s_B_b + tt * s_B_l + g * s_B_g
        Cr = C_ptr + b * s_C_b + tt * s_C_l + g * s_C_g
        zr = z_ptr + b * s_z_b + tt * s_z_l
        dyr = dy_ptr + b * s_dy_b + tt * s_dy_l
        dxr = dx_ptr + b * s_dx_b + tt * s_dx_l
        ddtr = ddt_ptr + b * s_ddt_b + tt * s_ddt_l
        dzr = dz_ptr + b * s_dz_b + tt * s_dz_l
        sir = seq_idx_ptr + b * s_si_b + tt * s_si_l
        # Partials (batch, seqlen, ngroups, nblocks, dstate).
        part = ((b * seqlen + tt) * ngroups + g) * nblocks * dstate + pid_d * dstate
        part_l = ngroups * nblocks * dstate
        x0, d0, v0, r0, B0, C0, dy0, z0 = _step_inputs(
            xr, dtr, Br, Cr, zr, dyr, sir, s_si_l,
            t, l_end, dt_bias, mask_d, mask_n, offs_dg, offs_d, offs_n,
            HAS_Z, HAS_DT_BIAS, HAS_SEQ_IDX, DT_SOFTPLUS, ACC, PRELOAD, False,
        )  # fmt: skip
        x1, d1, v1, r1, B1, C1, dy1, z1 = _step_inputs(
            xr + s_x_l, dtr + s_dt_l, Br + s_B_l, Cr + s_C_l, zr + s_z_l, dyr + s_dy_l, sir + s_si_l, s_si_l,
            t + 1, l_end, dt_bias, mask_d, mask_n, offs_dg, offs_d, offs_n,
            HAS_Z, HAS_DT_BIAS, HAS_SEQ_IDX, DT_SOFTPLUS, ACC, PRELOAD, False,
        )  # fmt: skip
        h1 = _advance(h, A2, x0, d0, r0, B0, HAS_SEQ_IDX)
        h2 = _advance(h1, A2, x1, d1, r1, B1, HAS_SEQ_IDX)
        if SEG == 4:  # (SEG is 2 or 4)
            x2, d2, v2, r2, B2, C2, dy2, z2 = _step_inputs(
                xr + 2 * s_x_l, dtr + 2 * s_dt_l, Br + 2 * s_B_l, Cr + 2 * s_C_l,
                zr + 2 * s_z_l, dyr + 2 * s_dy_l, sir + 2 * s_si_l, s_si_l,
                t + 2, l_end, dt_bias, mask_d, mask_n, offs_dg, offs_d, offs_n,
                HAS_Z, HAS_DT_BIAS, HAS_SEQ_IDX, DT_SOFTPLUS, ACC, PRELOAD, False,
            )  # fmt: skip
            x3, d3, v3, r3, B3, C3, dy3, z3 = _step_inputs(
                xr + 3 * s_x_l, dtr + 3 * s_dt_l, Br + 3 * s_B_l, Cr + 3 * s_C_l,
                zr + 3 * s_z_l, dyr + 3 * s_dy_l, sir + 3 * s_si_l, s_si_l,
                t + 3, l_end, dt_bias, mask_d, mask_n, offs_dg, offs_d, offs_n,
                HAS_Z, HAS_DT_BIAS, HAS_SEQ_IDX, DT_SOFTPLUS, ACC, PRELOAD, False,
            )  # fmt: skip
            h3 = _advance(h2, A2, x2, d2, r2, B2, HAS_SEQ_IDX)
            h4 = _advance(h3, A2, x3, d3, r3, B3, HAS_SEQ_IDX)
            if not PRELOAD:
                x3, d3, v3, r3, B3, C3, dy3, z3 = _step_inputs(
                    xr + 3 * s_x_l, dtr + 3 * s_dt_l, Br + 3 * s_B_l, Cr + 3 * s_C_l,
                    zr + 3 * s_z_l, dyr + 3 * s_dy_l, sir + 3 * s_si_l, s_si_l,
                    t + 3, l_end, dt_bias, mask_d, mask_n, offs_dg, offs_d, offs_n,
                    HAS_Z, HAS_DT_BIAS, HAS_SEQ_IDX, DT_SOFTPLUS, ACC, True, True,
                )  # fmt: skip
            carry, dA_acc, dD_acc, dbias_acc = _reverse_step(
                h4, carry, dA_acc, dD_acc, dbias_acc, A2, Dv, x3, d3, v3, r3, B3, C3, dy3, z3,
                dxr + 3 * s_dx_l, ddtr + 3 * s_ddt_l, dzr + 3 * s_dz_l,
                dBp_ptr + part + 3 * part_l, dCp_ptr + part + 3 * part_l,
                t + 3, l_end, mask_d, mask_n, offs_dg, offs_d, offs_n, HAS_D, HAS_Z, HAS_SEQ_IDX, DT_SOFTPLUS,
            )  # fmt: skip
            if not PRELOAD:
                x2, d2, v2, r2, B2, C2, dy2, z2 = _step_inputs(
                    xr + 2 * s_x_l, dtr + 2 * s_dt_l, Br + 2 * s_B_l, Cr + 2 * s_C_l,
                    zr + 2 * s_z_l, dyr + 2 * s_dy_l, sir + 2 * s_si_l, s_si_l,
                    t + 2, l_end, dt_bias, mask_d, mask_n, offs_dg, offs_d, offs_n,
                    HAS_Z, HAS_DT_BIAS, HAS_SEQ_IDX, DT_SOFTPLUS, ACC, True, True,
                )  # fmt: skip
            carry, dA_acc, dD_acc, dbias_acc = _reverse_step(
                h3, carry, dA_acc, dD_acc, dbias_acc, A2, Dv, x2, d2, v2, r2, B2, C2, dy2, z2,
                dxr + 2 * s_dx_l, ddtr + 2 * s_ddt_l, dzr + 2 * s_dz_l,
                dBp_ptr + part + 2 * part_l, dCp_ptr + part + 2 * part_l,
                t + 2, l_end, mask_d, mask_n, offs_dg, offs_d, offs_n, HAS_D, HAS_Z, HAS_SEQ_IDX, DT_SOFTPLUS,
            )  # fmt: skip
        if not PRELOAD:
            x1, d1, v1, r1, B1, C1, dy1, z1 = _step_inputs(
                xr + s_x_l, dtr + s_dt_l, Br + s_B_l, Cr + s_C_l,
                zr + s_z_l, dyr + s_dy_l, sir + s_si_l, s_si_l,
                t + 1, l_end, dt_bias, mask_d, mask_n, offs_dg, offs_d, offs_n,
                HAS_Z, HAS_DT_BIAS, HAS_SEQ_IDX, DT_SOFTPLUS, ACC, True, True,
            )  # fmt: skip
        carry, dA_acc, dD_acc, dbias_acc = _reverse_step(
            h2, carry, dA_acc, dD_acc, dbias_acc, A2, Dv, x1, d1, v1, r1, B1, C1, dy1, z1,
            dxr + s_dx_l, ddtr + s_ddt_l, dzr + s_dz_l, dBp_ptr + part + part_l, dCp_ptr + part + part_l,
            t + 1, l_end, mask_d, mask_n, offs_dg, offs_d, offs_n, HAS_D, HAS_Z, HAS_SEQ_IDX, DT_SOFTPLUS,
        )  # fmt: skip
        if not PRELOAD:
            x0, d0, v0, r0, B0, C0, dy0, z0 = _step_inputs(
                xr, dtr, Br, Cr, zr, dyr, sir, s_si_l,
                t, l_end, dt_bias, mask_d, mask_n, offs_dg, offs_d, offs_n,
                HAS_Z, HAS_DT_BIAS, HAS_SEQ_IDX, DT_SOFTPLUS, ACC, True, True,
            )  # fmt: skip
        carry, dA_acc, dD_acc, dbias_acc = _reverse_step(
            h1, carry, dA_acc, dD_acc, dbias_acc, A2, Dv, x0, d0, v0, r0, B0, C0, dy0, z0,
            dxr, ddtr, dzr, dBp_ptr + part, dCp_ptr + part,
            t, l_end, mask_d, mask_n, offs_dg, offs_d, offs_n, HAS_D, HAS_Z, HAS_SEQ_IDX, DT_SOFTPLUS,
        )  # fmt: skip

    tl.store(dAp_ptr + state_offs, dA_acc, mask=mask_nd)
    tl.store(dDp_ptr + (b * nchunks + pid_c) * dim + offs_d, dD_acc, mask=mask_d)
    tl.store(dbiasp_ptr + (b * nchunks + pid_c) * dim + offs_d, dbias_acc, mask=mask_d)
    if WRITE_DH0:  # the adjoint left after the first step of the first chunk is dL/d(initial state)
        dh0_offs = (b * dstate + offs_n[:, None]) * dim + offs_d[None, :]
        tl.store(dh0_ptr + dh0_offs, carry, mask=mask_nd & (offs_n * 0 + pid_c == 0)[:, None])


@triton.jit
def _load_adjoint_step(dt_base, C_base, z_base, dy_base, step, s_dt_l, s_C_l, s_z_l, s_dy_l, mask_d, mask_n,
                       HAS_Z: tl.constexpr, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr):  # fmt: skip
    """(dt, C_t, z, dy) of sequence step `step` as stored (the caller keeps `step` inside the chunk), from
    loop-invariant row bases plus a scalar row offset, as `seq_fwd._load_step` does."""
    step = step.to(tl.int64)
    dt = load_tile(dt_base + step * s_dt_l, mask_d, EVEN_D)
    Ct = load_tile(C_base + step * s_C_l, mask_n, EVEN_N)
    dy = load_tile(dy_base + step * s_dy_l, mask_d, EVEN_D)
    zt = dy
    if HAS_Z:
        zt = load_tile(z_base + step * s_z_l, mask_d, EVEN_D)
    return dt, Ct, zt, dy


@triton.jit
def _adjoint_chunk_kernel(
    dt_ptr, A_ptr, C_ptr, z_ptr, dt_bias_ptr, seq_idx_ptr, dy_ptr, G_ptr, Q_ptr,
    seqlen, dim, dstate, dim_per_group, ngroups, nchunks, chunk_len,
    s_dt_b, s_dt_l, s_C_b, s_C_l, s_C_g, s_z_b, s_z_l, s_si_b, s_si_l, s_dy_b, s_dy_l,
    HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_D: tl.constexpr = False, EVEN_N: tl.constexpr = False,
):  # fmt: skip
    """Per chunk, the adjoint it passes to the step before it when nothing flows in from after it (G), and
    the product of its decays (Q): the adjoint entering chunk c - 1 is G(c) + Q(c) * (adjoint entering c).
    Needs no states: the adjoint's input dyp_t C_t depends on dy, z and C only. A is transposed,
    (dstate, dim); outputs are (batch, nchunks, dstate, dim). The grid skips chunk 0, whose G and Q
    nothing reads (program_id(2) is chunk - 1).

    The loop keeps the inputs of the next two steps (in reverse) in flight, as the forward's does: with
    each step waiting on its own loads this pass took 1.94 ms at the anchor (L = 8192, H200), against
    ~0.8 for the forward's chunk pass of about as many instructions."""
    pid_c = tl.program_id(2) + 1
    b, g, offs_dg, mask_d, offs_d, offs_n, mask_n, mask_nd, A2, dt_bias = _program_channels(
        A_ptr, dt_bias_ptr, ngroups, dim_per_group, dstate, HAS_DT_BIAS, ACC, BLOCK_D, BLOCK_N, True
    )
    carry = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    delta_sum = tl.zeros((BLOCK_D,), dtype=ACC)
    alive = mask_d
    l_begin = pid_c * chunk_len
    l_end = tl.minimum(l_begin + chunk_len, seqlen)
    dt_base = dt_ptr + b * s_dt_b + offs_d
    C_base = C_ptr + b * s_C_b + g * s_C_g + offs_n
    z_base = z_ptr + b * s_z_b + offs_d
    dy_base = dy_ptr + b * s_dy_b + offs_d
    si_base = seq_idx_ptr + b * s_si_b
    # Inputs of steps t (set 0) and t - 1 (set 1); the loop loads step t - 2 before computing step t
    # (before the chunk's start: its first step again, never used).
    dt0, C0, z0, dy0 = _load_adjoint_step(
        dt_base, C_base, z_base, dy_base, l_end - 1, s_dt_l, s_C_l, s_z_l, s_dy_l, mask_d, mask_n,
        HAS_Z, EVEN_D, EVEN_N,
    )  # fmt: skip
    dt1, C1, z1, dy1 = _load_adjoint_step(
        dt_base, C_base, z_base, dy_base, tl.maximum(l_end - 2, l_begin), s_dt_l, s_C_l, s_z_l, s_dy_l,
        mask_d, mask_n, HAS_Z, EVEN_D, EVEN_N,
    )  # fmt: skip
    for i in tl.range(0, l_end - l_begin):
        t = l_end - 1 - i
        dt2, C2, z2, dy2 = _load_adjoint_step(
            dt_base, C_base, z_base, dy_base, tl.maximum(t - 2, l_begin), s_dt_l, s_C_l, s_z_l, s_dy_l,
            mask_d, mask_n, HAS_Z, EVEN_D, EVEN_N,
        )  # fmt: skip
        dyp = dy0.to(ACC)
        if HAS_Z:
            z = z0.to(ACC)
            dyp = dyp * z / (1.0 + tl.exp(-z))
        delta = step_delta(dt0, dt_bias, mask_d, HAS_DT_BIAS, DT_SOFTPLUS, ACC)
        dA = tl.exp2(A2 * delta[None, :])
        delta_sum += delta
        if HAS_SEQ_IDX:
            si_row = si_base + t.to(tl.int64) * s_si_l
            reset = _reset_at(si_row, s_si_l, t, l_end, HAS_SEQ_IDX)
            dA = tl.where(reset, 0.0, dA)
            alive = alive & (reset == 0)
        carry = dA * (carry + C0.to(ACC)[:, None] * dyp[None, :])
        dt0, C0, z0, dy0 = dt1, C1, z1, dy1
        dt1, C1, z1, dy1 = dt2, C2, z2, dy2
    offs = ((b * nchunks + pid_c) * dstate + offs_n[:, None]) * dim + offs_d[None, :]
    tl.store(G_ptr + offs, carry, mask=mask_nd)
    decay = tl.where(alive[None, :], tl.exp2(A2 * delta_sum[None, :]), 0.0)
    tl.store(Q_ptr + offs, decay, mask=mask_nd)


def seq_bwd_config(dim_per_group: int) -> tuple[int, int, int, int]:
    """(BLOCK_D, num_warps, SEG, PRELOAD) of the step-loop backward: SEG the steps of a segment (2 or 4),
    PRELOAD 1 to load a segment's inputs once (see the kernel); MAMBAKIT_SCAN_BWD_SEQ_CONFIG="bd,nw,seg,pre"
    overrides."""
    env = os.environ.get("MAMBAKIT_SCAN_BWD_SEQ_CONFIG")
    if env:
        bd, nw, seg, pre = (int(v) for v in env.split(","))
        return bd, nw, seg, pre
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 16, 1, 2, 1  # the GPU default's segments, narrower blocks
    # H200 sweeps at the anchor (batch 4, dim 4096, bf16; docs/benchmarks.md), L = 8192, 6 sequence
    # chunks: segments of 2 with preloading 10.10 ms (capped at 168 registers; 10.31 uncapped), segments
    # of 4 with preloading 12.27 (uncapped; 17.41 capped), 64 channels a program 12.15 (uncapped);
    # tile-scan backward 29.9 ms (2026-12-02). Before the checkpoint pass moved out: 12.9 ms.
    return 32, 1, 2, 1


def chunk_pass_blocks(dim_per_group: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(BLOCK_D, num_warps) of the backward's chunk passes: first of the two that run the forward's step
    loop (chunk start states, checkpoints), then of the adjoint pass. They hold one state tile a thread
    and do no reductions, so wide blocks cost the fewest instructions a channel-step, but with the
    backward's few sequence chunks wide blocks leave the GPU underoccupied. H200, anchor, L = 8192, 6
    chunks, forward+backward with all three at 128/1, 64/1, 32/1, 128/2, 256/2: 11.66, 11.20, 11.99,
    11.19, 11.64 ms; the adjoint pass alone 1.47, 1.20, 1.03, 1.17, 1.47 ms, the four step-loop launches
    4.81, 4.61, 5.56, 4.62, 4.80 (2026-12-02). MAMBAKIT_SCAN_BWD_PASS_BLOCK="bd,nw" sets both."""
    env = os.environ.get("MAMBAKIT_SCAN_BWD_PASS_BLOCK")
    if env:
        bd, nw = (int(v) for v in env.split(","))
        return (bd, nw), (bd, nw)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return (16, 1), (16, 1)
    width = next_power_of_2(dim_per_group)
    return (max(32, min(64, width)), 1), (32, 1)


def default_bwd_seq_chunks(x: torch.Tensor, warps: int, seqlen: int) -> int:
    """Sequence chunks of the step-loop backward: about eight waves of programs (12 warps resident per
    multiprocessor at the register cap, see `_maxnreg`), chunks of at least 256 steps. The chunk passes
    cover the sequence once whatever the count (less the chunk each skips), so more chunks cost little
    and fill the GPU better. At the anchor (512 one-warp programs, 132 SMs) that is 24 chunks. H200,
    L = 8192, backward with 6 / 8 / 12 / 18 / 24 chunks: 9.04 / 9.38 / 8.93 / 8.93 / 8.80 ms
    (2026-12-02; 6 was the default while every split also cost the passes more).
    MAMBAKIT_SCAN_BWD_SEQ_CHUNKS overrides."""
    fixed, sms = _seq_chunk_override_or_sms(x, "MAMBAKIT_SCAN_BWD_SEQ_CHUNKS")
    if fixed is not None:
        return fixed
    return max(1, min(int(_WARPS_PER_SM * sms / max(warps, 1)), seqlen // 256))


_WARPS_PER_SM = 96  # eight waves of 12 resident warps


def _maxnreg() -> dict:
    """The kernel's cap on registers per thread: 168 lets 12 warps per multiprocessor run instead of 8
    (uncapped it takes 227) at the price of a few spills. H200, anchor, L = 8192, 6 chunks: 10.10 ms
    capped at 168, 10.31 uncapped (2026-12-02; before the checkpoint pass moved out, 12.9 / 15.1 / 17.9 at
    168 / none / 128). MAMBAKIT_SCAN_BWD_MAXNREG overrides (0: no cap)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {}
    cap = int(os.environ.get("MAMBAKIT_SCAN_BWD_MAXNREG", "168"))
    return {"maxnreg": cap} if cap > 0 else {}


def selective_scan_bwd_seq(
    dy: torch.Tensor,
    dfinal: torch.Tensor | None,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    seq_chunks: int | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_state) by the step-loop kernels, each in
    its input's dtype (None where the input is None); arguments as `scan_bwd.selective_scan_bwd`, with
    last-dimension-contiguous x, dt, B, C, z, dy."""
    batch, seqlen, dim = x.shape
    dstate = A.shape[1]
    ngroups = B.shape[2]
    dim_per_group = dim // ngroups
    acc = _acc_dtype(x)
    acc_torch = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device
    block_d, num_warps, seg, preload = config or seq_bwd_config(dim_per_group)
    if seg not in (2, 4):
        raise ValueError(f"the segment length of the step-loop backward must be 2 or 4, got {seg}")
    block_d = min(block_d, max(next_power_of_2(dim_per_group), 16))
    num_warps = max(1, min(num_warps, block_d // 32))
    block_n = next_power_of_2(dstate)
    nblocks = triton.cdiv(dim_per_group, block_d)
    # Channel-major: A as (dstate, dim) and every state (batch, [nchunks,] dstate, dim), as in the
    # forward (see the module docstring: one register layout for all of the kernel's tiles).
    A_t = A.t().contiguous()
    D = D.contiguous() if D is not None else None
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    h0 = _channel_major(initial_state)
    dfinal = _channel_major(dfinal)
    si = seq_idx if seq_idx is not None else x  # a placeholder pointer; never read without HAS_SEQ_IDX
    s_si = (si.stride(0), si.stride(1)) if seq_idx is not None else (0, 0)
    s_z = (z.stride(0), z.stride(1)) if z is not None else (0, 0)

    if os.environ.get("MAMBAKIT_SCAN_BWD_BC_FP32", "0") == "1" and B.dtype != torch.float32:
        # Every thread reads all of B_t and C_t: converted once here rather than per thread and step.
        B32, C32 = B.float(), C.float()
    else:
        B32, C32 = B, C
    warps = batch * ngroups * nblocks * num_warps
    nchunks = seq_chunks or default_bwd_seq_chunks(x, warps, seqlen)
    # Chunks are whole segments and whole tiles of the forward's chunk pass.
    step = 16
    chunk_len = triton.cdiv(triton.cdiv(max(seqlen, 1), nchunks), step) * step
    nchunks = triton.cdiv(seqlen, chunk_len) if seqlen > 0 else 1
    nseg = triton.cdiv(chunk_len, seg)
    pass_block, adjoint_block = chunk_pass_blocks(dim_per_group)
    if nchunks > 1:
        starts = chunk_start_states(
            x, dt, A, B, dt_bias, dt_softplus, initial_state, seq_idx, chunk_len,
            default_config(dim_per_group, dstate), channel_major=True, seq_block=pass_block,
        )  # fmt: skip
        if kernel_choice() != "seq":  # the tile forward's chunk pass returns (dim, dstate) states
            starts = _channel_major(starts)
        G = torch.empty_like(starts)
        Q = torch.empty_like(starts)
        adj_bd, adj_nw = adjoint_block
        _adjoint_chunk_kernel[(batch * ngroups, triton.cdiv(dim_per_group, adj_bd), nchunks - 1)](
            dt, A_t, C, z if z is not None else x, dt_bias if dt_bias is not None else x, si, dy, G, Q,
            seqlen, dim, dstate, dim_per_group, ngroups, nchunks, chunk_len,
            dt.stride(0), dt.stride(1), C.stride(0), C.stride(1), C.stride(2), *s_z, *s_si,
            dy.stride(0), dy.stride(1),
            HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, HAS_SEQ_IDX=seq_idx is not None,
            DT_SOFTPLUS=bool(dt_softplus), ACC=acc, BLOCK_D=adj_bd, BLOCK_N=block_n, num_warps=adj_nw,
            EVEN_D=dim_per_group % adj_bd == 0, EVEN_N=block_n == dstate,
        )  # fmt: skip
        state_in, carry_in = starts, chunk_carries(G, Q, dfinal)
    else:
        state_in = h0.unsqueeze(1) if h0 is not None else None
        carry_in = dfinal.unsqueeze(1) if dfinal is not None else None

    # The checkpoint pass: the forward's step loop from each chunk's start state, storing the state at
    # every segment start (its wide blocks do this at a fraction of the cost a step of this kernel's
    # 32-channel blocks would).
    hbuf = torch.empty((batch, nchunks * nseg, dstate, dim), dtype=acc_torch, device=dev)
    if seqlen > 0:
        fwd_launch(
            x, dt, A, B32, B32, None, None, dt_bias, seq_idx, x, dt_softplus, acc, nchunks, chunk_len,
            16, block_d, num_warps, state_in, hbuf, None, write_y=False, ckpt=(hbuf, seg, nseg),
            seq_block=pass_block,
        )  # fmt: skip
    dx, ddt, dz, dBp, dCp, dAp, dDp, dbiasp, dh0 = grad_buffers(
        x, dt, z, h0, ngroups, nblocks, nchunks, dstate
    )
    # The kernel writes these channel-major; the views read them back as (dim, dstate).
    dAp = dAp.view(batch, nchunks, dstate, dim)
    dh0 = dh0.view(batch, dstate, dim) if dh0 is not None else None
    if seqlen > 0:
        selective_scan_bwd_seq_kernel[(batch * ngroups, nblocks, nchunks)](
            x, dt, A_t, B32, C32, D if D is not None else x, z if z is not None else x,
            dt_bias if dt_bias is not None else x, si,
            dy, carry_in if carry_in is not None else dAp, hbuf,
            dx, ddt, dz if dz is not None else dx, dBp, dCp, dAp, dDp, dbiasp,
            dh0 if dh0 is not None else dAp,
            seqlen, dim, dstate, dim_per_group, ngroups, nblocks, nchunks, chunk_len, nseg,
            x.stride(0), x.stride(1), dt.stride(0), dt.stride(1),
            B32.stride(0), B32.stride(1), B32.stride(2), C32.stride(0), C32.stride(1), C32.stride(2),
            *s_z, *s_si, dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1), ddt.stride(0), ddt.stride(1),
            dz.stride(0) if dz is not None else 0, dz.stride(1) if dz is not None else 0,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None,
            HAS_CARRY=carry_in is not None, HAS_SEQ_IDX=seq_idx is not None,
            DT_SOFTPLUS=bool(dt_softplus), ACC=acc, WRITE_DH0=h0 is not None,
            BLOCK_D=block_d, BLOCK_N=block_n, SEG=seg, PRELOAD=bool(preload), num_warps=num_warps,
            **_maxnreg(),
        )  # fmt: skip
    else:
        dAp.zero_()
        dDp.zero_()
        dbiasp.zero_()
        if dh0 is not None:
            dh0.copy_(dfinal if dfinal is not None else torch.zeros_like(dh0))
    dA, dB, dC, dD, ddt_bias, dh0 = reduce_partials(
        dBp, dCp, dAp.transpose(-1, -2), dDp, dbiasp, dh0.transpose(-1, -2) if dh0 is not None else None,
        A, B, C, D, dt_bias, initial_state,
    )  # fmt: skip
    dh0 = dh0.contiguous() if dh0 is not None else None
    return dx, ddt, dA.contiguous(), dB, dC, dD, dz, ddt_bias, dh0
