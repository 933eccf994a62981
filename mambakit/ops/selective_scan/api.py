"""Mamba-1 selective scan (S6): the one public entry and its one-token step.

Backends live beside this file: `reference.py` (sequential recurrence, the definition), `torch.py`
(chunked, vectorized PyTorch) and `triton/` (fused GPU kernels). Each defines `selective_scan_impl`
and `selective_state_update_impl` with the arguments below (minus `backend`), already checked.
"""

from __future__ import annotations

import torch

from mambakit.ops._backend import BackendModules, resolve_backend
from mambakit.ops._checks import FLOAT_DTYPES, check_divides, check_optional, check_seq_idx, check_tensor

_impl = BackendModules(__package__)
_IMPLEMENTED = _impl.implemented


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan of Mamba-1 (S6) with zero-order-hold discretization.

    Shapes:
        x, dt, z: (batch, seqlen, dim)
        A: (dim, dstate), float32 (negative for a stable scan; the layer stores -exp(A_log))
        B, C: (batch, seqlen, ngroups, dstate); channel d uses group d // (dim // ngroups)
        D, dt_bias: (dim,)
        initial_state, final state: (batch, dim, dstate), float32
        seq_idx: (batch, seqlen) int, non-decreasing document ids of packed sequences

    Math, per channel d and state n, in float32:
        delta_t = softplus(dt_t + dt_bias) if dt_softplus else dt_t + dt_bias
        h_t = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * x_t
        y_t = sum_n C_t[n] * h_t[n] + D[d] * x_t ;  y_t *= silu(z_t) if z is given
    h_{-1} = initial_state (zeros if None). Where seq_idx changes between t-1 and t, h_{t-1} is taken
    as zero, so no state crosses a document boundary.

    Returns y (batch, seqlen, dim) in x's dtype, and the final state h_{seqlen-1} (float32) if
    return_final_state.
    """
    check_tensor("x", x, (None, None, None))
    batch, seqlen, dim = x.shape
    dev = x.device
    check_tensor("dt", dt, (batch, seqlen, dim), device=dev)
    check_tensor("A", A, (dim, None), device=dev)
    dstate = A.shape[1]
    check_tensor("B", B, (batch, seqlen, None, dstate), device=dev)
    ngroups = B.shape[2]
    check_divides("ngroups (B.shape[2])", ngroups, "dim", dim)
    check_tensor("C", C, (batch, seqlen, ngroups, dstate), device=dev)
    check_optional("D", D, (dim,), device=dev)
    check_optional("z", z, (batch, seqlen, dim), device=dev)
    check_optional("dt_bias", dt_bias, (dim,), device=dev)
    check_optional("initial_state", initial_state, (batch, dim, dstate), device=dev)
    check_seq_idx(seq_idx, batch, seqlen, dev)
    name = resolve_backend(backend, dev, _IMPLEMENTED)
    y, final = _impl(name).selective_scan_impl(
        x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, return_final_state, seq_idx
    )
    return (y, final) if return_final_state else y


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    backend: str = "auto",
    *,
    A_is_log: bool = False,
    dt_proj_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decoding step of the Mamba-1 scan; updates `state` in place.

    Shapes: state (batch, dim, dstate) float32 (or float64; bfloat16 / float16 halve a decoding
    state's memory: the step runs in float32 and the new state is rounded when stored);
    x, dt, z (batch, dim); A (dim, dstate);
    B, C (batch, ngroups, dstate); D, dt_bias (dim,). Same math as one step of `selective_scan`.
    Returns y (batch, dim) in x's dtype. `A_is_log=True`: A holds the layer's A_log (any float dtype)
    and the step uses -exp(A_log) in float32, computed inside the step (no separate kernels per
    token for the exp, the negation and the cast of a bfloat16 A_log).
    `dt_proj_weight` (dim, dt_rank): dt is then the layer's low-rank dt (batch, dt_rank), and the step
    uses dt @ dt_proj_weight^T in float32 (Mamba-1's dt_proj inside the step: one GEMV kernel less a
    layer and token on a GPU).
    """
    check_tensor("state", state, (None, None, None), dtypes=FLOAT_DTYPES)
    batch, dim, dstate = state.shape
    dev = state.device
    check_tensor("x", x, (batch, dim), device=dev)
    if dt_proj_weight is None:
        check_tensor("dt", dt, (batch, dim), device=dev)
    else:
        check_tensor("dt_proj_weight", dt_proj_weight, (dim, None), device=dev)
        check_tensor("dt", dt, (batch, dt_proj_weight.shape[1]), device=dev)
    check_tensor("A", A, (dim, dstate), device=dev)
    check_tensor("B", B, (batch, None, dstate), device=dev)
    check_divides("ngroups (B.shape[1])", B.shape[1], "dim", dim)
    check_tensor("C", C, (batch, B.shape[1], dstate), device=dev)
    check_optional("D", D, (dim,), device=dev)
    check_optional("z", z, (batch, dim), device=dev)
    check_optional("dt_bias", dt_bias, (dim,), device=dev)
    name = resolve_backend(backend, dev, _IMPLEMENTED)
    return _impl(name).selective_state_update_impl(
        state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, bool(A_is_log), dt_proj_weight
    )


__all__ = ["selective_scan", "selective_state_update"]
