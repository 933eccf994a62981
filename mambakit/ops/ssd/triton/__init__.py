"""Triton backend of SSD (Mamba-2): chunked forward and backward kernels and the one-token step.

Files by pass: `chunk_state.py` (delta, cs and per-chunk states, forward and backward),
`state_passing.py` (the pass over chunks), `chunk_scan.py` (outputs; on the sequential forward path
also the states), `forward.py` (which path, the launches), `backward.py` and
`bwd_chunk.py` (per-chunk gradients), `bwd_seq.py` (the opt-in sequential backward),
`state_update.py` (decoding step), `autograd.py`
(torch.library custom ops, so that torch.compile can trace models that use them). Triton itself is
imported only when a kernel is first needed, so importing this package never fails on a machine
without a GPU (or without Triton).
"""

from __future__ import annotations

import torch


def ssd_impl(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    initial_state: torch.Tensor | None,
    return_final_state: bool,
    seq_idx: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backend entry; see `mambakit.ops.ssd.ssd` for shapes and math."""
    from mambakit.ops.ssd.triton.autograd import ssd_triton

    return ssd_triton(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit,
        initial_state, return_final_state, seq_idx, cu_seqlens,
    )  # fmt: skip


def ssd_state_update_impl(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    A_is_log: bool = False,
) -> torch.Tensor:
    """Backend entry; see `mambakit.ops.ssd.ssd_state_update`. Updates `state` in place."""
    from mambakit.ops.ssd.triton.state_update import ssd_state_update_triton

    return ssd_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, A_is_log)


__all__ = ["ssd_impl", "ssd_state_update_impl"]
