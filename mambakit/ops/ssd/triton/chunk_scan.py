"""The output pass: y of every chunk, one program per (batch, chunk, head, headdim block), or, on the
sequential path, one program per (batch, head, headdim block) walking all chunks in order.

For rows t of chunk c (in-chunk cumulative decay cs, state S entering c):
    y_t = exp(cs_t) * C_t S^T                                                (the past, via the state)
        + sum_{s <= t in c} (C_t . B_s) * exp(cs_t - cs_s) * delta_s * x_s    (the chunk, quadratic form)
        + D * x_t ;   y_t *= silu(z_t) when z is given.
The program walks its chunk SUB rows at a time and carries the state across those sub-blocks, so
only the sub-block on the diagonal is done in the quadratic form:
    y_t = exp(cs_t - cs_ref) * C_t R^T + sum_{s <= t in the sub-block} (...)
    R <- exp(cs_e - cs_ref) * R + sum_{s in the sub-block} exp(cs_e - cs_s) * delta_s * x_s B_s^T
with R = S and cs_ref = 0 at the chunk start and e the sub-block's last row (then cs_ref = cs_e).
All exponents are differences cs_later - cs_earlier, as in the one-level form.

Chunked path (`forward.py`): S comes from `chunk_state` + `state_passing`, all chunks in parallel.
Sequential path: the program carries R on through the chunk's last row into the next chunk (where
cs restarts at 0), starting from the initial state; it writes each S for the backward and the final
state itself, so `chunk_state` and `state_passing` do not run. That suits grids with enough
(batch, head) pairs to fill the GPU: the per-chunk state work (a third of the chunked forward) goes.

This replaced one program per (row block, chunk, head) reading the state and the (chunk x chunk)
C B^T from memory: at the benchmark anchor that was 32,768 short programs, latency-bound (0.69 ms of
a 1.13 ms forward on the H200). Here S is read once per chunk, x once, and C B^T is only formed for
the diagonal sub-block, from the B rows the state update reads anyway.
With seq_idx, R belongs to the document of its reference row: rows of a later document get no state
term, the update drops R when the sub-block ends in another document, and pairs (and state terms)
only count within one document.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from mambakit.ops._launch import CachedTuning
from mambakit.ops._triton_math import LOG2E, exp_ftz
from mambakit.ops._triton_tiles import load_tile, store_tile
from mambakit.ops.ssd.triton._common import interpreting, pow2_at_least

# (SUB, warps, stages). fp32 steps take one stage: Triton 3.6 on the H200 gave wrong results for
# 16-bit inputs at (32, 4, 2) (the original kernel, with the state as the second operand; right at
# one stage), so stepping under 64 rows is kept to the fp32 configs, where it was right either way.
SCAN_CONFIGS = [(64, 4, 2), (64, 4, 1), (64, 8, 2), (64, 4, 3), (32, 4, 1)]


def _prune(configs, named_args, **kwargs):
    """fp32/fp64 operands multiply on CUDA cores: 32-row steps (registers); 16-bit ones take 64.
    Small problems take the first config without a tuning run (see `tune_bucket`)."""
    wide = named_args["x_ptr"].element_size() <= 2
    keep = [c for c in configs if (c.kwargs["SUB"] >= 64) == wide] or configs
    if not wide:  # steps taller than the chunk only compute masked rows
        keep = [c for c in keep if c.kwargs["SUB"] <= pow2_at_least(named_args["chunk_size"])] or keep
    if named_args["tune_bucket"] == 0:
        return keep[:1]
    return keep


def scan_launch() -> tuple:
    """The kernel to launch and its launch arguments: on a GPU the autotuned kernel (the first of
    SCAN_CONFIGS is the untuned default), unless `MAMBAKIT_SSD_SCAN_CONFIG` ("SUB,num_warps,
    num_stages" and optionally ",BLOCK_P", the headdim columns a program) fixes one config (tile
    sweeps, debugging). Under the interpreter 16-row steps, so that the tests' small chunks carry
    the state across several sub-blocks."""
    env = os.environ.get("MAMBAKIT_SSD_SCAN_CONFIG")
    if env:
        sub, warps, stages, *block_p = (int(v) for v in env.split(","))
        args = {"SUB": sub, "num_warps": warps, "num_stages": stages}
        return chunk_scan_fwd_kernel, args | ({"BLOCK_P": block_p[0]} if block_p else {})
    if interpreting():
        return chunk_scan_fwd_kernel, {"SUB": 16}
    return chunk_scan_fwd_tuned, {}


@triton.jit
def carry_state(RT, xT, Br, cs_r, delta_r, rmask, seq_r, cs_ref, seq_ref, cs_e, seq_e,
                 HAS_SEQ: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """R^T (headdim, dstate) moved from the reference row to row e of the sub-block whose x^T
    (headdim, SUB), B (SUB, dstate), cs, delta and seq the arguments hold."""
    w = exp_ftz(cs_e - cs_r) * delta_r
    decay = exp_ftz(cs_e - cs_ref)
    if HAS_SEQ:
        w = tl.where(seq_r == seq_e, w, 0.0)
        decay = tl.where(seq_e == seq_ref, decay, 0.0)
    w = tl.where(rmask, w, 0.0)
    xwT = (xT.to(RT.dtype) * w[None, :]).to(xT.dtype).to(Br.dtype)
    return RT * decay + tl.dot(xwT, Br, input_precision=PREC).to(RT.dtype)


@triton.jit
def chunk_scan_fwd_kernel(
    x_ptr, B_ptr, C_ptr, z_ptr, D_ptr, seq_ptr, delta_ptr, cs_ptr, states_ptr, init_ptr, final_ptr,
    y_ptr, ypre_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group, tune_bucket,
    sx_b, sx_l, sx_h, sx_p,
    sB_b, sB_l, sB_g, sB_n,
    sC_b, sC_l, sC_g, sC_n,
    sz_b, sz_l, sz_h, sz_p,
    sy_b, sy_l, sy_h, sy_p,
    ss_b, ss_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr,
    SEQUENTIAL: tl.constexpr, STORE_STATES: tl.constexpr, FULL: tl.constexpr,
    SUB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    npb = tl.cdiv(headdim, BLOCK_P)
    h = tl.program_id(0) // npb
    pb = tl.program_id(0) % npb
    if SEQUENTIAL:  # all chunks of one (batch, head), in order, from the initial state
        b = tl.program_id(1)
        c_lo = 0
        c_hi = nchunks
    else:  # one chunk, from the state `state_passing` left for it
        b = tl.program_id(1) // nchunks
        c_lo = tl.program_id(1) % nchunks
        c_hi = c_lo + 1
    g = h // heads_per_group
    ACC = states_ptr.dtype.element_ty
    XDT = x_ptr.dtype.element_ty  # tensor-core operand dtype
    DOT = XDT
    if DOT_F32:  # see _common.dot_in_fp32: operands still rounded to XDT first, as on a GPU
        DOT = tl.float32

    offs_q = tl.arange(0, SUB)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    pmask = offs_p < headdim
    nmask = offs_n < dstate
    pn_mask = pmask[:, None] & nmask[None, :]
    pn_off = offs_p[:, None] * dstate + offs_n[None, :]
    bh = b * nheads + h
    dcs_base = bh * seqlen
    if HAS_D:
        Dp = tl.load(D_ptr + h * headdim + offs_p, mask=pmask, other=0.0).to(ACC)  # D as (nheads, headdim)

    # Everything is computed transposed, (headdim, rows): the state R^T (headdim, dstate) is then the
    # first operand of both products that read or update it, which Hopper's wgmma takes from
    # registers; as the second operand it went through shared memory every sub-block (with 44
    # register spills; 0.64 -> 0.61 ms at the benchmark anchor on the H200, 2026-12-01).
    if SEQUENTIAL:
        if HAS_INIT:
            RT = tl.load(init_ptr + bh * headdim * dstate + pn_off, mask=pn_mask, other=0.0).to(ACC)
        else:
            RT = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
    else:
        RT = tl.load(
            states_ptr + ((b * nchunks + c_lo) * nheads + h) * headdim * dstate + pn_off, mask=pn_mask
        )
    seq_ref = 0  # stays 0 without seq_idx (then unused)
    if HAS_SEQ:  # the document the state belongs to
        seq_ref = tl.load(seq_ptr + b * ss_b + tl.maximum(c_lo * chunk_size - 1, 0) * ss_l)

    for c in range(c_lo, c_hi):
        start = c * chunk_size
        chunk_len = tl.minimum(chunk_size, seqlen - start)
        if SEQUENTIAL and STORE_STATES:  # the state entering the chunk, for the backward
            tl.store(
                states_ptr + ((b * nchunks + c) * nheads + h) * headdim * dstate + pn_off, RT, mask=pn_mask
            )
        cs_ref = (start * 0).to(ACC)  # cs restarts at 0 in every chunk
        for q0 in range(0, chunk_len, SUB):
            r = q0 + offs_q
            rmask = r < chunk_len
            t = start + r
            cs_r = load_tile(cs_ptr + dcs_base + t, rmask, FULL)
            delta_r = load_tile(delta_ptr + dcs_base + t, rmask, FULL)
            rn_mask = rmask[:, None] & nmask[None, :]
            Cr = load_tile(C_ptr + b * sC_b + t[:, None] * sC_l + g * sC_g + offs_n[None, :] * sC_n, rn_mask,
                           FULL).to(XDT).to(DOT)  # fmt: skip
            Br = load_tile(B_ptr + b * sB_b + t[:, None] * sB_l + g * sB_g + offs_n[None, :] * sB_n, rn_mask,
                           FULL).to(XDT).to(DOT)  # fmt: skip
            io_mask = pmask[:, None] & rmask[None, :]
            xT = load_tile(x_ptr + b * sx_b + t[None, :] * sx_l + h * sx_h + offs_p[:, None] * sx_p, io_mask,
                           FULL)  # (BLOCK_P, SUB)  # fmt: skip

            # the past, through the carried state
            scale = exp_ftz(cs_r - cs_ref)
            if HAS_SEQ:
                seq_r = tl.load(seq_ptr + b * ss_b + t * ss_l, mask=rmask, other=0)
                scale = tl.where(seq_r == seq_ref, scale, 0.0)
            else:
                seq_r = cs_r  # unused stand-in
            accT = tl.dot(RT.to(XDT).to(DOT), tl.trans(Cr), input_precision=PREC).to(ACC) * scale[None, :]

            # the diagonal sub-block, quadratic: [s, t] = (B_s . C_t) exp(cs_t - cs_s) delta_s
            cbT = tl.dot(Br, tl.trans(Cr), input_precision=PREC).to(ACC)  # (SUB, SUB)
            keep = offs_q[None, :] >= offs_q[:, None]
            if not FULL:
                keep = keep & rmask[:, None]
            if HAS_SEQ:
                keep = keep & (seq_r[:, None] == seq_r[None, :])
            cs2 = cs_r * LOG2E  # in base 2 once per row, not once per (s, t) pair
            LT = tl.exp2(tl.where(keep, cs2[None, :] - cs2[:, None], float("-inf")))
            scoresT = cbT * LT * delta_r[:, None]
            accT += tl.dot(xT.to(XDT).to(DOT), scoresT.to(XDT).to(DOT), input_precision=PREC).to(ACC)

            if HAS_D:
                accT += xT.to(ACC) * Dp[:, None]
            y_off = b * sy_b + t[None, :] * sy_l + h * sy_h + offs_p[:, None] * sy_p
            if HAS_Z:
                store_tile(ypre_ptr + y_off, accT.to(ypre_ptr.dtype.element_ty), io_mask, FULL)
                z_off = b * sz_b + t[None, :] * sz_l + h * sz_h + offs_p[:, None] * sz_p
                zT = load_tile(z_ptr + z_off, io_mask, FULL).to(ACC)
                accT = accT * zT * tl.sigmoid(zT)
            store_tile(y_ptr + y_off, accT.to(y_ptr.dtype.element_ty), io_mask, FULL)

            # carry the state to the sub-block's last row: always when walking on to the next chunk,
            # else not after the chunk's last sub-block
            carry = q0 + SUB < chunk_len
            if SEQUENTIAL:
                carry = q0 >= 0
            if carry:
                e = tl.minimum(q0 + SUB, chunk_len) - 1
                cs_e = tl.load(cs_ptr + dcs_base + start + e)
                seq_e = cs_e  # unused stand-in without seq_idx
                if HAS_SEQ:
                    seq_e = tl.load(seq_ptr + b * ss_b + (start + e) * ss_l)
                RT = carry_state(RT, xT, Br, cs_r, delta_r, rmask, seq_r, cs_ref, seq_ref, cs_e, seq_e,
                                  HAS_SEQ, PREC)  # fmt: skip
                cs_ref = cs_e
                if HAS_SEQ:
                    seq_ref = seq_e
    if SEQUENTIAL:
        tl.store(final_ptr + bh * headdim * dstate + pn_off, RT, mask=pn_mask)


chunk_scan_fwd_tuned = CachedTuning(
    triton.autotune(
        configs=[triton.Config({"SUB": q}, num_warps=w, num_stages=n) for q, w, n in SCAN_CONFIGS],
        key=["nheads", "headdim", "dstate", "chunk_size", "tune_bucket", "SEQUENTIAL", "STORE_STATES"],
        prune_configs_by={"early_config_prune": _prune},
    )(chunk_scan_fwd_kernel)
)
