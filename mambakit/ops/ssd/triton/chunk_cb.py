"""C B^T inside each chunk, once per (batch, chunk, group): the (chunk x chunk) matrix that every head
of the group multiplies by its own decays.

When several heads share a group (Mamba-2 commonly has one group for 64 heads), reading this matrix
is cheaper than each head recomputing it from B: a (64 x 64) block is 16 KB in fp32, while B's
(64 x dstate) rows are 16 KB at dstate 128 and cost a tensor-core product on top. The backward's dx
kernel reads it; the upper blocks are computed too (cheap) and masked by the reader. The forward
does not use it: its output pass forms only the diagonal blocks, from the B rows it reads anyway.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mambakit.ops.ssd.triton._common import dot_in_fp32, dot_precision, pow2_at_least


@triton.jit
def chunk_cb_kernel(
    B_ptr, C_ptr, cb_ptr,
    seqlen, dstate, chunk_size, nchunks,
    sB_b, sB_l, sB_g, sB_n,
    sC_b, sC_l, sC_g, sC_n,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    nkb = tl.cdiv(chunk_size, BLOCK_K)
    m = tl.program_id(0) // nkb
    k = tl.program_id(0) % nkb
    b = tl.program_id(1) // nchunks
    c = tl.program_id(1) % nchunks
    g = tl.program_id(2)
    ngroups = tl.num_programs(2)
    XDT = C_ptr.dtype.element_ty  # tensor-core operand dtype
    DOT = XDT
    if DOT_F32:  # see _common.dot_in_fp32: operands still rounded to XDT first, as on a GPU
        DOT = tl.float32
    start = c * chunk_size
    chunk_len = tl.minimum(chunk_size, seqlen - start)
    r = m * BLOCK_M + tl.arange(0, BLOCK_M)
    s = k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    rmask = r < chunk_len
    smask = s < chunk_len
    nmask = offs_n < dstate
    Cr = (
        tl.load(
            C_ptr + b * sC_b + (start + r)[:, None] * sC_l + g * sC_g + offs_n[None, :] * sC_n,
            mask=rmask[:, None] & nmask[None, :],
            other=0.0,
        )
        .to(XDT)
        .to(DOT)
    )
    Bs = (
        tl.load(
            B_ptr + b * sB_b + (start + s)[:, None] * sB_l + g * sB_g + offs_n[None, :] * sB_n,
            mask=smask[:, None] & nmask[None, :],
            other=0.0,
        )
        .to(XDT)
        .to(DOT)
    )
    cb = tl.dot(Cr, tl.trans(Bs), input_precision=PREC)
    # (batch, nchunks, ngroups, chunk_size, chunk_size), contiguous
    base = ((b * nchunks + c) * ngroups + g) * chunk_size * chunk_size
    tl.store(
        cb_ptr + base + r[:, None] * chunk_size + s[None, :],
        cb.to(cb_ptr.dtype.element_ty),
        mask=(r < chunk_size)[:, None] & (s < chunk_size)[None, :],
    )


def use_cb(nheads: int, ngroups: int) -> bool:
    """Share C B^T through memory when at least two heads read it; otherwise recompute it in place."""
    return nheads // ngroups >= 2


def chunk_cb(B: torch.Tensor, C: torch.Tensor, chunk_size: int, x_dtype: torch.dtype) -> torch.Tensor:
    """(batch, nchunks, ngroups, chunk_size, chunk_size) with [.., t, s] = C_t . B_s inside each chunk
    (rows and columns past the sequence's end hold zeros), in float32 (float64 for float64 x).

    The backward needs float32 products: its d cs is a difference of row and column sums that cancel
    largely, and only products rounded the same way on both sides (fp32 tl.dot results) cancel cleanly.
    """
    batch, seqlen, ngroups, dstate = B.shape
    nchunks = math.ceil(seqlen / chunk_size)
    dtype = torch.float64 if x_dtype == torch.float64 else torch.float32
    cb = torch.empty(batch, nchunks, ngroups, chunk_size, chunk_size, device=B.device, dtype=dtype)
    # fp32/fp64 operands multiply on CUDA cores: smaller blocks, more warps (no register spills on sm_90)
    wide = B.element_size() <= 2
    block = min(64 if wide else 32, pow2_at_least(chunk_size))
    grid = (math.ceil(chunk_size / block) ** 2, batch * nchunks, ngroups)
    chunk_cb_kernel[grid](
        B, C, cb, seqlen, dstate, chunk_size, nchunks, *B.stride(), *C.stride(),
        BLOCK_M=block, BLOCK_K=block, BLOCK_N=pow2_at_least(dstate),
        PREC=dot_precision(x_dtype), DOT_F32=dot_in_fp32(x_dtype), num_warps=4 if wide else 8,
    )  # fmt: skip
    return cb
