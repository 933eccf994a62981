"""Helpers shared by the torchrun workers of tests/parallel: process group set-up, comparisons, packed ids."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

RTOL = 1e-4
SCALED_ATOL = 1e-4  # absolute tolerance as a fraction of the largest |want|: gradients at init span 1e-8..1


def setup() -> tuple[int, int, dist.ProcessGroup]:
    """Join the gloo group torchrun describes; one thread a process (the tests share 2 cores)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    os.environ.setdefault("MAMBAKIT_BACKEND", "torch")
    return dist.get_rank(), dist.get_world_size(), dist.group.WORLD


def finish(message: str) -> None:
    """Rank 0 prints `message` once every rank got here, then the process leaves without interpreter
    finalization. Why: a gloo run-loop thread can still hold the last reference to a finished
    all-reduce (and so to its Python tensors); if it drops it while the interpreter is shutting down,
    taking the GIL aborts the process ("terminate called without an active exception", seen about
    1 run in 15 on a 2-core machine; the stack is in pytorch/pytorch#179291's description)."""
    dist.barrier()
    if dist.get_rank() == 0:
        print(message)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL):
    """assert_close (fp32) with an absolute tolerance scaled to the reference's magnitude, so that tiny
    gradients are checked as strictly as large ones; the rank and the quantity in the message."""
    atol = SCALED_ATOL * float(want.detach().abs().max()) + 1e-12
    torch.testing.assert_close(
        got, want, atol=atol, rtol=rtol, msg=lambda m: f"rank {dist.get_rank()}: {name}: {m}"
    )


def make_seq_idx(kind: str | None, batch: int, seqlen: int, world: int) -> torch.Tensor | None:
    """Packed document ids (batch, seqlen): None; "boundaries": documents that start exactly at rank
    boundaries in row 0 and one spanning several ranks in row 1; "inside": starts inside slices."""
    if kind is None:
        return None
    per = seqlen // world
    ids = torch.zeros(batch, seqlen, dtype=torch.int64)
    if kind == "boundaries":
        starts = [[per], [2 * per + 1] if world > 2 else [per + 1]]
    else:
        starts = [[1, per // 2, per + 3], [per - 1, seqlen - 2]]
    for row in range(batch):
        for s in starts[row % 2]:
            ids[row, s:] += 1
    return ids
