"""Triton backward kernel of the Mamba-1 selective scan, recomputing the states instead of storing them.

Math (per channel d and state n; a_t = exp(delta_t A), b_t = delta_t B_t x_t, h_t = a_t h_{t-1} + b_t):
    the adjoint g_t = dL/dh_t obeys the reverse recurrence g_t = dyp_t C_t + a_{t+1} g_{t+1},
    started from g_{L} a_{L} := dL/d(final state), where dyp = dL/d(y before the z gate). Then
        dx_t     = sum_n g_t delta_t B_t + D dyp_t
        ddelta_t = sum_n g_t (x_t B_t + A a_t h_{t-1}),   with a_t h_{t-1} = h_t - b_t
        dA       = sum_t g_t delta_t a_t h_{t-1}
        dB_t     = sum_d g_t delta_t x_t,   dC_t = sum_d dyp_t h_t   (summed over the group's channels)
        dh_{-1}  = a_0 g_0.
One program per (batch, group, block of channels), as in the forward. Pass 1 walks the sequence forward and
writes the state at the start of every tile to a scratch buffer (batch, ntiles, dim, dstate) that lives
only during this call. Pass 2 walks the tiles backward: it rebuilds the tile's states from the saved start
state with the forward tile scan, solves the adjoint recurrence with a reverse `tl.associative_scan`
(decays a_{t+1} are read one step ahead), and writes dx, ddt, dz and per-block partial sums of dB, dC and
per-batch partial sums of dA, dD, ddt_bias, which the launcher reduces with torch (deterministic, no atomics).
When batch x channel blocks underfill the GPU, the sequence is also split into chunks handled in parallel:
chunk start states come from the forward's chunk pass, and the adjoint entering each chunk from
`_adjoint_chunk_kernel` (each chunk's adjoint from a zero carry and its decay product) and a short combine.

Memory during the call (fp32): scratch 4 * batch * seqlen * dim * dstate / BLOCK_L bytes, and the dB and dC
partials 4 * batch * seqlen * ngroups * dstate * (dim / ngroups / BLOCK_D) bytes each.
Traffic floor at the anchor (batch 4, L 8192, dim 4096, bf16): read x, dt, z, dy, write dx, ddt, dz
(7 * 268 MB) = 1.9 GB -> 0.63 ms at 3.0 TB/s. With BLOCK_L 8, BLOCK_D 32 the scratch (1.07 GB) and the
partials (2 * 0.27 GB) are each written and read once: +3.2 GB, ~1.1 ms more. Like the forward, the
kernel is compute bound (three tile scans and three exp per state element): target <= 6.6 ms for the
backward (<= 8 ms forward+backward at L = 8192).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mambakit.ops._launch import next_power_of_2
from mambakit.ops._triton_math import exp_ftz
from mambakit.ops.selective_scan.triton.chunk_combine import combine_chunks
from mambakit.ops.selective_scan.triton.scan_fwd import (
    _acc_dtype,
    _last_dim_contiguous,
    _linear_combine,
    _load_delta,
    chunk_start_states,
    default_config,
    default_seq_chunks,
)


@triton.jit
def _tile_decay(
    dt_ptr, seq_idx_ptr, A, dt_bias, b, offs_l, offs_d, mask_d, seqlen, s_dt_b, s_dt_l, s_si_b, s_si_l,
    HAS_SEQ_IDX: tl.constexpr, DT_SOFTPLUS: tl.constexpr, HAS_DT_BIAS: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """delta (L, D) and decay a = exp(delta A) (L, D, N) at steps offs_l; a = 1 past the end, 0 at resets."""
    mask_l = (offs_l < seqlen) & (offs_l >= 0)
    mask_ld = mask_l[:, None] & mask_d[None, :]
    delta = _load_delta(
        dt_ptr + b * s_dt_b + offs_l[:, None] * s_dt_l + offs_d[None, :],
        dt_bias, mask_ld, DT_SOFTPLUS, HAS_DT_BIAS, ACC,
    )  # fmt: skip
    dA = exp_ftz(delta[:, :, None] * A[None, :, :])
    if HAS_SEQ_IDX:
        si_ptr = seq_idx_ptr + b * s_si_b
        cur = tl.load(si_ptr + offs_l * s_si_l, mask=mask_l, other=0)
        prev = tl.load(si_ptr + (offs_l - 1) * s_si_l, mask=mask_l & (offs_l > 0), other=0)
        reset = mask_l & (offs_l > 0) & (cur != prev)
        dA = tl.where(reset[:, None, None], 0.0, dA)
    return delta, dA


@triton.jit
def _selective_scan_bwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, h0_ptr, seq_idx_ptr,
    dy_ptr, dhT_ptr, hbuf_ptr,
    dx_ptr, ddt_ptr, dz_ptr, dBp_ptr, dCp_ptr, dAp_ptr, dDp_ptr, dbiasp_ptr, dh0_ptr,
    seqlen, dim, dstate, dim_per_group, ngroups, ntiles, nblocks, nchunks, tiles_per_chunk,
    s_x_b, s_x_l, s_dt_b, s_dt_l, s_B_b, s_B_l, s_B_g, s_C_b, s_C_l, s_C_g,
    s_z_b, s_z_l, s_si_b, s_si_l, s_dy_b, s_dy_l, s_dx_b, s_dx_l, s_ddt_b, s_ddt_l, s_dz_b, s_dz_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_DHT: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, DT_SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
    WRITE_DH0: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_bg = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2)
    # 64-bit offsets: batch * seqlen * dim passes 2**31 at long sequences.
    b = (pid_bg // ngroups).to(tl.int64)
    g = pid_bg % ngroups
    offs_dg = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_dg < dim_per_group
    offs_d = g * dim_per_group + offs_dg
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    rows = tl.arange(0, BLOCK_L)

    A = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(ACC)
    dt_bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_DT_BIAS:
        dt_bias = tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    Dv = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    # Chunk start states, carries and partials are (batch, nchunks, dim, dstate); one chunk: whole sequence.
    state_offs = ((b * nchunks + pid_c) * dim + offs_d[:, None]) * dstate + offs_n[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + state_offs, mask=mask_dn, other=0.0).to(ACC)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    hbuf = hbuf_ptr + offs_d[:, None] * dstate + offs_n[None, :]

    # Pass 1: the state at the start of every tile.
    for i in range(0, tiles_per_chunk):
        k = pid_c * tiles_per_chunk + i
        offs_l = (k * BLOCK_L + rows).to(tl.int64)
        mask_l = offs_l < seqlen
        mask_ld = mask_l[:, None] & mask_d[None, :]
        mask_ln = mask_l[:, None] & mask_n[None, :]
        tl.store(
            hbuf + (b * ntiles + k) * dim * dstate, h, mask=mask_dn & ((offs_n * 0 + k) < ntiles)[None, :]
        )
        delta, dA = _tile_decay(
            dt_ptr, seq_idx_ptr, A, dt_bias, b, offs_l, offs_d, mask_d, seqlen,
            s_dt_b, s_dt_l, s_si_b, s_si_l, HAS_SEQ_IDX, DT_SOFTPLUS, HAS_DT_BIAS, ACC,
        )  # fmt: skip
        x = tl.load(x_ptr + b * s_x_b + offs_l[:, None] * s_x_l + offs_d[None, :], mask=mask_ld, other=0.0)
        Bt = tl.load(
            B_ptr + b * s_B_b + offs_l[:, None] * s_B_l + g * s_B_g + offs_n[None, :], mask=mask_ln, other=0.0
        )
        dBx = (delta * x.to(ACC))[:, :, None] * Bt.to(ACC)[:, None, :]
        acum, bcum = tl.associative_scan((dA, dBx), 0, _linear_combine)
        h = tl.sum(tl.where((rows == BLOCK_L - 1)[:, None, None], bcum + acum * h[None, :, :], 0.0), axis=0)

    # Pass 2: tiles in reverse; `carry` is g at the first step of the tile after this one.
    if HAS_DHT:
        carry = tl.load(dhT_ptr + state_offs, mask=mask_dn, other=0.0).to(ACC)
    else:
        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    dD_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for i in range(0, tiles_per_chunk):
        k = pid_c * tiles_per_chunk + tiles_per_chunk - 1 - i
        offs_l = (k * BLOCK_L + rows).to(tl.int64)
        mask_l = offs_l < seqlen
        mask_ld = mask_l[:, None] & mask_d[None, :]
        mask_ln = mask_l[:, None] & mask_n[None, :]
        h0 = tl.load(
            hbuf + (b * ntiles + k) * dim * dstate,
            mask=mask_dn & ((offs_n * 0 + k) < ntiles)[None, :],
            other=0.0,
        )
        delta, dA = _tile_decay(
            dt_ptr, seq_idx_ptr, A, dt_bias, b, offs_l, offs_d, mask_d, seqlen,
            s_dt_b, s_dt_l, s_si_b, s_si_l, HAS_SEQ_IDX, DT_SOFTPLUS, HAS_DT_BIAS, ACC,
        )  # fmt: skip
        _, dA_next = _tile_decay(
            dt_ptr, seq_idx_ptr, A, dt_bias, b, offs_l + 1, offs_d, mask_d, seqlen, s_dt_b, s_dt_l, s_si_b,
            s_si_l, HAS_SEQ_IDX, DT_SOFTPLUS, HAS_DT_BIAS, ACC,
        )  # fmt: skip
        x = tl.load(x_ptr + b * s_x_b + offs_l[:, None] * s_x_l + offs_d[None, :], mask=mask_ld, other=0.0)
        x = x.to(ACC)
        Bt = tl.load(
            B_ptr + b * s_B_b + offs_l[:, None] * s_B_l + g * s_B_g + offs_n[None, :], mask=mask_ln, other=0.0
        )
        Ct = tl.load(
            C_ptr + b * s_C_b + offs_l[:, None] * s_C_l + g * s_C_g + offs_n[None, :], mask=mask_ln, other=0.0
        )
        Bt = Bt.to(ACC)
        Ct = Ct.to(ACC)
        dy = tl.load(
            dy_ptr + b * s_dy_b + offs_l[:, None] * s_dy_l + offs_d[None, :], mask=mask_ld, other=0.0
        )
        dy = dy.to(ACC)

        xB = x[:, :, None] * Bt[:, None, :]
        dBx = delta[:, :, None] * xB
        acum, bcum = tl.associative_scan((dA, dBx), 0, _linear_combine)
        hs = bcum + acum * h0[None, :, :]

        if HAS_Z:
            z = tl.load(
                z_ptr + b * s_z_b + offs_l[:, None] * s_z_l + offs_d[None, :], mask=mask_ld, other=0.0
            )
            z = z.to(ACC)
            y = tl.sum(hs * Ct[:, None, :], axis=2) + Dv[None, :] * x
            sz = 1.0 / (1.0 + tl.exp(-z))
            dz = dy * y * sz * (1.0 + z * (1.0 - sz))
            tl.store(
                dz_ptr + b * s_dz_b + offs_l[:, None] * s_dz_l + offs_d[None, :],
                dz.to(dz_ptr.dtype.element_ty),
                mask=mask_ld,
            )
            dyp = dy * z * sz
        else:
            dyp = dy

        u = dyp[:, :, None] * Ct[:, None, :]
        pcum, gs = tl.associative_scan((dA_next, u), 0, _linear_combine, reverse=True)
        gg = gs + pcum * carry[None, :, :]  # adjoint g_t, (L, D, N)
        carry = tl.sum(tl.where((rows == 0)[:, None, None], gg, 0.0), axis=0)

        ah = hs - dBx  # a_t h_{t-1}
        ddelta = tl.sum(gg * (xB + A[None, :, :] * ah), axis=2)
        dx = tl.sum(gg * Bt[:, None, :], axis=2) * delta + Dv[None, :] * dyp
        if DT_SOFTPLUS:
            v = tl.load(
                dt_ptr + b * s_dt_b + offs_l[:, None] * s_dt_l + offs_d[None, :], mask=mask_ld, other=0.0
            ).to(ACC)
            if HAS_DT_BIAS:
                v = v + dt_bias[None, :]
            ddelta = tl.where(v <= 20.0, ddelta / (1.0 + tl.exp(-v)), ddelta)
        ddelta = tl.where(mask_ld, ddelta, 0.0)
        tl.store(
            dx_ptr + b * s_dx_b + offs_l[:, None] * s_dx_l + offs_d[None, :],
            dx.to(dx_ptr.dtype.element_ty),
            mask=mask_ld,
        )
        tl.store(
            ddt_ptr + b * s_ddt_b + offs_l[:, None] * s_ddt_l + offs_d[None, :],
            ddelta.to(ddt_ptr.dtype.element_ty),
            mask=mask_ld,
        )

        gd = gg * delta[:, :, None]
        dA_acc += tl.sum(gd * ah, axis=0)
        dD_acc += tl.sum(dyp * x, axis=0)
        dbias_acc += tl.sum(ddelta, axis=0)
        # Partial sums over this block's channels; (batch, seqlen, ngroups, nblocks, dstate).
        part = (
            ((b * seqlen + offs_l[:, None]) * ngroups + g) * nblocks * dstate
            + pid_d * dstate
            + offs_n[None, :]
        )
        tl.store(dBp_ptr + part, tl.sum(gd * x[:, :, None], axis=1), mask=mask_ln)
        tl.store(dCp_ptr + part, tl.sum(dyp[:, :, None] * hs, axis=1), mask=mask_ln)

    tl.store(dAp_ptr + state_offs, dA_acc, mask=mask_dn)
    tl.store(dDp_ptr + (b * nchunks + pid_c) * dim + offs_d, dD_acc, mask=mask_d)
    tl.store(dbiasp_ptr + (b * nchunks + pid_c) * dim + offs_d, dbias_acc, mask=mask_d)
    if WRITE_DH0:  # only the first chunk's carry is the gradient of the initial state
        _, dA0 = _tile_decay(
            dt_ptr, seq_idx_ptr, A, dt_bias, b, rows, offs_d, mask_d, seqlen, s_dt_b, s_dt_l, s_si_b, s_si_l,
            HAS_SEQ_IDX, DT_SOFTPLUS, HAS_DT_BIAS, ACC,
        )  # fmt: skip
        dh0 = tl.sum(tl.where((rows == 0)[:, None, None], dA0, 0.0), axis=0) * carry
        dh0_offs = (b * dim + offs_d[:, None]) * dstate + offs_n[None, :]
        tl.store(dh0_ptr + dh0_offs, dh0, mask=mask_dn & ((offs_n * 0 + pid_c) == 0)[None, :])


@triton.jit
def _adjoint_chunk_kernel(
    dt_ptr, A_ptr, C_ptr, z_ptr, dt_bias_ptr, seq_idx_ptr, dy_ptr, G_ptr, Q_ptr,
    seqlen, dim, dstate, dim_per_group, ngroups, nchunks, tiles_per_chunk,
    s_dt_b, s_dt_l, s_C_b, s_C_l, s_C_g, s_z_b, s_z_l, s_si_b, s_si_l, s_dy_b, s_dy_l,
    HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Per chunk, the adjoint at its first step with a zero carry in (G) and the product of the decays
    a_{t+1} over the chunk (Q), so that g_first(c) = G(c) + Q(c) g_first(c + 1). The adjoint needs no
    states: its input dyp C_t depends on dy, z and C only."""
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
    rows = tl.arange(0, BLOCK_L)
    A = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(ACC)
    dt_bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_DT_BIAS:
        dt_bias = tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    prod = tl.full((BLOCK_D, BLOCK_N), 1.0, dtype=ACC)
    first = (rows == 0)[:, None, None]
    for i in range(0, tiles_per_chunk):
        k = pid_c * tiles_per_chunk + tiles_per_chunk - 1 - i
        offs_l = (k * BLOCK_L + rows).to(tl.int64)
        mask_l = offs_l < seqlen
        mask_ld = mask_l[:, None] & mask_d[None, :]
        mask_ln = mask_l[:, None] & mask_n[None, :]
        _, dA_next = _tile_decay(
            dt_ptr, seq_idx_ptr, A, dt_bias, b, offs_l + 1, offs_d, mask_d, seqlen,
            s_dt_b, s_dt_l, s_si_b, s_si_l, HAS_SEQ_IDX, DT_SOFTPLUS, HAS_DT_BIAS, ACC,
        )  # fmt: skip
        Ct = tl.load(
            C_ptr + b * s_C_b + offs_l[:, None] * s_C_l + g * s_C_g + offs_n[None, :], mask=mask_ln, other=0.0
        ).to(ACC)
        dyp = tl.load(
            dy_ptr + b * s_dy_b + offs_l[:, None] * s_dy_l + offs_d[None, :], mask=mask_ld, other=0.0
        )
        dyp = dyp.to(ACC)
        if HAS_Z:
            z = tl.load(
                z_ptr + b * s_z_b + offs_l[:, None] * s_z_l + offs_d[None, :], mask=mask_ld, other=0.0
            )
            z = z.to(ACC)
            dyp = dyp * z / (1.0 + tl.exp(-z))
        pcum, gs = tl.associative_scan(
            (dA_next, dyp[:, :, None] * Ct[:, None, :]), 0, _linear_combine, reverse=True
        )
        carry = tl.sum(tl.where(first, gs + pcum * carry[None, :, :], 0.0), axis=0)
        prod *= tl.sum(tl.where(first, pcum, 0.0), axis=0)
    offs = ((b * nchunks + pid_c) * dim + offs_d[:, None]) * dstate + offs_n[None, :]
    tl.store(G_ptr + offs, carry, mask=mask_dn)
    tl.store(Q_ptr + offs, prod, mask=mask_dn)


