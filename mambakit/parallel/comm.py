"""Autograd-aware collectives for tensor and context parallelism (plain torch.distributed, gloo or NCCL).

Each is a `torch.autograd.Function` whose backward does the matching communication, so gradients
cross ranks exactly as activations did. Every rank of the group must call each of them in the same
order, in forward and (when it runs) in backward: a rank whose loss does not depend on an output still
has to run the node's backward, which is why the context-parallel code uses every output on every rank.

Megatron-LM names for the tensor-parallel pair: `copy_to_parallel` is "f" (identity forward, all-reduce
backward; before a column-parallel layer), `reduce_from_parallel` is "g" (all-reduce forward, identity
backward; after a row-parallel layer whose consumers are replicated).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def _all_reduce(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def gather_stack(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """(shape) on each rank -> (world, shape) in rank order, no autograd (for ids and sizes)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.stack(parts)


class _CopyToParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ReduceBoth(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad, ctx.group), None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return gather_stack(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # gloo has no reduce-scatter: all-reduce the whole stack and keep this rank's slice
        return _all_reduce(grad, ctx.group)[dist.get_rank(ctx.group)], None


class _ShiftFromPrevious(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, first: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        rank = dist.get_rank(group)
        parts = gather_stack(x, group)
        return first.clone() if rank == 0 else parts[rank - 1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        grads = gather_stack(grad, ctx.group)
        grad_x = grads[rank + 1] if rank + 1 < world else torch.zeros_like(grad)
        grad_first = grad if rank == 0 else torch.zeros_like(grad)
        return grad_x, grad_first, None


def copy_to_parallel(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Identity forward; backward all-reduces the gradient (the input of column-parallel layers)."""
    return _CopyToParallel.apply(x, group)


def reduce_from_parallel(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """All-reduce (sum) forward; identity backward (row-parallel output read by replicated code)."""
    return _ReduceFromParallel.apply(x, group)


def reduce_both(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """All-reduce forward and backward: partial sums whose full result feeds sharded consumers
    (Mamba-1's x_proj output, read by each rank's own channels)."""
    return _ReduceBoth.apply(x, group)


def all_gather_stack(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """(shape) on each rank -> (world, shape); backward sums the gradients of all ranks for each slice."""
    return _AllGather.apply(x, group)


def shift_from_previous(x: torch.Tensor, first: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Rank r > 0 receives rank r-1's `x`; rank 0 receives `first` (same shape). Backward sends the
    gradient back to rank r-1 (and to rank 0's `first`)."""
    return _ShiftFromPrevious.apply(x, first, group)
