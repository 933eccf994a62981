"""The one sequential step of the SSD passes: carrying a state (or its gradient) across chunks.

Given per-chunk terms L[c] (the state a chunk adds by itself, or the gradient its outputs send to the
state it reads), the pass walks the chunks in order (forward) or in reverse (backward):
    forward:  out[c] = s;  s = decay_c * s + L[c]      (s starts at the initial state; final = s)
    backward: out[c] = s;  s = L[c] + decay_c * s      (s starts at d final_state; d initial = s)
with decay_c = exp(cs at chunk c's last position), zero when a document boundary falls inside c (or at
its start). `out` overwrites L in place. The backward also writes each block's share of
decay_c * <out[c], S_c> (the gradient of chunk c's total log-decay through the carried state).

Everything here is elementwise over the (headdim x dstate) state, so each program owns a flat block of
it for one (batch, head) and only streams: the per-chunk terms are computed before, in parallel over
chunks, by tensor-core kernels (`chunk_state`). Splitting the work this way replaced one
program per (batch, head) tile walking all chunks with tensor-core work in between, which left the GPU
latency-bound (256 programs at the benchmark anchor).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl


@triton.jit
def state_passing_kernel(
    buf_ptr, cs_ptr, seq_ptr, init_ptr, last_ptr, states_ptr, share_ptr,
    seqlen, nheads, size, chunk_size, nchunks,
    ss_b, ss_l,
    HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr, HAS_SHARE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    nblocks = tl.num_programs(0)
    ACC = buf_ptr.dtype.element_ty
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    bh = b * nheads + h
    if HAS_INIT:
        s = tl.load(init_ptr + bh * size + offs, mask=mask, other=0.0).to(ACC)
    else:
        s = tl.zeros((BLOCK,), dtype=ACC)
    first = 0
    if REVERSE:
        first = nchunks - 1
    # the next chunk's term is loaded one step ahead, so that its latency overlaps this step's store
    nxt = tl.load(buf_ptr + ((b * nchunks + first) * nheads + h) * size + offs, mask=mask, other=0.0)
    for i in range(nchunks):
        c = i
        if REVERSE:
            c = nchunks - 1 - i
        c_next = tl.minimum(c + 1, nchunks - 1)  # clamped: the last step's load is masked off anyway
        if REVERSE:
            c_next = tl.maximum(c - 1, 0)
        term = nxt
        nxt = tl.load(
            buf_ptr + ((b * nchunks + c_next) * nheads + h) * size + offs,
            mask=mask & (offs * 0 + i + 1 < nchunks),
            other=0.0,
        )
        start = c * chunk_size
        last = tl.minimum(start + chunk_size, seqlen) - 1
        decay = tl.exp(tl.load(cs_ptr + bh * seqlen + last))
        if HAS_SEQ:
            seq_end = tl.load(seq_ptr + b * ss_b + last * ss_l)
            seq_prev = tl.load(seq_ptr + b * ss_b + tl.maximum(start - 1, 0) * ss_l)
            decay = tl.where(seq_end == seq_prev, decay, 0.0)
        off = ((b * nchunks + c) * nheads + h) * size + offs
        tl.store(buf_ptr + off, s, mask=mask)
        if HAS_SHARE:
            S_c = tl.load(states_ptr + off, mask=mask, other=0.0)
            tl.store(share_ptr + (bh * nchunks + c) * nblocks + pid, decay * tl.sum(s * S_c, axis=0))
        s = decay * s + term
    tl.store(last_ptr + bh * size + offs, s, mask=mask)


def passing_blocks(batch: int, nheads: int, size: int) -> int:
    """Elements of the state per program: 1024 where that still gives >= 2048 programs, else fewer
    (down to 128), so that few (batch, head) pairs (one long sequence) still fill the GPU.
    `MAMBAKIT_SSD_PASSING_BLOCK` fixes it (a power of two >= 128; tile sweeps)."""
    env = os.environ.get("MAMBAKIT_SSD_PASSING_BLOCK")
    if env:
        return int(env)
    block = 1024
    while block > 128 and batch * nheads * math.ceil(size / block) < 2048:
        block //= 2
    return block


def state_passing(
    buf: torch.Tensor,
    cs: torch.Tensor,
    seq_idx: torch.Tensor | None,
    chunk_size: int,
    init: torch.Tensor | None,
    last: torch.Tensor,
    reverse: bool = False,
    states: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Run the pass in place over `buf` (batch, nchunks, nheads, headdim, dstate), contiguous.

    cs: (batch, nheads, seqlen) in-chunk cumulative log-decays; init / last: (batch, nheads, headdim,
    dstate) start value (None = zeros) and where the value after the last step goes. With `states`
    (the forward's entering states, backward only) returns the shares of d cs_end,
    (batch, nheads, nchunks, blocks), to be summed over the last axis; else None.
    """
    batch, nchunks, nheads, headdim, dstate = buf.shape
    size = headdim * dstate
    block = passing_blocks(batch, nheads, size)
    nblocks = math.ceil(size / block)
    seqlen = cs.shape[-1]
    share = None
    if states is not None:
        share = torch.empty(batch, nheads, nchunks, nblocks, device=buf.device, dtype=buf.dtype)
    seq_strides = (0, 0) if seq_idx is None else seq_idx.stride()
    state_passing_kernel[(nblocks, batch, nheads)](
        buf, cs, seq_idx, init, last, states, share,
        seqlen, nheads, size, chunk_size, nchunks, *seq_strides,
        HAS_INIT=init is not None, HAS_SEQ=seq_idx is not None, REVERSE=reverse, HAS_SHARE=share is not None,
        BLOCK=block, num_warps=max(1, min(8, block // 256)),
    )  # fmt: skip
    return share
