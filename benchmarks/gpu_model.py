"""GPU training throughput of whole models: tokens/s and peak memory of full training steps.

Random weights in the preset shapes, bf16 autocast, AdamW (fused) with mambakit's parameter groups,
cross-entropy over the whole vocabulary. Prints a table and writes JSON.

    python benchmarks/gpu_model.py --out bench_out/gpu_model.json
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
from mambakit.training.optim import param_groups  # noqa: E402

from _common import environment, print_table, write_json  # noqa: E402


def bench(name: str, batch: int, seqlen: int, steps: int, warmup: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = LanguageModel(preset(name), device="cuda")
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seqlen + 1), device="cuda", generator=gen) for _ in range(2)]

    def step(ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(warmup):
        step(batches[i % 2])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(batches[i % 2])
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    return {
        "model": name,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "batch": batch,
        "seqlen": seqlen,
        "step_ms": round(seconds * 1e3, 1),
        "tokens_per_s": round(batch * seqlen / seconds),
        "peak_mem_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2),
        "loss_finite": bool(torch.isfinite(loss).item()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mamba1-130m", "mamba2-130m"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="bench_out/gpu_model.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_model.py needs a CUDA device")
    rows = []
    for name in args.models:
        try:
            rows.append(bench(name, args.batch, args.seqlen, args.steps, args.warmup))
        except Exception as exc:  # one failing model must not hide the others' numbers
            rows.append({"model": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(rows[-1], flush=True)
    headers = ["model", "params_M", "batch", "seqlen", "step_ms", "tokens_per_s", "peak_mem_GB", "error"]
    print_table(headers, [[row.get(h) for h in headers] for row in rows])
    write_json(args.out, {"benchmark": "gpu_model", "environment": environment(), "results": rows})


if __name__ == "__main__":
    main()
