"""Where a CUDA-graph decode step spends its time: kernels per step, their device time, and the gap.

For each model and batch size: the replay time of the captured step (CUDA events over many replays),
the kernels one replay launches (torch.profiler over the replays, grouped by name, per step) and the
sum of their durations; replay time minus kernel time is what launches and dependencies cost.

    python benchmarks/gpu_decode_profile.py --out bench_out/decode_profile.json
    python benchmarks/gpu_decode_profile.py --models mamba1-130m --batch 1 --compile
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mambakit.inference.cuda_graph import CUDAGraphDecoder  # noqa: E402
from mambakit.models.lm import LanguageModel  # noqa: E402
from mambakit.models.presets import preset  # noqa: E402

from _common import cuda_kernel_totals, environment, print_table, write_json  # noqa: E402


def replay_ms(dec: CUDAGraphDecoder, tokens: torch.Tensor, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    dec.graph.replay()
    start.record()
    for _ in range(iters):
        dec.graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def kernels_per_step(dec: CUDAGraphDecoder, steps: int) -> dict[str, tuple[float, float]]:
    """kernel name -> (launches per step, device us per step)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            dec.graph.replay()
        torch.cuda.synchronize()
    return {k: (n / steps, us / steps) for k, (n, us) in cuda_kernel_totals(prof).items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mamba1-130m", "mamba2-130m", "mamba1-1.4b"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", default="bench_out/decode_profile.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    results = []
    for name in args.models:
        torch.manual_seed(0)
        model = LanguageModel(preset(name), device=device, dtype=torch.bfloat16).eval()
        for batch in args.batch:
            dec = CUDAGraphDecoder(model, batch, 512, compile=args.compile)
            tokens = torch.randint(0, 1000, (batch,), device=device)
            dec.input_ids.copy_(tokens.view(batch, 1))
            ms = replay_ms(dec, tokens, args.iters)
            kernels = kernels_per_step(dec, 20)
            n = sum(c for c, _ in kernels.values())
            dev_us = sum(t for _, t in kernels.values())
            row = {"model": name, "batch": batch, "compile": args.compile, "replay_ms": ms,
                   "kernels_per_step": n, "kernel_ms": dev_us / 1e3, "gap_ms": ms - dev_us / 1e3}  # fmt: skip
            results.append({**row, "kernels": {k: {"per_step": c, "us": t} for k, (c, t) in kernels.items()}})
            print(f"\n{name} batch {batch}{' (compiled)' if args.compile else ''}")
            print_table(list(row), [list(row.values())])
            top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[: args.top]
            print_table(
                ["kernel", "per step", "us per step", "us each"], [[k[:90], c, t, t / c] for k, (c, t) in top]
            )
            del dec
        del model
        torch.cuda.empty_cache()
    write_json(args.out, {"environment": environment(), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
