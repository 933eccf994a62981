"""Elementwise math shared by the Triton kernels of the scans."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def exp_ftz(x):
    """e**x as 2**(x log2 e) with `tl.exp2`, which on NVIDIA GPUs compiles to one MUFU.EX2 flushing
    subnormal results to zero. `tl.exp` compiles to the non-flushing ex2.approx.f32, which ptxas wraps
    in a range check and two predicated multiplies: 5 instructions an element instead of 2. The scan
    kernels are issue-bound and their decays are most of their elementwise work: with this (and cs in
    base 2 for the SSD output pass's decay matrix) a 64-row step of the SSD output pass went from 1,255
    to 1,080 SASS instructions and a `chunk_bwd_dx` tile from 1,070 to 868 (Triton 3.6, sm_90,
    `benchmarks/sass_count.py --kernels ssd`). A decay below 2**-126 contributes nothing in float32 next
    to the terms it is added to. float64 keeps the exact `tl.exp`."""
    if x.dtype == tl.float64:
        return tl.exp(x)
    else:
        return tl.exp2(x * LOG2E)
