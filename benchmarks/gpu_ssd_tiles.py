"""Tile sweep of the SSD state programs (`chunk_state_fwd`, `chunk_state_bwd`) at the anchor shape.

Each program computes one (headdim block x dstate block) tile of one chunk's state (forward) or of the
gradient its outputs send to the entering state (backward); the tile sets how many programs run and
how often x (or dy) and B (or C) are re-read. (Before 2026-12-01's sixth session each program walked
all chunks of one (batch, head) tile in order; the sweep of those is call 1 in
`benchmarks/results/h200-2026-12-01f/`.) For each "BLOCK_P,BLOCK_N,num_warps,num_stages" config this
prints the kernel's GPU time (torch.profiler, mean of 10 calls; `--which passing` sweeps the state
elements per program of the forward `state_passing` instead, `--which scan` the output pass's
"SUB,num_warps,num_stages", `--which bwdseq` the opt-in sequential backward's) and the largest
relative difference of the SSD result from the default config's (a config changes only the summation order).

    python benchmarks/gpu_ssd_tiles.py --out results/gpu_ssd_tiles.json
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_ssd import ANCHOR, make_inputs, rel_err, run_ssd  # noqa: E402

from _common import cuda_kernel_totals, environment, print_table, profiled_kernel_totals, write_json  # noqa: E402

CONFIGS = [
    "64,128,8,2", "64,128,4,2", "64,64,8,2", "64,64,4,2", "64,64,4,3", "64,32,4,2", "64,32,4,3",
    "64,32,2,2", "32,64,4,2", "32,32,4,2", "32,32,2,2", "64,16,2,2", "32,128,4,2", "16,128,4,2",
]  # fmt: skip


def kernel_us(fn, name: str, reps: int = 10) -> float:
    totals = profiled_kernel_totals(fn, reps, warmup=1)
    us = [t for k, (_, t) in totals.items() if name in k]
    return sum(us) / reps if us else float("nan")


def sweep(which: str, seqlen: int, configs: list[str]) -> list[dict]:
    a = ANCHOR
    shape = (a["batch"], seqlen, a["nheads"], a["headdim"], a["ngroups"], a["dstate"])
    grads = which in ("bwd", "bwdseq")
    ins = make_inputs(*shape, requires_grad=grads)
    gy = torch.randn(a["batch"], seqlen, a["nheads"], a["headdim"], device="cuda", dtype=torch.bfloat16)
    var = {
        "passing": "MAMBAKIT_SSD_PASSING_BLOCK",
        "scan": "MAMBAKIT_SSD_SCAN_CONFIG",
        "bwdseq": "MAMBAKIT_SSD_BWD_SEQ_CONFIG",
    }.get(which, f"MAMBAKIT_SSD_STATE_{which.upper()}_CONFIG")

    def run():
        if not grads:
            with torch.no_grad():
                return (run_ssd("triton", ins, a["chunk"]),)
        for v in ins.values():
            v.grad = None
        run_ssd("triton", ins, a["chunk"]).backward(gy)
        return tuple(v.grad for v in ins.values())

    os.environ.pop(var, None)
    ref = [t.clone() for t in run()]
    kernel = {
        "fwd": "chunk_state_fwd",
        "bwd": "chunk_state_bwd",
        "passing": "state_passing",
        "scan": "chunk_scan_fwd",
        "bwdseq": "ssd_bwd_seq_kernel",
    }[which]
    if which == "bwdseq":  # opt-in
        os.environ["MAMBAKIT_SSD_BWD_PATH"] = "sequential"
    rows = []
    for cfg in configs:
        os.environ[var] = cfg
        try:
            out = run()
            err = max(rel_err(o, r) for o, r in zip(out, ref))
            finite = all(bool(torch.isfinite(o).all()) for o in out)
            rows.append({"which": which, "seqlen": seqlen, "config": cfg, "kernel_us": kernel_us(run, kernel),
                         "max_rel_diff_vs_default": err, "finite": finite})  # fmt: skip
        except Exception as e:  # e.g. out of shared memory for a large tile with 3 stages
            traceback.print_exc()
            error = f"{type(e).__name__}: {e}"[:200]
            rows.append({"which": which, "seqlen": seqlen, "config": cfg, "error": error})
        print(rows[-1], flush=True)
    os.environ.pop(var, None)
    os.environ.pop("MAMBAKIT_SSD_BWD_PATH", None)
    return rows


def chunk_breakdown(seqlen: int, chunks: list[int]) -> list[dict]:
    """Forward GPU time per kernel at the anchor for several chunk sizes (what the output pass's cost
    does as its blocks shrink: fewer column blocks per row block, more chunk states)."""
    from torch.profiler import ProfilerActivity, profile

    a = ANCHOR
    ins = make_inputs(a["batch"], seqlen, a["nheads"], a["headdim"], a["ngroups"], a["dstate"])
    rows = []
    for chunk in chunks:
        with torch.no_grad():
            for _ in range(3):  # compile and tune outside the profile
                run_ssd("triton", ins, chunk)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    run_ssd("triton", ins, chunk)
                torch.cuda.synchronize()
        totals = {k: round(us / 10, 1) for k, (_, us) in cuda_kernel_totals(prof).items()}
        rows.append({"seqlen": seqlen, "chunk": chunk, "total_us": round(sum(totals.values()), 1),
                     "kernels_us": totals})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument(
        "--which", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd", "passing", "scan", "bwdseq"]
    )
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument(
        "--passing-blocks", nargs="+", default=["128", "256", "512", "1024", "2048", "4096"],
        help="state elements per program of the forward state_passing (--which passing)",
    )  # fmt: skip
    parser.add_argument(
        "--scan-configs", nargs="+",
        default=["64,8,2", "64,4,2", "64,8,1", "64,4,1", "64,8,3", "32,4,2", "128,8,2"],
        help="SUB,num_warps,num_stages of the forward output pass (--which scan)",
    )  # fmt: skip
    parser.add_argument(
        "--bwdseq-configs", nargs="+", default=["64,8,1", "64,4,1", "32,4,1", "32,8,1", "64,8,2", "32,4,2"],
        help="SUB,num_warps,num_stages of the sequential backward (--which bwdseq)",
    )  # fmt: skip
    parser.add_argument("--out", default=None)
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=[], help="forward breakdown per chunk")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_ssd_tiles.py needs a CUDA device")
    torch.manual_seed(0)
    rows = []
    for which in args.which:
        for seqlen in args.seqlens:
            configs = {"passing": args.passing_blocks, "scan": args.scan_configs}
            configs = {**configs, "bwdseq": args.bwdseq_configs}.get(which, args.configs)
            rows += sweep(which, seqlen, configs)
    print_table(
        ["pass", "seqlen", "config", "kernel us", "max rel diff", "error"],
        [
            [
                r["which"],
                r["seqlen"],
                r["config"],
                r.get("kernel_us"),
                r.get("max_rel_diff_vs_default"),
                r.get("error", ""),
            ]
            for r in rows
        ],  # fmt: skip
    )
    chunks = [r for seqlen in args.seqlens for r in chunk_breakdown(seqlen, args.chunk_sizes)]
    if args.out:
        write_json(args.out, {"env": environment(), "anchor": ANCHOR, "rows": rows, "chunk_sizes": chunks})


if __name__ == "__main__":
    main()
