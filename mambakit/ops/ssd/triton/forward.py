"""Launches the SSD forward, on one of two paths:
  chunked:    `chunk_cumsum` (delta and cs), `chunk_state_fwd` (each chunk's own state, all chunks in
              parallel), `state_passing` (those become the states entering each chunk) and
              `chunk_scan` (outputs, one program per (batch, chunk, head));
  sequential: `chunk_cumsum`, then `chunk_scan` with one program per (batch, head) walking the chunks
              in order and carrying the state (it writes the chunk states and the final state).
`sequential_forward` picks one: the sequential path when its programs fill the GPU.

At the benchmark anchor (batch 4, nheads 64, headdim 64, ngroups 1, dstate 128, chunk 256, bf16
x/B/C, fp32 dt) and seqlen L = 8192:
  FLOPs (one multiply-add = 2), per 64-row step of the output pass: the state term C R^T, the
  diagonal block's C B^T and scores x values, and the state update x^T B: ~3.7 MFLOP, 128 steps per
  (batch, head) -> ~120 GFLOP; the chunked path's `chunk_state` adds 34 G. ~0.12 ms at the H100's
  ~990 bf16 TFLOP/s.
  Bytes: x 268 MB read (twice on the chunked path), y 268 MB written, B and C 17 MB (read per head,
  mostly from L2), dt, delta and cs 25 MB, the fp32 states entering each chunk 268 MB written (the
  chunked path also writes each chunk's own state and rewrites it in place). The unavoidable part
  (x, y, B, C, dt) is 0.55 GB, a floor of ~0.13 ms.
  Bars: <= 0.5 ms forward and <= 2.5 ms forward+backward at L = 8192 (official Triton kernels: 1.29 ms
  and 5.79 ms). Measured on the H200 (2026-12-01, docs/benchmarks.md): 0.56 ms on the sequential
  path without grad (0.65 when it writes the chunk states; 1.03 on the chunked path), almost all of it
  `chunk_scan`: 256 programs of 128 dependent steps, ~4.4 us a step, bound by instruction issue
  (Nsight Compute: ~1,270 warp instructions a step, 2 programs per SM for want of registers) rather
  than by FLOPs or bytes. Since then the flushing exp2 and unmasked full tiles took a step to 954
  instructions (counted offline, `benchmarks/sass_count.py --kernels ssd`; not yet timed).
"""

from __future__ import annotations

import math
import os

import torch

from mambakit.ops._launch import sm_count
from mambakit.ops.ssd.triton._common import (
    dot_in_fp32,
    dot_precision,
    full_tiles,
    pow2_at_least,
    tune_bucket,
)
from mambakit.ops.ssd.triton.chunk_scan import SCAN_CONFIGS, scan_launch
from mambakit.ops.ssd.triton.chunk_state import chunk_cumsum_kernel, chunk_state_fwd_kernel
from mambakit.ops.ssd.triton.state_passing import state_passing


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# From the H200 crossover at seqlen 8192 (`benchmarks/gpu_ssd_paths.py`, 2026-12-01): the sequential
# forward was faster from 0.48 programs per multiprocessor up (0.64 -> 0.48 ms), slower at 0.24.
SEQUENTIAL_MIN_PER_SM = 0.4


