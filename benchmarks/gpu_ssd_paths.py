"""The two SSD forward paths side by side: chunked (per-chunk states, the pass over chunks, then every
chunk's outputs in parallel) and sequential (one program per (batch, head) walking its chunks in
order, carrying the state), over grids of (batch, nheads) pairs from a few programs to several per
multiprocessor. It sets where `forward.SEQUENTIAL_MIN_PER_SM` puts the switch.

Shapes as the benchmark anchor otherwise (headdim 64, ngroups 1, dstate 128, chunk 256, bf16 x/B/C,
fp32 dt, D, dt_bias, softplus). Forward and forward+backward medians (ms, triton.testing.do_bench)
per path, with the relative max difference of y between the forward paths, and of every gradient
between the opt-in sequential backward (`MAMBAKIT_SSD_BWD_PATH=sequential`) and the chunked one.

    python benchmarks/gpu_ssd_paths.py --out results/gpu_ssd_paths.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_ssd import ANCHOR, bench, make_inputs, rel_err, run_ssd  # noqa: E402

from _common import environment, print_table, write_json  # noqa: E402

GRIDS = [(4, 64), (8, 24), (2, 64), (1, 132), (1, 64), (2, 16), (1, 8)]  # (batch, nheads)


def time_path(fwd: str, bwd: str, ins: dict, gy: torch.Tensor) -> tuple[list[torch.Tensor], float, float]:
    """(y and the gradients of every input), forward ms, forward+backward ms on the given paths."""
    os.environ["MAMBAKIT_SSD_FWD_PATH"] = fwd
    os.environ["MAMBAKIT_SSD_BWD_PATH"] = bwd
    leaves = list(ins.values())
    for v in leaves:
        v.grad = None
    y = run_ssd("triton", ins, ANCHOR["chunk"])
    y.backward(gy)
    outs = [y.detach()] + [v.grad.clone() for v in leaves]
    with torch.no_grad():
        fwd_ms = bench(lambda: run_ssd("triton", ins, ANCHOR["chunk"]))
    fwd_bwd = bench(lambda: run_ssd("triton", ins, ANCHOR["chunk"]).backward(gy), grad_to_none=leaves)
    return outs, fwd_ms, fwd_bwd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--grids", nargs="+", default=[f"{b}x{h}" for b, h in GRIDS], help="BATCHxNHEADS")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_ssd_paths.py needs a CUDA device")
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    a = ANCHOR
    rows = []
    for grid in args.grids:
        batch, nheads = (int(v) for v in grid.split("x"))
        for seqlen in args.seqlens:
            ins = make_inputs(
                batch, seqlen, nheads, a["headdim"], a["ngroups"], a["dstate"], requires_grad=True
            )
            gy = torch.randn(batch, seqlen, nheads, a["headdim"], device="cuda", dtype=torch.bfloat16)
            out_c, fwd_c, fb_c = time_path("chunked", "chunked", ins, gy)
            out_s, fwd_s, fb_s = time_path("sequential", "chunked", ins, gy)
            out_b, _, fb_b = time_path("sequential", "sequential", ins, gy)
            os.environ.pop("MAMBAKIT_SSD_FWD_PATH")
            os.environ.pop("MAMBAKIT_SSD_BWD_PATH")
            rows.append({
                "batch": batch, "nheads": nheads, "seqlen": seqlen, "programs_per_sm": batch * nheads / sms,
                "chunked_fwd_ms": fwd_c, "sequential_fwd_ms": fwd_s,
                "chunked_fwd_bwd_ms": fb_c, "sequential_fwd_bwd_ms": fb_s, "sequential_bwd_fwd_bwd_ms": fb_b,
                "y_rel_diff": rel_err(out_s[0], out_c[0]),
                "grads_rel_diff_sequential_bwd": max(rel_err(g, r) for g, r in zip(out_b[1:], out_c[1:])),
            })  # fmt: skip
            print(rows[-1], flush=True)
            del ins, gy
            torch.cuda.empty_cache()
    print_table(
        ["batch x heads", "seqlen", "per SM", "fwd chunked", "fwd seq", "f+b chunked", "f+b seq",
         "f+b seq, seq bwd", "y diff", "grad diff, seq bwd"],
        [
            [f"{r['batch']}x{r['nheads']}", r["seqlen"], r["programs_per_sm"], r["chunked_fwd_ms"],
             r["sequential_fwd_ms"], r["chunked_fwd_bwd_ms"], r["sequential_fwd_bwd_ms"],
             r["sequential_bwd_fwd_bwd_ms"], r["y_rel_diff"], r["grads_rel_diff_sequential_bwd"]]
            for r in rows
        ],
    )  # fmt: skip
    if args.out:
        write_json(args.out, {"env": environment(), "anchor": ANCHOR, "sms": sms, "rows": rows})


if __name__ == "__main__":
    main()