def chunk_carries(G: torch.Tensor, Q: torch.Tensor, dfinal: torch.Tensor | None) -> torch.Tensor:
    """The adjoint entering each chunk from the chunk after it, (batch, nchunks, dim, dstate), from each
    chunk's zero-carry outgoing adjoint G and its decay product Q (same shape); the last chunk gets
    dfinal (dL/d final state) or zeros. One kernel walks the (few) chunks in reverse."""
    return combine_chunks(G, Q, dfinal, reverse=True)


def grad_buffers(x, dt, z, h0, ngroups, nblocks, nchunks, dstate):
    """The outputs of a backward kernel: dx, ddt, dz in their inputs' dtypes, and the float partials
    (dB/dC per channel block, dA, dD, ddt_bias per batch and chunk) that `reduce_partials` sums; dz and
    dh0 are None where z / h0 are."""
    batch, seqlen, dim = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device
    dx = torch.empty(x.shape, dtype=x.dtype, device=dev)
    ddt = torch.empty(dt.shape, dtype=dt.dtype, device=dev)
    dz = torch.empty(z.shape, dtype=z.dtype, device=dev) if z is not None else None
    dBp = torch.empty((batch, seqlen, ngroups, nblocks, dstate), dtype=acc, device=dev)
    dCp = torch.empty_like(dBp)
    dAp = torch.empty((batch, nchunks, dim, dstate), dtype=acc, device=dev)
    dDp = torch.empty((batch, nchunks, dim), dtype=acc, device=dev)
    dbiasp = torch.empty((batch, nchunks, dim), dtype=acc, device=dev)
    dh0 = torch.empty((batch, dim, dstate), dtype=acc, device=dev) if h0 is not None else None
    return dx, ddt, dz, dBp, dCp, dAp, dDp, dbiasp, dh0


