"""Norm + linear for decoding steps: the public entries.

A decoding step at batch 1 is bound by kernel launches, not bytes: the norm before a projection is a
kernel of its own, and cuBLAS's GEMV for (1, K) x (K, N) reads its weight at a fraction of the
bandwidth. These entries compute `F.linear(norm(x), weight, bias)` in one call; on CUDA the Triton
backend recomputes the norm of the (few) input rows in every program of one GEMV kernel.
Backends: `reference.py`, `torch.py`, `triton/`.
"""

from __future__ import annotations

import importlib

import torch

from mambakit.ops._backend import resolve_backend
from mambakit.ops._checks import check_any_rank, check_divides, check_optional, check_tensor

_IMPLEMENTED = ("reference", "torch", "triton")
_MODULES = {"reference": ".reference", "torch": ".torch", "triton": ".triton"}


_LOADED: dict = {}


def _impl(backend: str):
    # Backends load on first use (Triton's import is slow and needs a GPU build to be useful).
    if backend not in _LOADED:
        _LOADED[backend] = importlib.import_module(_MODULES[backend], __package__)
    return _LOADED[backend]


def _check_linear(x: torch.Tensor, norm_weight, weight, bias, eps) -> None:
    in_features = x.shape[-1]
    check_tensor("norm_weight", norm_weight, (in_features,), device=x.device)
    check_tensor("weight", weight, (None, in_features), device=x.device)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype} (as F.linear needs), got {weight.dtype}")
    check_optional("bias", bias, (weight.shape[0],), device=x.device)
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive float, got {eps!r}")


def add_rms_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual_in_fp32: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ops.add_rms_norm` followed by `F.linear`, as a pre-norm block's first projection.

    x, residual: (..., in_features) (residual None in the first block); norm_weight (in_features,);
    weight (out_features, in_features) in x's dtype; bias (out_features,).
    residual = x + residual (x alone if None), in float32 if residual_in_fp32 else x's dtype;
    returns (linear(rms_norm(residual) * norm_weight) (..., out_features), residual). The normed
    activations are rounded to x's dtype before the product, as the unfused layers do.
    """
    check_any_rank("x", x)
    check_optional("residual", residual, tuple(x.shape), device=x.device)
    _check_linear(x, norm_weight, weight, bias, eps)
    name = resolve_backend(backend, x.device, _IMPLEMENTED)
    return _impl(name).add_rms_norm_linear_impl(x, residual, norm_weight, weight, bias, eps, residual_in_fp32)


def gated_rms_norm_linear(
    x: torch.Tensor,
    z: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """`ops.gated_rms_norm` followed by `F.linear`, as Mamba-2's out-projection.

    x, z: (..., in_features); norm_weight (in_features,); weight (out_features, in_features) in x's
    dtype; bias (out_features,); group_size divides in_features (None: one group). Returns
    (..., out_features): linear(gated_rms_norm(x, z, norm_weight, eps, group_size, norm_before_gate)).
    """
    check_any_rank("x", x)
    check_tensor("z", z, tuple(x.shape), device=x.device)
    _check_linear(x, norm_weight, weight, bias, eps)
    if group_size is not None:
        check_divides("group_size", group_size, "in_features", x.shape[-1])
    name = resolve_backend(backend, x.device, _IMPLEMENTED)
    return _impl(name).gated_rms_norm_linear_impl(
        x, z, norm_weight, weight, bias, eps, group_size or x.shape[-1], norm_before_gate
    )


__all__ = ["add_rms_norm_linear", "gated_rms_norm_linear"]
