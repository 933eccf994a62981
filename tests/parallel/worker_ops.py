"""Run under torchrun (gloo, CPU): context-parallel ssd, selective_scan and causal_conv1d against the
one-process ops on the same data, forward and backward. Every rank builds the same global inputs from
one seed, runs its slice, and checks its outputs and its slice of the gradients; gradients of inputs
every rank shares (A, D, dt_bias, conv weight, initial state) are summed over ranks first."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from mambakit import ops
from mambakit.parallel.context_parallel import (
    context_parallel_causal_conv1d,
    context_parallel_selective_scan,
    context_parallel_ssd,
)
from tests.parallel.common import check_close, finish, make_seq_idx, setup


def _leaves(tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    return {k: None if v is None else v.detach().clone().requires_grad_() for k, v in tensors.items()}


def _check_grads(name, local, ref, shared, rank, lo, hi, group):
    for k, v in local.items():
        if v is None:
            continue
        g = v.grad if v.grad is not None else torch.zeros_like(v)
        if k in shared:
            g = g.clone()
            dist.all_reduce(g, group=group)
            check_close(f"{name} grad {k}", g, ref[k].grad)
        else:
            check_close(f"{name} grad {k}", g, ref[k].grad[:, lo:hi])


def _run(name, fn, inputs, shared, seq_idx, rank, world, group, cp_fn):
    L = next(v for k, v in inputs.items() if k == "x").shape[1]
    lo, hi = rank * L // world, (rank + 1) * L // world
    gen = torch.Generator().manual_seed(7)
    ref = _leaves(inputs)
    y, final = fn(ref, seq_idx)
    wy = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    wf = torch.randn(final.shape, generator=gen, dtype=final.dtype)
    ((y * wy).sum() + (final * wf).sum()).backward()

    loc = _leaves({k: (v if k in shared or v is None else v[:, lo:hi]) for k, v in inputs.items()})
    ys, fs = cp_fn(loc, None if seq_idx is None else seq_idx[:, lo:hi])
    check_close(f"{name} y", ys, y[:, lo:hi])
    loss = (ys * wy[:, lo:hi]).sum()
    if rank == world - 1:
        check_close(f"{name} final state", fs, final)
        loss = loss + (fs * wf).sum()
    loss.backward()
    _check_grads(name, loc, ref, shared, rank, lo, hi, group)


def ssd_cases(rank, world, group):
    L = 16 * world
    for case, (docs, z, init, limit) in enumerate(
        [
            (None, False, False, (0.0, math.inf)),
            ("boundaries", True, True, (0.0, 0.2)),
            ("inside", True, False, (0.0, math.inf)),
        ]
    ):
        g = torch.Generator().manual_seed(case)
        b, h, p, ng, n = 2, 4, 3, 2, 5
        inputs = {
            "x": torch.randn(b, L, h, p, generator=g),
            "dt": torch.randn(b, L, h, generator=g),
            "A": -torch.rand(h, generator=g) - 0.5,
            "B": torch.randn(b, L, ng, n, generator=g),
            "C": torch.randn(b, L, ng, n, generator=g),
            "D": torch.randn(h, generator=g),
            "z": torch.randn(b, L, h, p, generator=g) if z else None,
            "dt_bias": torch.randn(h, generator=g) * 0.5,
            "init": torch.randn(b, h, p, n, generator=g) if init else None,
        }
        seq_idx = make_seq_idx(docs, b, L, world)
        shared = {"A", "D", "dt_bias", "init"}

        def ref_fn(t, s, limit=limit):
            return ops.ssd(
                t["x"],
                t["dt"],
                t["A"],
                t["B"],
                t["C"],
                8,
                t["D"],
                t["z"],
                t["dt_bias"],
                True,
                limit,
                t["init"],
                True,
                s,
            )

        def cp_fn(t, s, limit=limit):
            return context_parallel_ssd(
                t["x"],
                t["dt"],
                t["A"],
                t["B"],
                t["C"],
                8,
                t["D"],
                t["z"],
                t["dt_bias"],
                True,
                limit,
                t["init"],
                True,
                s,
                group=group,
            )

        _run(f"ssd case {case}", ref_fn, inputs, shared, seq_idx, rank, world, group, cp_fn)


def selective_scan_cases(rank, world, group):
    L = 8 * world
    for case, (docs, z, init) in enumerate(
        [(None, True, True), ("boundaries", True, False), ("inside", False, True)]
    ):
        g = torch.Generator().manual_seed(10 + case)
        b, d, ng, n = 2, 6, 1, 4
        inputs = {
            "x": torch.randn(b, L, d, generator=g),
            "dt": torch.randn(b, L, d, generator=g),
            "A": -torch.rand(d, n, generator=g) - 0.5,
            "B": torch.randn(b, L, ng, n, generator=g),
            "C": torch.randn(b, L, ng, n, generator=g),
            "D": torch.randn(d, generator=g),
            "z": torch.randn(b, L, d, generator=g) if z else None,
            "dt_bias": torch.randn(d, generator=g) * 0.5,
            "init": torch.randn(b, d, n, generator=g) if init else None,
        }
        seq_idx = make_seq_idx(docs, b, L, world)
        shared = {"A", "D", "dt_bias", "init"}

        def ref_fn(t, s):
            return ops.selective_scan(
                t["x"],
                t["dt"],
                t["A"],
                t["B"],
                t["C"],
                t["D"],
                t["z"],
                t["dt_bias"],
                True,
                t["init"],
                True,
                s,
            )

        def cp_fn(t, s):
            return context_parallel_selective_scan(
                t["x"],
                t["dt"],
                t["A"],
                t["B"],
                t["C"],
                t["D"],
                t["z"],
                t["dt_bias"],
                True,
                t["init"],
                True,
                s,
                group=group,
            )

        _run(f"selective_scan case {case}", ref_fn, inputs, shared, seq_idx, rank, world, group, cp_fn)


def conv_cases(rank, world, group):
    L = 4 * world
    for case, (docs, init) in enumerate([(None, True), ("boundaries", False), ("inside", True)]):
        g = torch.Generator().manual_seed(20 + case)
        b, d, w = 2, 5, 4
        inputs = {
            "x": torch.randn(b, L, d, generator=g),
            "weight": torch.randn(d, w, generator=g),
            "bias": torch.randn(d, generator=g),
            "init": torch.randn(b, d, w - 1, generator=g) if init else None,
        }
        seq_idx = make_seq_idx(docs, b, L, world)

        def ref_fn(t, s):
            return ops.causal_conv1d(t["x"], t["weight"], t["bias"], "silu", t["init"], True, s)

        def cp_fn(t, s):
            return context_parallel_causal_conv1d(
                t["x"], t["weight"], t["bias"], "silu", t["init"], True, s, group=group
            )

        _run(
            f"conv case {case}",
            ref_fn,
            inputs,
            {"weight", "bias", "init"},
            seq_idx,
            rank,
            world,
            group,
            cp_fn,
        )


if __name__ == "__main__":
    rank, world, group = setup()
    ssd_cases(rank, world, group)
    selective_scan_cases(rank, world, group)
    conv_cases(rank, world, group)
    finish(f"ops OK on {world} ranks")
