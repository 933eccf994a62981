"""Mamba-2 state space duality (SSD): the one public entry and its one-token step.

Backends: `reference.py` (the sequential recurrence and the quadratic "masked attention" form, which
must agree), `torch.py` (chunked block decomposition) and `triton/`. Each defines `ssd_impl` and
`ssd_state_update_impl` with the arguments below (minus `backend`), already checked.
"""

from __future__ import annotations

import math

import torch

from mambakit.ops._backend import BackendModules, resolve_backend
from mambakit.ops._checks import (
    FLOAT_DTYPES,
    check_divides,
    check_optional,
    check_positive_int,
    check_seq_idx,
    check_tensor,
)

_impl = BackendModules(__package__)
_IMPLEMENTED = _impl.implemented


def _check_dt_limit(dt_limit: tuple[float, float]) -> tuple[float, float]:
    if not (isinstance(dt_limit, (tuple, list)) and len(dt_limit) == 2 and 0.0 <= dt_limit[0] < dt_limit[1]):
        raise ValueError(f"dt_limit must be a pair (low, high) with 0 <= low < high, got {dt_limit!r}")
    return float(dt_limit[0]), float(dt_limit[1])


def cu_seqlens_to_seq_idx(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """(nseqs + 1,) cumulative lengths -> (1, seqlen) int32 document ids."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    ids = torch.arange(len(lengths), device=cu_seqlens.device, dtype=torch.int32)
    return torch.repeat_interleave(ids, lengths.long(), output_size=seqlen)[None]


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 256,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 SSD scan: a multi-head SSM whose A is a scalar times identity per head.

    Shapes:
        x, z: (batch, seqlen, nheads, headdim)
        dt: (batch, seqlen, nheads)
        A: (nheads,), float32, negative
        B, C: (batch, seqlen, ngroups, dstate); head h uses group h // (nheads // ngroups)
        D: (nheads,) or (nheads, headdim); dt_bias: (nheads,)
        initial_state, final state: (batch, nheads, headdim, dstate), float32
        seq_idx: (batch, seqlen) int, non-decreasing document ids of packed sequences
        cu_seqlens: (nseqs + 1,) int cumulative lengths of sequences packed in one row (batch == 1);
            then initial_state and the final state are per sequence: (nseqs, nheads, headdim, dstate)

    Math, per head h, in float32:
        delta_t = clamp(softplus?(dt_t + dt_bias), *dt_limit)
        h_t = exp(delta_t * A[h]) * h_{t-1} + delta_t * x_t B_t^T       (headdim, dstate)
        y_t = h_t C_t + D * x_t ;  y_t *= silu(z_t) if z is given
    A document boundary in seq_idx (or cu_seqlens) resets the state to zero (to that sequence's
    initial_state with cu_seqlens). `chunk_size` sets the block size of the chunked algorithm; the
    result does not depend on it beyond rounding.

    Returns y (batch, seqlen, nheads, headdim) in x's dtype, and the final state if
    return_final_state.
    """
    check_tensor("x", x, (None, None, None, None))
    batch, seqlen, nheads, headdim = x.shape
    dev = x.device
    check_tensor("dt", dt, (batch, seqlen, nheads), device=dev)
    check_tensor("A", A, (nheads,), device=dev)
    check_tensor("B", B, (batch, seqlen, None, None), device=dev)
    ngroups, dstate = B.shape[2], B.shape[3]
    check_divides("ngroups (B.shape[2])", ngroups, "nheads", nheads)
    check_tensor("C", C, (batch, seqlen, ngroups, dstate), device=dev)
    check_positive_int("chunk_size", chunk_size)
    if D is not None:
        check_tensor("D", D, (nheads,) if D.ndim == 1 else (nheads, headdim), device=dev)
    check_optional("z", z, (batch, seqlen, nheads, headdim), device=dev)
    check_optional("dt_bias", dt_bias, (nheads,), device=dev)
    dt_limit = _check_dt_limit(dt_limit)
    if cu_seqlens is not None:
        if seq_idx is not None:
            raise ValueError("pass either seq_idx or cu_seqlens, not both")
        if batch != 1:
            raise ValueError(f"cu_seqlens packs sequences into one row: x must have batch 1, got {batch}")
        check_tensor("cu_seqlens", cu_seqlens, (None,), dtypes=(torch.int32, torch.int64), device=dev)
        if (
            len(cu_seqlens) < 2
            or int(cu_seqlens[0]) != 0
            or int(cu_seqlens[-1]) != seqlen
            or bool((cu_seqlens[1:] <= cu_seqlens[:-1]).any())
        ):
            raise ValueError(
                "cu_seqlens must start at 0, increase strictly and end at "
                f"seqlen={seqlen}, got {cu_seqlens.tolist()}"
            )
        nstates = len(cu_seqlens) - 1
    else:
        check_seq_idx(seq_idx, batch, seqlen, dev)
        nstates = batch
    check_optional("initial_state", initial_state, (nstates, nheads, headdim, dstate), device=dev)
    name = resolve_backend(backend, dev, _IMPLEMENTED)
    y, final = _impl(name).ssd_impl(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
        initial_state, return_final_state, seq_idx, cu_seqlens,
    )  # fmt: skip
    return (y, final) if return_final_state else y


def ssd_state_update(
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
    dt_limit: tuple[float, float] = (0.0, math.inf),
    backend: str = "auto",
    *,
    A_is_log: bool = False,
) -> torch.Tensor:
    """One decoding step of the multi-head (Mamba-2) scan; updates `state` in place.

    Shapes: state (batch, nheads, headdim, dstate) float32 (or float64; bfloat16 / float16 halve a
    decoding state's memory: the step runs in float32 and the new state is rounded when stored);
    x, z (batch, nheads, headdim);
    dt (batch, nheads); A (nheads,); B, C (batch, ngroups, dstate); D (nheads,) or (nheads, headdim);
    dt_bias (nheads,). Same math as one step of `ssd`. Returns y (batch, nheads, headdim) in x's dtype.
    `A_is_log=True`: A holds the layer's A_log (any float dtype) and the step uses -exp(A_log) in
    float32, computed inside the step.
    """
    check_tensor("state", state, (None, None, None, None), dtypes=FLOAT_DTYPES)
    batch, nheads, headdim, dstate = state.shape
    dev = state.device
    check_tensor("x", x, (batch, nheads, headdim), device=dev)
    check_tensor("dt", dt, (batch, nheads), device=dev)
    check_tensor("A", A, (nheads,), device=dev)
    check_tensor("B", B, (batch, None, dstate), device=dev)
    check_divides("ngroups (B.shape[1])", B.shape[1], "nheads", nheads)
    check_tensor("C", C, (batch, B.shape[1], dstate), device=dev)
    if D is not None:
        check_tensor("D", D, (nheads,) if D.ndim == 1 else (nheads, headdim), device=dev)
    check_optional("z", z, (batch, nheads, headdim), device=dev)
    check_optional("dt_bias", dt_bias, (nheads,), device=dev)
    dt_limit = _check_dt_limit(dt_limit)
    name = resolve_backend(backend, dev, _IMPLEMENTED)
    return _impl(name).ssd_state_update_impl(
        state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, bool(A_is_log)
    )


__all__ = ["ssd", "ssd_state_update", "cu_seqlens_to_seq_idx"]
