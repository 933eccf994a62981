"""Tile loads and stores shared by the Triton kernels: masked, or unmasked where a constexpr says every
element is in bounds (the SSD kernels' full tiles, the Mamba-1 step loop's full channel blocks)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_tile(ptrs, mask, FULL: tl.constexpr):
    """`tl.load(ptrs, mask, other=0)`, or unmasked where FULL says every element is in bounds: the
    masks of the SSD output pass's 64-row step were ~95 of its ~1,080 SASS instructions (sm_90), and
    in the Mamba-1 step loop they kept B_t and C_t from loading as 16-byte vectors."""
    if FULL:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def store_tile(ptrs, value, mask, FULL: tl.constexpr):
    """`tl.store(ptrs, value, mask)`, unmasked where FULL (see `load_tile`)."""
    if FULL:
        tl.store(ptrs, value)
    else:
        tl.store(ptrs, value, mask=mask)
