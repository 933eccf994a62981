"""Context parallelism for the scans: the sequence is split into contiguous, equal slices, one a rank.

Algorithm (SSD and the Mamba-1 selective scan alike, both linear in the state):
  1. each rank scans its slice from a zero state: outputs y0 and the state T_r at its end;
  2. the total decay of the slice, a_r = exp(sum_t delta_t A) ((b, h) for SSD, (b, dim, dstate) for
     Mamba-1), zero where a document boundary (seq_idx) falls inside the slice;
  3. a scan over ranks: the state entering rank r is c_r = k_r (a_{r-1} c_{r-1} + T_{r-1}), c_0 the
     initial state, k_r = 0 where a document starts exactly at the slice boundary (`_StateCombine`:
     one all-gather of (T, a) forward, one all-gather of the state gradients backward);
  4. each rank corrects its outputs with what c_r adds: the same scan with zero inputs and initial
     state c_r (no D skip; the z gate is linear in it), so y = y0 + scan(0, c_r).
The correction costs a second scan over the slice; it runs on rank 0 too (whose c_0 is the initial
state), so every rank's graph holds the combine and its backward communicates on every rank.

The causal conv gets the previous rank's last width-1 inputs as its initial state (`shift_from_previous`),
masked where they belong to an earlier document. seq_idx is each rank's slice of the global document
ids (all ranks pass one or all pass None); cu_seqlens is not accepted: turn it into seq_idx first.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from mambakit import ops
from mambakit.ops.selective_scan.reference import discretize_dt
from mambakit.ops.ssd.reference import process_dt
from mambakit.parallel.comm import gather_stack, shift_from_previous

__all__ = ["context_parallel_causal_conv1d", "context_parallel_selective_scan", "context_parallel_ssd"]


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(b,) -> (b, 1, ..., 1) with like's number of dimensions."""
    return v.view(v.shape[0], *([1] * (like.ndim - 1)))


class _StateCombine(torch.autograd.Function):
    """c_r from every rank's (T_j, a_j): c_0 = init, c_{j+1} = k_{j+1} (a_j c_j + T_j)."""

    @staticmethod
    def forward(ctx, T, a, init, links, group):
        rank = dist.get_rank(group)
        T_all, a_all = gather_stack(T, group), gather_stack(a, group)
        c = init.clone()
        for j in range(rank):
            c = _bcast(links[j + 1], T) * (a_all[j] * c + T_all[j])
        ctx.group = group
        ctx.a_shape = a.shape
        ctx.save_for_backward(a_all, c, links)
        return c

    @staticmethod
    def backward(ctx, grad_c):
        a_all, c, links = ctx.saved_tensors
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        grads = gather_stack(grad_c, ctx.group)  # dL/dc_j as seen by rank j's own outputs
        # g_j = dL/dc_j in total = grads[j] + k_{j+1} a_j g_{j+1}; w = dL/d(a_r c_r + T_r)
        g = torch.zeros_like(grad_c)
        for j in range(world - 1, rank, -1):
            nxt = _bcast(links[j + 1], g) * a_all[j] * g if j + 1 < world else 0.0
            g = grads[j] + nxt
        w = _bcast(links[rank + 1], g) * g if rank + 1 < world else torch.zeros_like(grad_c)
        grad_a = (w * c).sum_to_size(ctx.a_shape)
        grad_init = grad_c + a_all[rank] * w if rank == 0 else torch.zeros_like(grad_c)
        return w, grad_a, grad_init, None, None


