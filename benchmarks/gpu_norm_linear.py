"""GPU benchmark of norm + linear at decoding shapes: the fused Triton GEMV vs the norm kernel + cuBLAS.

Shapes are the bf16 decoding steps of the presets: the block's add + norm + in_proj, Mamba-2's gated norm
+ out_proj and the final norm + LM head, at 1 to 16 rows (the batch). Each op is captured in a CUDA graph
(`triton.testing.do_bench_cudagraph`), as the decoder replays it, so launch overhead counts as it does
there. GB/s is the weight's bytes over the time (the weight is read once; the rows are a few KiB).
Before timing, the fused result is compared with the unfused one (max abs error over the output scale).
`--sweep` times every tile config at batch 1 first (MAMBAKIT_NORM_LINEAR_CONFIG) and reports the best.

    python benchmarks/gpu_norm_linear.py --out results/gpu_norm_linear.json [--sweep]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mambakit import ops  # noqa: E402

from _common import environment, print_table, write_json  # noqa: E402

# name, in_features, out_features, kind ("add": add + norm, "gated": gated norm, one group)
SHAPES = [
    ("mamba1-130m in_proj", 768, 3072, "add"),
    ("mamba2-130m in_proj", 768, 3352, "add"),
    ("mamba2-130m out_proj", 1536, 768, "gated"),
    ("130m lm_head", 768, 50288, "add"),
    ("mamba1-1.4b in_proj", 2048, 8192, "add"),
    ("mamba2-1.3b in_proj", 2048, 8512, "add"),
    ("mamba2-1.3b out_proj", 4096, 2048, "gated"),
    ("1.4b lm_head", 2048, 50288, "add"),
]


def _case(rows: int, k: int, n: int, kind: str):
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(rows, 1, k, generator=g, **dev)
    other = torch.randn(rows, 1, k, generator=g, device="cuda")  # fp32 residual stream
    z = torch.randn(rows, 1, k, generator=g, **dev)
    nw = torch.rand(k, generator=g, **dev) + 0.5
    w = torch.randn(n, k, generator=g, **dev) * k**-0.5

    def run(backend):
        if kind == "add":
            return ops.add_rms_norm_linear(x, other, nw, w, None, 1e-5, True, backend=backend)[0]
        return ops.gated_rms_norm_linear(x, z, nw, w, None, 1e-5, None, False, backend=backend)

    return run, n * k * 2


def _us(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    results, sweep = [], {}
    if args.sweep:
        configs = [
            (bn, bk, w, s)
            for bn, bk in itertools.product((16, 32, 64), (128, 256, 512))
            for w, s in ((4, 2), (4, 3), (8, 3))
        ]
        for name, k, n, kind in (SHAPES[i] for i in (0, 2, 3, 4)):
            run, _ = _case(1, k, n, kind)
            timed = {}
            for c in configs:
                os.environ["MAMBAKIT_NORM_LINEAR_CONFIG"] = ",".join(map(str, c))
                try:
                    timed[c] = _us(functools.partial(run, "triton"))
                except Exception as e:  # a tile that does not fit: report and go on
                    print(f"{name} {c}: {type(e).__name__}")
            os.environ.pop("MAMBAKIT_NORM_LINEAR_CONFIG")
            best = sorted(timed.items(), key=lambda kv: kv[1])[:3]
            sweep[name] = {",".join(map(str, c)): t for c, t in timed.items()}
            print(f"{name}: best {[(c, round(t, 2)) for c, t in best]}, default {timed.get((16, 256, 4, 3))}")
    rows_out = []
    for rows in args.rows:
        for name, k, n, kind in SHAPES:
            run, nbytes = _case(rows, k, n, kind)
            fused, unfused = run("triton"), run("torch")
            err = ((fused.float() - unfused.float()).abs().max() / unfused.float().abs().max()).item()
            t_f, t_u = _us(functools.partial(run, "triton")), _us(functools.partial(run, "torch"))
            r = dict(shape=name, rows=rows, k=k, n=n, fused_us=t_f, unfused_us=t_u, rel_err=err)
            r["fused_GBps"], r["speedup"] = nbytes / t_f / 1e3, t_u / t_f
            results.append(r)
            rows_out.append([name, rows, t_f, t_u, r["speedup"], r["fused_GBps"], f"{err:.1e}"])
    print_table(["shape", "rows", "fused us", "norm+cuBLAS us", "speedup", "fused GB/s", "rel err"], rows_out)
    if args.out:
        write_json(args.out, {"environment": environment(), "results": results, "sweep": sweep})


if __name__ == "__main__":
    main()
