"""Launches the SSD backward: `chunk_state_bwd` and `state_passing` (reverse pass over chunks), then the
three chunk kernels of `bwd_chunk`, then O(batch * seqlen * nheads) PyTorch glue for the
scalar-per-position gradients (the in-chunk reverse cumsum that turns d cs into d(delta * A), and dt
through softplus/clamp).

Recomputation: nothing of size (chunk x chunk) is stored by the forward. The backward recomputes
C B^T, the decay matrix and x dy^T in registers, tile by tile, from x, B, C, delta, cs and the chunk
states. (Until 2026-12-01 the dx kernel read a C B^T shared by a group's heads, from a `chunk_cb`
kernel; the in-kernel product reads as many bytes and compiles to fewer instructions.)
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from mambakit.ops.ssd.triton._common import (
    chunk_tile_max,
    chunk_tiles,
    dot_in_fp32,
    dot_precision,
    full_tiles,
    pow2_at_least,
    tune_bucket,
)
from mambakit.ops.ssd.triton.bwd_chunk import chunk_bwd_dB_kernel, chunk_bwd_dC_kernel, chunk_bwd_dx_kernel
from mambakit.ops.ssd.triton.bwd_seq import sequential_backward
from mambakit.ops.ssd.triton.chunk_state import chunk_state_bwd_kernel
from mambakit.ops.ssd.triton.forward import state_launch
from mambakit.ops.ssd.triton.state_passing import state_passing


def backward_path() -> str:
    """ "chunked" (the default) or, with `MAMBAKIT_SSD_BWD_PATH=sequential`, the sequential backward of
    `bwd_seq.py` (opt-in: more accurate in d A, but about 2x slower on the H200)."""
    path = os.environ.get("MAMBAKIT_SSD_BWD_PATH", "chunked")
    if path not in ("sequential", "chunked"):
        raise ValueError(f"MAMBAKIT_SSD_BWD_PATH must be 'sequential' or 'chunked', got {path!r}")
    return path


def heads_per_program(heads_per_group: int, programs: int) -> int:
    """How many heads of a group one chunk program sums over: all of them when the grid is large
    anyway (fewest partial sums of dB, dC), fewer when the GPU would otherwise idle: halved until
    the grid has `MAMBAKIT_SSD_BWD_PROGRAMS` programs (default 2048: at the anchor the dC kernel took
    1.10, 1.04 and 1.00 ms at 1024, 2048 and 4096, forward+backward 4.24, 4.17 and 4.18 ms, H200)."""
    want = int(os.environ.get("MAMBAKIT_SSD_BWD_PROGRAMS", "2048"))
    hpp = heads_per_group
    while hpp % 2 == 0 and programs * (heads_per_group // hpp) < want and hpp > 1:
        hpp //= 2
    return hpp


def ssd_backward(
    dy: torch.Tensor,
    dfinal: torch.Tensor | None,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    has_initial_state: bool,
    seq_idx: torch.Tensor | None,
    y_pre: torch.Tensor,
    final: torch.Tensor,
    states: torch.Tensor,
    delta: torch.Tensor,
    cs: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_state) of `ssd_forward`'s inputs.

    y_pre is y before the z gate (unused without z). D is None or (nheads, headdim); B, C, z have
    x's dtype. Entries for absent inputs are None.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nchunks = math.ceil(seqlen / chunk_size)
    hpg = nheads // ngroups
    acc = states.dtype
    dev = x.device
    prec = dot_precision(x.dtype)
    f32 = dot_in_fp32(x.dtype)
    seq_strides = (0, 0) if seq_idx is None else seq_idx.stride()

    dz = None
    if z is not None:
        zf, dyf = z.to(acc), dy.to(acc)
        sig = torch.sigmoid(zf)
        dz = (dyf * y_pre.to(acc) * sig * (1 + zf * (1 - sig))).to(z.dtype)
        dy = dyf * zf * sig  # kept in float32: the kernels round tiles to x's dtype only for tl.dot
    dy = dy.contiguous()
    if backward_path() == "sequential":
        dx, ddelta, da, dB, dC, dD, dh0 = sequential_backward(
            dy, dfinal, x, B, C, chunk_size, D, seq_idx, states, delta, cs
        )
        ddt, dA, dbias = dt_chain(ddelta, da, delta, A, dt, dt_bias, dt_softplus, dt_limit)
        return dx, ddt, dA, dB, dC, dD, dz, dbias, (dh0 if has_initial_state else None)

    # 1. gradients of the states: what each chunk's outputs read from its entering state (all chunks
    # in parallel), then the reverse pass over chunks: G[c] (grad of chunk c's own state), d
    # initial_state and the shares of d cs_end
    st = state_launch(x, batch * nchunks * nheads, headdim, dstate, "bwd")
    npn = math.ceil(headdim / st["BLOCK_P"]) * math.ceil(dstate / st["BLOCK_N"])
    G = torch.empty_like(states)
    dh0 = torch.empty_like(final)
    dfinal_c = None if dfinal is None else dfinal.to(acc).contiguous()
    block_q = pow2_at_least(chunk_size)
    chunk_state_bwd_kernel[(npn, batch * nchunks, nheads)](
        dy, C, cs, seq_idx, G,
        seqlen, nheads, headdim, dstate, chunk_size, nchunks, hpg,
        *dy.stride(), *C.stride(), *seq_strides,
        HAS_SEQ=seq_idx is not None,
        BLOCK_Q=block_q, SUB=min(64, block_q), PREC=prec, DOT_F32=f32, **st,
    )  # fmt: skip
    dcs_end = state_passing(G, cs, seq_idx, chunk_size, dfinal_c, dh0, reverse=True, states=states)

    # 2. per-chunk gradients
    block_p = pow2_at_least(headdim)
    block_n = pow2_at_least(dstate)
    hpp = heads_per_program(hpg, math.ceil(chunk_size / 64) * batch * nchunks * ngroups)
    nsplit = hpg // hpp
    dx = torch.empty(x.shape, device=dev, dtype=x.dtype)
    dB_parts = torch.empty(nsplit, batch, seqlen, ngroups, dstate, device=dev, dtype=acc)
    dC_parts = torch.empty_like(dB_parts)
    ddelta = torch.empty_like(delta)
    dcs = torch.empty_like(delta)  # row shares of d cs (dC kernel)
    dcs_col = torch.empty_like(delta)  # column shares, subtracted (dx kernel)
    dcs_st = torch.empty_like(delta)  # the part of those owed to the chunk end (state weights)
    # dD partial sums, laid out by row block: room for the most blocks any tile config uses (16 rows);
    # unused entries stay zero (the tuner re-zeroes it between trial configs). A stub without D.
    dD_shape = (batch, nchunks, math.ceil(chunk_size / 16), nheads, headdim) if D is not None else (1,)
    dD_parts = torch.zeros(dD_shape, device=dev, dtype=acc)

    def grid(meta):
        return (math.ceil(chunk_size / meta["BLOCK_M"]), batch * nchunks, ngroups * nsplit)

    tiles = chunk_tiles(block_q)
    # every tile of every chunk in bounds (the row blocks span the whole chunk, so every chunk full)
    tile = chunk_tile_max(block_q)
    full = seqlen % chunk_size == 0
    full = full and full_tiles(seqlen, chunk_size, tile, headdim, block_p, dstate, block_n)

    def grid_dx(meta):
        return (math.ceil(chunk_size / meta["BLOCK_M"]), batch * nchunks, nheads)

    chunk_bwd_dx_kernel[grid_dx](
        x, B, C, D, seq_idx, delta, cs, G, dy,
        dx, ddelta, dcs_col, dcs_st, dD_parts,
        seqlen, nheads, headdim, dstate, chunk_size, nchunks, hpg, tune_bucket(x),
        *x.stride(), *B.stride(), *C.stride(), *dy.stride(), *dx.stride(), *seq_strides,
        HAS_D=D is not None, HAS_SEQ=seq_idx is not None, FULL=full,
        BLOCK_P=block_p, BLOCK_N=block_n, PREC=prec, DOT_F32=f32, **tiles,
    )  # fmt: skip
    chunk_bwd_dB_kernel[grid](
        x, C, seq_idx, delta, cs, G, dy,
        dB_parts,
        seqlen, nheads, headdim, dstate, chunk_size, nchunks, hpg, hpp, nsplit, tune_bucket(x),
        *x.stride(), *C.stride(), *dy.stride(), *seq_strides,
        HAS_SEQ=seq_idx is not None, FULL=full,
        BLOCK_P=block_p, BLOCK_N=block_n, PREC=prec, DOT_F32=f32, **tiles,
    )  # fmt: skip
    chunk_bwd_dC_kernel[grid](
        x, B, C, seq_idx, delta, cs, states, dy,
        dC_parts, dcs,
        seqlen, nheads, headdim, dstate, chunk_size, nchunks, hpg, hpp, nsplit, tune_bucket(x),
        *x.stride(), *B.stride(), *C.stride(), *dy.stride(), *seq_strides,
        HAS_SEQ=seq_idx is not None, FULL=full,
        BLOCK_P=block_p, BLOCK_N=block_n, PREC=prec, DOT_F32=f32, **tiles,
    )  # fmt: skip
    dB = dB_parts.sum(0).to(B.dtype)
    dC = dC_parts.sum(0).to(C.dtype)
    dD = None if D is None else dD_parts.sum((0, 1, 2)).to(D.dtype)

    # 3. scalars per position: d cs -> d(delta A) by a reverse cumsum inside each chunk
    pad = nchunks * chunk_size - seqlen
    dcs -= dcs_col
    ends = torch.clamp(torch.arange(1, nchunks + 1, device=dev) * chunk_size, max=seqlen) - 1
    st_sums = F.pad(dcs_st, (0, pad)).view(batch, nheads, nchunks, chunk_size).sum(-1)
    dcs[:, :, ends] += dcs_end.sum(-1) + st_sums
    da = F.pad(dcs, (0, pad)).view(batch, nheads, nchunks, chunk_size)
    da = da.flip(-1).cumsum(-1).flip(-1).reshape(batch, nheads, -1)[..., :seqlen]
    ddt, dA, dbias = dt_chain(ddelta, da, delta, A, dt, dt_bias, dt_softplus, dt_limit)
    return dx, ddt, dA, dB, dC, dD, dz, dbias, (dh0 if has_initial_state else None)


def dt_chain(
    ddelta: torch.Tensor,
    da: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(ddt, dA, ddt_bias) from the direct d delta and d a (a = delta * A), both (batch, nheads, seqlen)
    float32: dt -> delta by hand (autograd is off inside a custom op), with the same derivative rules
    as PyTorch's softplus (threshold 20) and clamp (gradient passes on the closed interval)."""
    ddelta = ddelta + da * A.to(da.dtype)[None, :, None]
    dA = (da * delta).sum((0, 2)).to(A.dtype)
    ddelta = ddelta.transpose(1, 2)  # (batch, seqlen, nheads)
    v = dt.to(da.dtype) if dt_bias is None else dt.to(da.dtype) + dt_bias.to(da.dtype)
    u = F.softplus(v) if dt_softplus else v
    if tuple(dt_limit) != (0.0, math.inf):
        ddelta = ddelta * ((u >= dt_limit[0]) & (u <= dt_limit[1]))
    if dt_softplus:
        ddelta = ddelta * torch.where(v > 20.0, 1.0, torch.sigmoid(v))
    ddt = ddelta.to(dt.dtype)
    dbias = None if dt_bias is None else ddelta.sum((0, 1)).to(dt_bias.dtype)
    return ddt, dA, dbias
