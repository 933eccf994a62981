"""Packed sequences at the layer level: validate `seq_idx` / `cu_seqlens` and turn one into the other."""

from __future__ import annotations

import torch

from mambakit import ops


def cu_seqlens_as_seq_idx(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """(nseqs + 1,) cumulative lengths of sequences packed in one row -> (1, seqlen) document ids."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1:
        raise TypeError("cu_seqlens must be a 1-D integer torch.Tensor of cumulative lengths")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must have an integer dtype, got {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"cu_seqlens packs sequences into one row: batch must be 1, got {batch}")
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
    return ops.cu_seqlens_to_seq_idx(cu_seqlens, seqlen)


def resolve_seq_idx(
    seq_idx: torch.Tensor | None, cu_seqlens: torch.Tensor | None, batch: int, seqlen: int
) -> torch.Tensor | None:
    """The document ids of a packed batch, from whichever of seq_idx / cu_seqlens was given."""
    if cu_seqlens is None:
        return seq_idx
    if seq_idx is not None:
        raise ValueError("pass either seq_idx or cu_seqlens, not both")
    return cu_seqlens_as_seq_idx(cu_seqlens, batch, seqlen)


def check_hidden(hidden_states: object, d_model: int, *, step: bool = False) -> torch.Tensor:
    """hidden_states (batch, seqlen, d_model) floating; a decoding step needs seqlen 1."""
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states must be floating point, got {hidden_states.dtype}")
    if hidden_states.ndim != 3 or hidden_states.shape[-1] != d_model:
        raise ValueError(
            f"hidden_states must have shape (batch, seqlen, {d_model}), got {tuple(hidden_states.shape)}"
        )
    if step and hidden_states.shape[1] != 1:
        raise ValueError(
            f"step takes hidden_states of shape (batch, 1, d_model), got {tuple(hidden_states.shape)}"
        )
    return hidden_states


def check_state_batch(name: str, state_batch: int, batch: int) -> None:
    if state_batch != batch:
        raise ValueError(f"{name} was allocated for batch {state_batch} but hidden_states has batch {batch}")