def reduce_partials(dBp, dCp, dAp, dDp, dbiasp, dh0, A, B, C, D, dt_bias, initial_state):
    """(dA, dB, dC, dD, ddt_bias, dinitial_state) in their inputs' dtypes from the kernels' float
    partials: dB/dC (batch, seqlen, ngroups, nblocks, dstate) summed over channel blocks, dA
    (batch, nchunks, dim, dstate) and dD/ddt_bias (batch, nchunks, dim) over batch and chunks."""
    dB = dBp.sum(dim=3).to(B.dtype)
    dC = dCp.sum(dim=3).to(C.dtype)
    dA = dAp.sum(dim=(0, 1)).to(A.dtype)
    dD = dDp.sum(dim=(0, 1)).to(D.dtype) if D is not None else None
    ddt_bias = dbiasp.sum(dim=(0, 1)).to(dt_bias.dtype) if dt_bias is not None else None
    dh0 = dh0.to(initial_state.dtype) if dh0 is not None else None
    return dA, dB, dC, dD, ddt_bias, dh0


def bwd_kernel_choice() -> str:
    """The backward kernel: "seq" (step loop, `seq_bwd.py`) or "tile" (this file);
    MAMBAKIT_SCAN_BWD_KERNEL overrides."""
    return os.environ.get("MAMBAKIT_SCAN_BWD_KERNEL", "seq")


