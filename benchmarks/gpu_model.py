"""GPU training throughput of whole models: tokens/s and peak memory of full training steps.

Random weights in the preset shapes, bf16 autocast, AdamW (fused) with mambakit's parameter groups, and
the trainer's loss (`mambakit.training.loss.lm_loss`: the LM head and cross-entropy chunked over tokens
by `ops.linear_cross_entropy`, so the (tokens, vocab) logits never exist whole). `--full-logits-loss`
takes the old path (whole logits upcast to float32, F.cross_entropy) for comparison. Prints a table and
writes JSON.

    python benchmarks/gpu_model.py --out bench_out/gpu_model.json
    python benchmarks/gpu_model.py --device cpu --models tiny-mamba2 --batch 2 --seqlen 64 --steps 1  # smoke
    python benchmarks/gpu_model.py --profile 25  # also the top 25 CUDA kernels of a step, by device time
    python benchmarks/gpu_model.py --profile-cpu 25  # and the top 25 host operators, by self CPU time
    python benchmarks/gpu_model.py --cuda-graph off on  # eager and CUDA-graph micro-steps side by side
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mambakit.models.lm import LanguageModel  # noqa: E402
from mambakit.models.presets import preset  # noqa: E402
from mambakit.training.cuda_graph import GraphedMicroStep  # noqa: E402
from mambakit.training.loss import lm_loss  # noqa: E402
from mambakit.training.optim import param_groups  # noqa: E402

from _common import cuda_kernel_totals, environment, print_table, write_json  # noqa: E402


def bench(
    name: str,
    batch: int,
    seqlen: int,
    steps: int,
    warmup: int,
    device: str = "cuda",
    full_logits: bool = False,
    profile_top: int = 0,
    profile_cpu_top: int = 0,
    cuda_graph: bool = False,
) -> dict:
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = LanguageModel(preset(name), device=device)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=cuda)
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seqlen + 1), device=device, generator=gen) for _ in range(2)]

    def loss_fn(inputs: torch.Tensor, targets: torch.Tensor, seq_idx=None) -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16):  # the trainer's loss path, mean over tokens
            return lm_loss(model, inputs, targets, seq_idx, reduction="mean", full_logits=full_logits)

    if cuda_graph:
        graphed = GraphedMicroStep(model, loss_fn, vocab_size=vocab)

        def step(ids: torch.Tensor) -> torch.Tensor:
            loss = graphed(1.0, ids[:, :-1], ids[:, 1:])
            opt.step()
            opt.zero_grad(set_to_none=False)  # the graph writes into the same .grad tensors
            return loss

    else:

        def step(ids: torch.Tensor) -> torch.Tensor:
            loss = loss_fn(ids[:, :-1], ids[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

    for i in range(warmup):
        step(batches[i % 2])
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(batches[i % 2])
    sync()
    seconds = (time.perf_counter() - t0) / steps
    kernels = kernel_profile(step, batches[0], profile_top) if profile_top and cuda else None
    host = cpu_profile(step, batches[0], profile_cpu_top) if profile_cpu_top and cuda else None
    return {
        "model": name,
        "loss_path": "full-logits" if full_logits else "chunked",
        "step": "cuda-graph" if cuda_graph else "eager",
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "batch": batch,
        "seqlen": seqlen,
        "step_ms": round(seconds * 1e3, 1),
        "tokens_per_s": round(batch * seqlen / seconds),
        "peak_mem_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
        "loss_finite": bool(torch.isfinite(loss).item()),
        **({"kernels_per_step": kernels} if kernels else {}),
        **({"host_ops_per_step": host} if host else {}),
    }


def cpu_profile(step, ids: torch.Tensor, top: int, steps: int = 2) -> dict:
    """Host time of `steps` training steps under torch.profiler (CPU activity): the `top` operators by
    self CPU time as {name: [calls per step, self CPU ms per step, total CPU ms per step]}, and the
    wall time of the profiled steps; a step whose wall time exceeds its kernels' is bound by the host."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(ids)
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps * 1e3
    ranked = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    out = {
        e.key[:120]: [
            e.count / steps,
            round(e.self_cpu_time_total / steps / 1e3, 3),
            round(e.cpu_time_total / steps / 1e3, 3),
        ]
        for e in ranked[:top]
    }
    out["(profiled wall ms per step)"] = [0, round(wall, 2), round(wall, 2)]
    for name, (n, self_ms, total_ms) in out.items():
        print(f"  cpu self {self_ms:9.3f} ms total {total_ms:9.3f} ms {n:7.1f}x  {name}", flush=True)
    return out


def kernel_profile(step, ids: torch.Tensor, top: int, steps: int = 2) -> dict:
    """The CUDA kernels of `steps` training steps under torch.profiler, grouped by name: the `top`
    by device time as {name: [launches per step, device ms per step]}, plus the totals."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(ids)
        torch.cuda.synchronize()
    acc = cuda_kernel_totals(prof)
    ranked = sorted(acc.items(), key=lambda kv: -kv[1][1])
    out = {name[:160]: [n / steps, round(us / steps / 1e3, 3)] for name, (n, us) in ranked[:top]}
    out["(all kernels)"] = [
        sum(v[0] for v in acc.values()) / steps,
        round(sum(v[1] for v in acc.values()) / steps / 1e3, 3),
    ]
    for name, (n, ms) in out.items():
        print(f"  {ms:9.3f} ms {n:7.1f}x  {name}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mamba1-130m", "mamba2-130m"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="bench_out/gpu_model.json")
    parser.add_argument(
        "--full-logits-loss",
        action="store_true",
        help="the old loss: whole float32 logits and F.cross_entropy (default: chunked, as the trainer)",
    )
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test)")
    parser.add_argument(
        "--cuda-graph",
        nargs="+",
        choices=["off", "on"],
        default=["off"],
        help="micro-step eager (off), replayed from a CUDA graph (on: train.cuda_graph), or both",
    )
    parser.add_argument(
        "--profile", type=int, default=0, metavar="TOP", help="print the TOP kernels of a step"
    )
    parser.add_argument(
        "--profile-cpu", type=int, default=0, metavar="TOP", help="print the TOP host operators of a step"
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_model.py needs a CUDA device (or --device cpu for a smoke test)")
    rows = []
    for name, graph in ((n, g) for n in args.models for g in args.cuda_graph):
        try:
            rows.append(
                bench(
                    name,
                    args.batch,
                    args.seqlen,
                    args.steps,
                    args.warmup,
                    args.device,
                    args.full_logits_loss,
                    args.profile,
                    args.profile_cpu,
                    graph == "on",
                )
            )
        except Exception as exc:  # one failing model must not hide the others' numbers
            rows.append({"model": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(rows[-1], flush=True)
    headers = [
        "model", "loss_path", "step", "params_M", "batch", "seqlen", "step_ms", "tokens_per_s",
        "peak_mem_GB", "error",
    ]  # fmt: skip
    print_table(headers, [[row.get(h) for h in headers] for row in rows])
    write_json(args.out, {"benchmark": "gpu_model", "environment": environment(), "results": rows})


if __name__ == "__main__":
    main()