def state_launch(x: torch.Tensor, programs: int, headdim: int, dstate: int, which: str = "fwd") -> dict:
    """Tiles and warps of the per-chunk state programs (`chunk_state`); `programs` is
    how many (batch, chunk, head) triples they cover.

    They walk a chunk SUB = 64 rows at a time, so operand tiles stay small and a (64 x dstate) state
    tile fits one program (each x or dy tile is then read once), unless the grid (programs * tiles)
    would leave most of the GPU idle (a short sequence with few heads): then smaller tiles.
    fp32/fp64 exact products run on CUDA cores, which need more registers: (32 x 32) tiles, no
    software pipelining. Register and shared-memory use checked by compiling for sm_90 (no spills).
    `MAMBAKIT_SSD_STATE_FWD_CONFIG` / `MAMBAKIT_SSD_STATE_BWD_CONFIG` ("BLOCK_P,BLOCK_N,num_warps,
    num_stages") fix the launch of the forward / backward state program (tile sweeps, debugging).
    """
    env = os.environ.get(f"MAMBAKIT_SSD_STATE_{which.upper()}_CONFIG")
    if env:
        bp, bn, warps, stages = (int(v) for v in env.split(","))
        return {"BLOCK_P": bp, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
    wide = x.element_size() <= 2
    bp = min(64 if wide else 32, pow2_at_least(headdim))
    bn = min(128 if wide else 32, pow2_at_least(dstate))
    while programs * math.ceil(headdim / bp) * math.ceil(dstate / bn) < 512 and max(bp, bn) > 16:
        if bn >= bp:
            bn //= 2
        else:
            bp //= 2
    # Two pipeline stages for 16-bit inputs: Triton 3.6 on the H100 gave the default three 233,472 bytes
    # of shared memory at (64 x 128) tiles, over the 232,448-byte limit (2026-11-23).
    return {"BLOCK_P": bp, "BLOCK_N": bn, "num_warps": 4, "num_stages": 2 if wide else 1}


def sequential_forward(programs: int, device: torch.device) -> bool:
    """Whether the output pass walks all chunks itself (`chunk_scan`'s sequential path): when its
    (batch, head, headdim block) programs fill the GPU, at least `SEQUENTIAL_MIN_PER_SM` per
    multiprocessor. `MAMBAKIT_SSD_FWD_PATH` = "sequential" or "chunked" forces a path (benchmarks,
    tests: on a CPU, under Triton's interpreter, the chunked path is the default)."""
    forced = os.environ.get("MAMBAKIT_SSD_FWD_PATH")
    if forced:
        if forced not in ("sequential", "chunked"):
            raise ValueError(f"MAMBAKIT_SSD_FWD_PATH must be 'sequential' or 'chunked', got {forced!r}")
        return forced == "sequential"
    if device.type != "cuda":
        return False
    return programs >= SEQUENTIAL_MIN_PER_SM * sm_count(device)


def ssd_forward(
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
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    keep_states: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunked forward. B, C, z must already have x's dtype; D is None or (nheads, headdim).
    keep_states=False (no backward will follow) lets the sequential path skip writing the chunk states
    (268 MB of float32 at the benchmark anchor, L = 8192); the states returned are then empty.

    Returns y (batch, seqlen, nheads, headdim) in x's dtype; y before the z gate (None without z);
    the final state (batch, nheads, headdim, dstate); the states entering each chunk
    (batch, nchunks, nheads, headdim, dstate); delta and the in-chunk cumsum of delta * A, both
    (batch, nheads, seqlen). States, delta and cs are float32 (float64 for float64 x).
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nchunks = math.ceil(seqlen / chunk_size)
    acc = acc_dtype(x)
    dev = x.device
    delta = torch.empty(batch, nheads, seqlen, device=dev, dtype=acc)
    cs = torch.empty_like(delta)
    final = torch.empty(batch, nheads, headdim, dstate, device=dev, dtype=acc)
    h0 = None if initial_state is None else initial_state.to(acc).contiguous()
    seq_strides = (0, 0) if seq_idx is None else seq_idx.stride()
    block_q = pow2_at_least(chunk_size)
    prec = dot_precision(x.dtype)
    f32 = dot_in_fp32(x.dtype)
    has_limit = tuple(dt_limit) != (0.0, math.inf)

    block_h = min(16, pow2_at_least(nheads, low=1))
    chunk_cumsum_kernel[(batch * nchunks, math.ceil(nheads / block_h))](
        dt, A, dt_bias, delta, cs,
        seqlen, nheads, chunk_size, nchunks, float(dt_limit[0]), float(min(dt_limit[1], 3.0e38)),
        *dt.stride(),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=has_limit,
        BLOCK_Q=block_q, BLOCK_H=block_h,
    )  # fmt: skip
    z_strides = (0, 0, 0, 0) if z is None else z.stride()
    scan_kernel, scan_args = scan_launch()
    block_p = scan_args.pop("BLOCK_P", min(64, pow2_at_least(headdim)))
    block_n = pow2_at_least(dstate)
    # the tuned configs step at most 64 rows, and 64 is a multiple of each of their steps
    sub = scan_args.get("SUB", max(q for q, _, _ in SCAN_CONFIGS))
    full = full_tiles(seqlen, chunk_size, sub, headdim, block_p, dstate, block_n)
    columns = nheads * math.ceil(headdim / block_p)
    sequential = sequential_forward(batch * columns, x.device)
    store_states = keep_states or not sequential  # the chunked path computes them in any case
    states_shape = (batch, nchunks, nheads, headdim, dstate) if store_states else (0,)
    states = torch.empty(states_shape, device=dev, dtype=acc)
    if not sequential:
        st = state_launch(x, batch * nchunks * nheads, headdim, dstate)
        grid = (
            math.ceil(headdim / st["BLOCK_P"]) * math.ceil(dstate / st["BLOCK_N"]),
            batch * nchunks,
            nheads,
        )
        chunk_state_fwd_kernel[grid](
            x, B, cs, delta, seq_idx, states,
            seqlen, nheads, headdim, dstate, chunk_size, nchunks, nheads // ngroups,
            *x.stride(), *B.stride(), *seq_strides,
            HAS_SEQ=seq_idx is not None,
            BLOCK_Q=block_q, SUB=min(64, block_q), PREC=prec, DOT_F32=f32, **st,
        )  # fmt: skip
        # each chunk's own state becomes, in place, the state entering it
        state_passing(states, cs, seq_idx, chunk_size, h0, final)

    y = torch.empty_like(x)
    y_pre = torch.empty_like(x) if z is not None else None
    scan_kernel[(columns, batch if sequential else batch * nchunks)](
        x, B, C, z, D, seq_idx, delta, cs, states, h0, final,
        y, y_pre,
        seqlen, nheads, headdim, dstate, chunk_size, nchunks, nheads // ngroups, tune_bucket(x),
        *x.stride(), *B.stride(), *C.stride(), *z_strides, *y.stride(), *seq_strides,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_SEQ=seq_idx is not None, HAS_INIT=h0 is not None,
        SEQUENTIAL=sequential, STORE_STATES=store_states, FULL=full,
        BLOCK_P=block_p, BLOCK_N=block_n, PREC=prec, DOT_F32=f32, **scan_args,
    )  # fmt: skip
    return y, y_pre, final, states, delta, cs
