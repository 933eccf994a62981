"""GPU cost of the LM-head loss: `ops.linear_cross_entropy` forward + backward against full logits.

At the 130M training shape (8 x 2048 tokens, d_model 768, vocabulary 50,277 padded to 50,288), bf16
autocast, for each backend of the op and for the full-logits path (F.linear, float32 upcast,
F.cross_entropy): forward + backward ms (median of `triton.testing.do_bench`-style CUDA-event timing)
and peak memory above the inputs. Prints a table and writes JSON.

    python benchmarks/gpu_loss.py --out bench_out/gpu_loss.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mambakit.ops import linear_cross_entropy  # noqa: E402

from _common import environment, print_table, write_json  # noqa: E402


def cuda_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8 * 2048)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50277)
    ap.add_argument("--padded-vocab", type=int, default=50288)
    ap.add_argument("--backends", nargs="+", default=["torch", "triton"])
    ap.add_argument("--out", default="bench_out/gpu_loss.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(args.tokens, args.d_model, device=dev, generator=gen, requires_grad=True)
    weight = (0.02 * torch.randn(args.padded_vocab, args.d_model, device=dev, generator=gen)).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=dev, generator=gen)

    def run(loss_fn):
        def fn():
            hidden.grad = weight.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn()
            loss.backward()
            return loss

        return fn

    variants = {
        f"linear_cross_entropy[{b}]": (
            lambda b=b: linear_cross_entropy(hidden, weight, targets, vocab_size=args.vocab, backend=b)
        )
        for b in args.backends
    }
    variants["full logits (F.cross_entropy)"] = lambda: F.cross_entropy(
        F.linear(hidden, weight)[:, : args.vocab].float(), targets
    )
    rows, ref = [], None
    for name, loss_fn in variants.items():
        try:
            fn = run(loss_fn)
            loss = fn()
            grads = hidden.grad.float().clone(), weight.grad.float().clone()
            if ref is None:
                ref = loss.detach().float(), grads
            err = max(
                (g - r).abs().max().item() / r.abs().max().item() for g, r in zip(grads, ref[1], strict=True)
            )
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms = cuda_ms(fn)
            rows.append(
                {
                    "variant": name,
                    "fwd_bwd_ms": round(ms, 3),
                    "peak_extra_GB": round((torch.cuda.max_memory_allocated() - base) / 1e9, 2),
                    "loss": round(loss.item(), 5),
                    "grad_rel_err_vs_first": f"{err:.2e}",
                }
            )
        except Exception as exc:  # one failing variant must not hide the others' numbers
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(rows[-1], flush=True)
    headers = ["variant", "fwd_bwd_ms", "peak_extra_GB", "loss", "grad_rel_err_vs_first", "error"]
    print_table(headers, [[r.get(h) for h in headers] for r in rows])
    write_json(
        args.out, {"benchmark": "gpu_loss", "environment": environment(), "args": vars(args), "results": rows}
    )


if __name__ == "__main__":
    main()