def _document_links(
    seq_idx: torch.Tensor | None, batch: int, group: ProcessGroup, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """links (world, batch): 1 where rank r's slice continues rank r-1's document (row 0 unused);
    whole (batch,): 1 where this slice holds one document (its end state depends on the state in)."""
    world = dist.get_world_size(group)
    if seq_idx is None:
        ones = torch.ones(world, batch, device=device)
        return ones, ones[0]
    edges = gather_stack(torch.stack([seq_idx[:, 0], seq_idx[:, -1]], dim=-1), group)  # (world, b, 2)
    links = torch.ones(world, batch, device=device)
    links[1:] = (edges[1:, :, 0] == edges[:-1, :, 1]).float()
    return links, (seq_idx[:, 0] == seq_idx[:, -1]).float()


def _combine(T, a, initial_state, seq_idx, group):
    links, whole = _document_links(seq_idx, T.shape[0], group, T.device)
    a = a * _bcast(whole.to(a.dtype), a)
    init = torch.zeros_like(T) if initial_state is None else initial_state.to(T.dtype)
    return _StateCombine.apply(T, a, init, links.to(T.dtype), group)


def context_parallel_ssd(
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
    *,
    group: ProcessGroup,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`ops.ssd` over a sequence split across the ranks of `group`, in rank order.

    Arguments as `ops.ssd` with this rank's slice of the sequence axis: x, z (batch, seqlen_r, nheads,
    headdim), dt (batch, seqlen_r, nheads), B, C (batch, seqlen_r, ngroups, dstate), seq_idx
    (batch, seqlen_r). initial_state (batch, nheads, headdim, dstate) is the state before the whole
    sequence: pass the same on every rank (rank 0's copy is used and receives its gradient).
    Returns y (batch, seqlen_r, nheads, headdim) and, if return_final_state, the state at the end of
    this rank's slice (on the last rank: the final state of the whole sequence).
    """
    y0, T = ops.ssd(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, None, True, seq_idx,
        backend=backend,
    )  # fmt: skip
    limit = (float(dt_limit[0]), float(dt_limit[1]))
    delta = process_dt(dt, dt_bias, dt_softplus, limit, T.dtype)  # (b, l, h)
    a = torch.exp(delta.sum(1) * A.to(T.dtype))[..., None, None]  # (b, h, 1, 1)
    c = _combine(T, a, initial_state, seq_idx, group)
    corr, carried = ops.ssd(
        torch.zeros_like(x), dt, A, B, C, chunk_size, None, z, dt_bias, dt_softplus, dt_limit, c, True,
        seq_idx, backend=backend,
    )  # fmt: skip
    y = y0 + corr
    return (y, carried + T) if return_final_state else y


def context_parallel_selective_scan(
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
    *,
    group: ProcessGroup,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`ops.selective_scan` over a sequence split across the ranks of `group`, in rank order.

    x, dt, z (batch, seqlen_r, dim); B, C (batch, seqlen_r, ngroups, dstate); seq_idx (batch, seqlen_r);
    initial_state (batch, dim, dstate) as in `context_parallel_ssd`. Returns y (batch, seqlen_r, dim)
    and, if return_final_state, the state at the end of this rank's slice.
    """
    y0, T = ops.selective_scan(
        x, dt, A, B, C, D, z, dt_bias, dt_softplus, None, True, seq_idx, backend=backend
    )
    delta = discretize_dt(dt, dt_bias, dt_softplus, T.dtype)  # (b, l, dim)
    a = torch.exp(delta.sum(1)[..., None] * A.to(T.dtype))  # (b, dim, dstate)
    c = _combine(T, a, initial_state, seq_idx, group)
    corr, carried = ops.selective_scan(
        torch.zeros_like(x), dt, A, B, C, None, z, dt_bias, dt_softplus, c, True, seq_idx, backend=backend
    )
    y = y0 + corr
    return (y, carried + T) if return_final_state else y


def context_parallel_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
    *,
    group: ProcessGroup,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`ops.causal_conv1d` over a sequence split across ranks: x (batch, seqlen_r, dim) with
    seqlen_r >= width - 1; the previous rank's last width-1 inputs (rank 0: initial_state, zeros if
    None) are this rank's initial state. Returns out (batch, seqlen_r, dim) and, if
    return_final_state, the last width-1 inputs of this slice (batch, dim, width - 1)."""
    halo_len = weight.shape[-1] - 1
    if halo_len == 0:
        return ops.causal_conv1d(
            x, weight, bias, activation, None, return_final_state, seq_idx, backend=backend
        )
    if x.ndim != 3 or x.shape[1] < halo_len:
        raise ValueError(
            f"x must have shape (batch, seqlen, dim) with seqlen >= width - 1 = {halo_len} on every rank, "
            f"got {tuple(x.shape)}"
        )
    batch, _, dim = x.shape
    tail = x[:, -halo_len:].transpose(1, 2)  # (b, dim, width - 1), oldest first
    first = torch.zeros_like(tail) if initial_state is None else initial_state.to(x.dtype)
    halo = shift_from_previous(tail, first, group)
    if seq_idx is not None:
        rank = dist.get_rank(group)
        prev_ids = gather_stack(seq_idx[:, -halo_len:], group)[max(rank - 1, 0)]
        if rank > 0:  # rank 0's initial state feeds its first document, as in ops.causal_conv1d
            halo = halo * (prev_ids == seq_idx[:, :1]).to(halo.dtype)[:, None, :]
    return ops.causal_conv1d(x, weight, bias, activation, halo, return_final_state, seq_idx, backend=backend)