def default_bwd_config(dim_per_group: int, dstate: int) -> tuple[int, int, int]:
    """(BLOCK_L, BLOCK_D, num_warps) for the backward kernel, which holds about twice the forward's tiles."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 16, 16, 1
    env = os.environ.get("MAMBAKIT_SCAN_BWD_CONFIG")
    if env:
        bl, bd, nw = (int(v) for v in env.split(","))
        return bl, bd, nw
    # Wider channel blocks and shorter tiles: the dB/dC partial buffers scale with dim / BLOCK_D.
    block_n = next_power_of_2(dstate)
    block_d = max(1, min(32, 4096 // (8 * block_n), next_power_of_2(dim_per_group)))
    # H100 sweep at B4 L2048 D4096 N16 bf16 (2026-11-23, docs/benchmarks.md): (8, 32, 4) 7.5 ms was the
    # fastest of 7 tile settings; (16, 16, 8) 14.2 ms the slowest.
    return 8, block_d, 4


def selective_scan_bwd(
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
    config: tuple[int, int, int] | None = None,
    seq_chunks: int | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_state) of the selective scan, each in
    its input's dtype (None where the input is None). `dy` is dL/dy (batch, seqlen, dim); `dfinal` is
    dL/d(final state) (batch, dim, dstate) or None."""
    x, dt, B, C, z, dy = (_last_dim_contiguous(t) for t in (x, dt, B, C, z, dy))
    if config is None and bwd_kernel_choice() == "seq":
        from mambakit.ops.selective_scan.triton.seq_bwd import selective_scan_bwd_seq

        return selective_scan_bwd_seq(
            dy, dfinal, x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, seq_idx, seq_chunks
        )
    batch, seqlen, dim = x.shape
    dstate = A.shape[1]
    ngroups = B.shape[2]
    dim_per_group = dim // ngroups
    acc = _acc_dtype(x)
    acc_torch = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device
    block_l, block_d, num_warps = config or default_bwd_config(dim_per_group, dstate)
    block_d = min(block_d, next_power_of_2(dim_per_group))
    nblocks = triton.cdiv(dim_per_group, block_d)
    ntiles = triton.cdiv(seqlen, block_l)
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    dfinal = dfinal.contiguous() if dfinal is not None else None
    si = seq_idx if seq_idx is not None else x
    s_si = (si.stride(0), si.stride(1)) if seq_idx is not None else (0, 0)
    s_z = (z.stride(0), z.stride(1)) if z is not None else (0, 0)

    # Sequence chunks processed in parallel when batch x channel blocks underfill the GPU: start states
    # from the forward's chunk pass, adjoint carries from a chunk pass of the adjoint (both short combines).
    programs = batch * ngroups * nblocks
    nchunks = 1 if seqlen == 0 else seq_chunks or default_seq_chunks(x, programs, seqlen, block_l)
    fwd_config = default_config(dim_per_group, dstate)
    step = max(block_l, fwd_config[0])
    chunk_len = max(step, triton.cdiv(triton.cdiv(max(seqlen, 1), nchunks), step) * step)
    nchunks = triton.cdiv(seqlen, chunk_len) if seqlen > 0 else 1
    if nchunks == 1:
        chunk_len = max(ntiles, 1) * block_l
    if nchunks > 1:
        starts = chunk_start_states(x, dt, A, B, dt_bias, dt_softplus, h0, seq_idx, chunk_len, fwd_config)
        G = torch.empty_like(starts)
        Q = torch.empty_like(starts)
        _adjoint_chunk_kernel[(batch * ngroups, nblocks, nchunks)](
            dt, A, C, z if z is not None else x, dt_bias if dt_bias is not None else x, si, dy, G, Q,
            seqlen, dim, dstate, dim_per_group, ngroups, nchunks, chunk_len // block_l,
            dt.stride(0), dt.stride(1), C.stride(0), C.stride(1), C.stride(2), *s_z, *s_si,
            dy.stride(0), dy.stride(1),
            HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, HAS_SEQ_IDX=seq_idx is not None,
            DT_SOFTPLUS=bool(dt_softplus), ACC=acc, BLOCK_L=block_l, BLOCK_D=block_d,
            BLOCK_N=next_power_of_2(dstate), num_warps=num_warps,
        )  # fmt: skip
        state_in, carry_in = starts, chunk_carries(G, Q, dfinal)
    else:
        state_in, carry_in = h0, dfinal

    hbuf = torch.empty((batch, ntiles, dim, dstate), dtype=acc_torch, device=dev)
    dx, ddt, dz, dBp, dCp, dAp, dDp, dbiasp, dh0 = grad_buffers(
        x, dt, z, h0, ngroups, nblocks, nchunks, dstate
    )
    grid = (batch * ngroups, nblocks, nchunks)
    _selective_scan_bwd_kernel[grid](
        x, dt, A, B, C, D if D is not None else x, z if z is not None else x,
        dt_bias if dt_bias is not None else x, state_in if state_in is not None else dAp, si,
        dy, carry_in if carry_in is not None else dAp, hbuf,
        dx, ddt, dz if dz is not None else dx, dBp, dCp, dAp, dDp, dbiasp, dh0 if dh0 is not None else dAp,
        seqlen, dim, dstate, dim_per_group, ngroups, ntiles, nblocks, nchunks, chunk_len // block_l,
        x.stride(0), x.stride(1), dt.stride(0), dt.stride(1),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2), *s_z, *s_si,
        dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1), ddt.stride(0), ddt.stride(1),
        dz.stride(0) if dz is not None else 0, dz.stride(1) if dz is not None else 0,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None,
        HAS_H0=state_in is not None, HAS_DHT=carry_in is not None, HAS_SEQ_IDX=seq_idx is not None,
        DT_SOFTPLUS=bool(dt_softplus), ACC=acc, WRITE_DH0=h0 is not None,
        BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_N=next_power_of_2(dstate),
        num_warps=num_warps,
    )  # fmt: skip
    dA, dB, dC, dD, ddt_bias, dh0 = reduce_partials(
        dBp, dCp, dAp, dDp, dbiasp, dh0, A, B, C, D, dt_bias, initial_state
    )
    return dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dh0
