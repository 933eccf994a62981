"""Launcher of the norm + linear kernel, its custom op, and the backend's entry points.

The kernel serves decoding: at most MAX_ROWS input rows, no autograd, 16/32-bit floats. Anything else
(a prefill, a training step, float64) runs the unfused composition: the Triton norm kernel, then
cuBLAS. That choice is about speed; both compute the same math.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton

from mambakit.ops.norm.reference import residual_dtype
from mambakit.ops.norm_linear.triton.kernels import norm_linear_kernel
from mambakit.ops.ssd.triton._common import dot_in_fp32, dot_precision

MAX_ROWS = 16  # tl.dot takes 16 rows at least; past this cuBLAS's GEMM is the better kernel
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _config(n: int, k: int, group: int) -> tuple[int, int, int, int] | None:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages), or None when no K tile fits inside a norm group.

    BLOCK_N 16 gives N / 16 programs (192 for a 130M in_proj), enough to keep every SM streaming its
    weight tiles; MAMBAKIT_NORM_LINEAR_CONFIG="BN,BK,warps,stages" pins one for probing.
    """
    pinned = os.environ.get("MAMBAKIT_NORM_LINEAR_CONFIG")
    if pinned:
        block_n, block_k, warps, stages = (int(v) for v in pinned.split(","))
    else:
        block_n, block_k, warps, stages = 16, (64 if _interpreting() else 256), 4, 3
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    if group != k:  # grouped norm: a K tile must not straddle two groups
        while block_k > 16 and group % block_k:
            block_k //= 2
        if group % block_k:
            return None
    return block_n, block_k, warps, stages


def _norm_linear(
    x: torch.Tensor,
    z: torch.Tensor | None,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    group: int,
    norm_before_gate: bool,
    store_residual: bool,
    residual_in_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, z, residual (M, K) with unit last stride; weight (N, K). Returns out (M, N) in x's dtype and
    the residual sum (M, K) (empty (0,) unless store_residual)."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if store_residual:
        res_out = torch.empty(m, k, dtype=residual_dtype(x.dtype, residual_in_fp32), device=x.device)
    else:
        res_out = torch.empty(0, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = _config(n, k, group)
    ng = triton.next_power_of_2(k // group)
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    norm_linear_kernel[(triton.cdiv(n, block_n),)](
        x, z if z is not None else x, residual if residual is not None else x, norm_weight, w,
        bias if bias is not None else norm_weight, out, res_out if store_residual else out,
        m, n, k, eps,
        x.stride(0), z.stride(0) if z is not None else 0, residual.stride(0) if residual is not None else 0,
        w.stride(0), out.stride(0), res_out.stride(0) if store_residual else 0,
        G=group, NG=ng, HAS_Z=z is not None, NORM_BEFORE_GATE=bool(norm_before_gate),
        HAS_RES=residual is not None, STORE_RES=bool(store_residual), HAS_BIAS=bias is not None,
        PRECISION=dot_precision(weight.dtype), DOT_FP32=dot_in_fp32(weight.dtype),
        BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, res_out


# Traceable by torch.compile and capturable in CUDA graphs as one opaque node.
_norm_linear_op = torch.library.custom_op("mambakit::norm_linear", mutates_args=())(_norm_linear)


@_norm_linear_op.register_fake
def _(
    x, z, residual, norm_weight, weight, bias, eps, group, norm_before_gate, store_residual, residual_in_fp32
):  # noqa: E501
    out = x.new_empty(x.shape[0], weight.shape[0])
    if store_residual:
        return out, x.new_empty(x.shape, dtype=residual_dtype(x.dtype, residual_in_fp32))
    return out, x.new_empty(0)


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _use_kernel(x: torch.Tensor, n: int, group: int, *tensors: torch.Tensor | None) -> bool:
    rows = x.numel() // max(x.shape[-1], 1)
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors))
    return (
        0 < rows <= MAX_ROWS
        and x.shape[-1] > 0
        and x.dtype in _KERNEL_DTYPES
        and not recording
        and _config(n, x.shape[-1], group) is not None
    )


def _unfused_norm():
    """The norms for the cases the kernel leaves out: Triton's on CUDA, PyTorch's under the interpreter."""
    if _interpreting():
        from mambakit.ops.norm import torch as norm
    else:
        from mambakit.ops.norm import triton as norm
    return norm


def add_rms_norm_linear_impl(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual_in_fp32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See `mambakit.ops.add_rms_norm_linear`."""
    k = x.shape[-1]
    if not _use_kernel(x, weight.shape[0], k, residual, norm_weight, weight, bias):
        normed, res = _unfused_norm().add_rms_norm_impl(x, residual, norm_weight, eps, residual_in_fp32)
        return F.linear(normed, weight, bias), res
    out, res = _norm_linear_op(
        _rows(x), None, _rows(residual), norm_weight, weight, bias, float(eps), k, False, True,
        bool(residual_in_fp32),
    )  # fmt: skip
    return out.view(*x.shape[:-1], weight.shape[0]), res.view(x.shape)


def gated_rms_norm_linear_impl(
    x: torch.Tensor,
    z: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> torch.Tensor:
    """See `mambakit.ops.gated_rms_norm_linear`."""
    if not _use_kernel(x, weight.shape[0], group_size, z, norm_weight, weight, bias):
        normed = _unfused_norm().gated_rms_norm_impl(x, z, norm_weight, eps, group_size, norm_before_gate)
        return F.linear(normed, weight, bias)
    out, _ = _norm_linear_op(
        _rows(x), _rows(z), None, norm_weight, weight, bias, float(eps), group_size, bool(norm_before_gate),
        False, False,
    )  # fmt: skip
    return out.view(*x.shape[:-1], weight.shape[0])
