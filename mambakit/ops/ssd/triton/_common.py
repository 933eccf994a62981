"""Pieces shared by the SSD Triton kernels: dt processing inside a kernel and block-size rules."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def process_dt(dt, bias, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, dt_min, dt_max):
    """delta = clamp(softplus?(dt + bias), dt_min, dt_max), elementwise, in dt's (float) dtype.

    Mirrors `reference.process_dt`: the clamp is applied only when a limit other than (0, inf) was
    given, so that without softplus a negative dt stays negative exactly as in the reference.
    """
    dt = dt + bias
    if SOFTPLUS:
        # softplus(v) = max(v, 0) + log(1 + exp(-|v|)); the split form never overflows exp.
        dt = tl.maximum(dt, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(dt)))
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    return dt


def pow2_at_least(n: int, low: int = 16) -> int:
    """The block size covering n: a power of two, at least `low` (tl.dot needs 16 on every axis)."""
    return max(low, triton.next_power_of_2(n))


def dot_precision(dtype) -> str:
    """fp32 inputs use exact ("ieee") products so that results match the reference to ~1e-5;
    bf16/fp16 operands go to tensor cores regardless of this flag."""
    return "ieee"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """True where tl.dot must not see bf16 operands: Triton's CPU interpreter multiplies bf16 tiles as
    their raw uint16 bits (wrong results), so under TRITON_INTERPRET=1 bf16 tiles are upcast to fp32
    (exactly representable) before the product. Never true on a GPU."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
