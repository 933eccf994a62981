"""RMSNorm, gated RMSNorm (grouped) and fused residual-add + RMSNorm: the public entries.

Backends: `reference.py`, `torch.py`, `triton/`; each defines `rms_norm_impl`, `gated_rms_norm_impl`
and `add_rms_norm_impl` with the arguments below (minus `backend`), already checked.
All compute in float32 and return the input's dtype.
"""

from __future__ import annotations

import torch

from mambakit.ops._backend import BackendModules, resolve_backend
from mambakit.ops._checks import check_any_rank, check_divides, check_optional, check_tensor

_impl = BackendModules(__package__)
_IMPLEMENTED = _impl.implemented


def _check_eps(eps: float) -> None:
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive float, got {eps!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, backend: str = "auto") -> torch.Tensor:
    """y = x / sqrt(mean(x^2, -1) + eps) * weight.  x (..., dim); weight (dim,)."""
    check_any_rank("x", x)
    check_tensor("weight", weight, (x.shape[-1],), device=x.device)
    _check_eps(eps)
    name = resolve_backend(backend, x.device, _IMPLEMENTED)
    return _impl(name).rms_norm_impl(x, weight, eps)


def gated_rms_norm(
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Gated RMSNorm of Mamba-2, normalized over groups of `group_size` channels (None: all of dim).

    x, z (..., dim); weight (dim,). norm_before_gate=False (Mamba-2's default):
    y = rmsnorm_groups(x * silu(z)) * weight; True: y = rmsnorm_groups(x) * weight * silu(z).
    """
    check_any_rank("x", x)
    dim = x.shape[-1]
    check_tensor("z", z, tuple(x.shape), device=x.device)
    check_tensor("weight", weight, (dim,), device=x.device)
    _check_eps(eps)
    if group_size is not None:
        check_divides("group_size", group_size, "dim", dim)
    name = resolve_backend(backend, x.device, _IMPLEMENTED)
    return _impl(name).gated_rms_norm_impl(x, z, weight, eps, group_size or dim, norm_before_gate)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float = 1e-5,
    residual_in_fp32: bool = False,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused pre-norm residual step: residual = x + residual (x alone if residual is None);
    returns (rms_norm(residual) * weight in x's dtype, residual), the residual in float32 if
    residual_in_fp32 else in x's dtype. x, residual (..., dim); weight (dim,).
    """
    check_any_rank("x", x)
    check_optional("residual", residual, tuple(x.shape), device=x.device)
    check_tensor("weight", weight, (x.shape[-1],), device=x.device)
    _check_eps(eps)
    name = resolve_backend(backend, x.device, _IMPLEMENTED)
    return _impl(name).add_rms_norm_impl(x, residual, weight, eps, residual_in_fp32)


__all__ = ["rms_norm", "gated_rms_norm", "add_rms_norm"]
