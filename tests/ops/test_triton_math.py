"""`ops/_triton_math.py`'s `exp_ftz` (and `tl.exp2`, which the SSD output pass calls on base-2 decays)
against torch: to float32 rounding, results below 2**-126 either flushed to zero or kept (the GPU
flushes, the interpreter does not), float64 exact, -inf to 0 (the masked entries of the decay
matrices)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from mambakit.ops._triton_math import exp_ftz

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _exp_kernel(x_ptr, e_ptr, e2_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(e_ptr + offs, exp_ftz(x), mask=mask)
    tl.store(e2_ptr + offs, tl.exp2(x), mask=mask)  # as the SSD output pass calls it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exponentials_match_torch(dtype):
    gen = torch.Generator().manual_seed(0)
    edges = [0.0, -0.0, 1e-30, -87.0, -88.5, -100.0, -130.0, 80.0, float("-inf")]
    x = torch.cat([torch.randn(300, generator=gen, dtype=torch.float64) * 30, torch.tensor(edges).double()])
    x = x.to(dtype)
    x = x.to(DEV)
    e, e2 = torch.empty_like(x), torch.empty_like(x)
    _exp_kernel[(triton.cdiv(x.numel(), 128),)](x, e, e2, x.numel(), BLOCK=128)
    # float32: e**x is 2**(x log2 e), and rounding x log2 e costs |x| units in the last place of the
    # result (as in tl.exp itself); 2**x is a few units off
    eps = 1e-14 if dtype == torch.float64 else 2.0**-23
    tiny = torch.finfo(torch.float32).tiny  # 2**-126: below it the GPU path may return 0
    xd = x.double()
    for got, want, bound in ((e, torch.exp(xd), 4 + 1.5 * xd.abs()), (e2, torch.exp2(xd), 4 + 0 * xd)):
        assert not torch.isnan(got).any()
        normal = want.abs() >= tiny
        rel = ((got.double() - want).abs() / want.abs())[normal]
        assert (rel <= eps * bound[normal]).all(), f"worst relative error {rel.max().item():.3g}"
        assert (got[~normal].abs() <= tiny).all()
        assert (got[x == float("-inf")] == 0).all()
