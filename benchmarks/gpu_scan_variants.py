"""GPU sweep of the Mamba-1 selective-scan kernel variants side by side in one process: the tile-scan kernels
(`scan_fwd.py` / `scan_bwd.py`) against the step-loop kernels (`seq_fwd.py` / `seq_bwd.py`), over their
launch configurations, at the anchor shape (batch 4, dim 4096, dstate 16, one group, bf16 x/dt/B/C/z, fp32
A/D/dt_bias, D, z, dt_bias, softplus). Every variant's output is checked against the tile kernel's (and,
once, against the float32 PyTorch backend) before it is timed; a wrong variant prints its error and no time.

    python benchmarks/gpu_scan_variants.py --out bench_out/scan_variants.json
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_selective_scan import ANCHOR, bench, make_inputs, scan_bytes  # noqa: E402

from mambakit.ops.selective_scan.triton.scan_bwd import selective_scan_bwd  # noqa: E402
from mambakit.ops.selective_scan.triton.scan_fwd import selective_scan_fwd  # noqa: E402

from _common import environment, print_table, write_json  # noqa: E402

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")


def _with_env(env: dict, fn):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: v for k, v in env.items() if v is not None})
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
    try:
        return fn()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def variants(
    kind: str, bwd_maxnreg=("0", "168"), bwd_chunks=(6, 12), bwd_configs=("",)
) -> list[tuple[str, dict]]:
    if kind == "bwd":
        return _bwd_variants(bwd_maxnreg, bwd_chunks, bwd_configs)
    out = [("tile default", {"MAMBAKIT_SCAN_KERNEL": "tile"})]
    # (BLOCK_D, num_warps, num_stages): 1, 2 or 4 channels a thread (sm_90 SASS, 2026-12-01: 415, 353
    # and 299 instructions a channel-step over the two passes) and several warps
    for cfg in [(32, 1, 1), (64, 1, 1), (128, 1, 1), (64, 2, 1), (128, 2, 1), (128, 4, 1), (256, 2, 1)]:
        env = {"MAMBAKIT_SCAN_KERNEL": "seq", "MAMBAKIT_SCAN_SEQ_CONFIG": ",".join(map(str, cfg))}
        out.append((f"seq {cfg}", env))
    out.append(("seq default", {"MAMBAKIT_SCAN_KERNEL": "seq"}))
    out.append(("seq default, fp32 B/C", {"MAMBAKIT_SCAN_KERNEL": "seq", "MAMBAKIT_SCAN_BC_FP32": "1"}))
    for chunks in (4, 8, 16):
        for cfg in ((64, 1, 1), (128, 1, 1)):
            env = {
                "MAMBAKIT_SCAN_KERNEL": "seq",
                "MAMBAKIT_SCAN_SEQ_CONFIG": ",".join(map(str, cfg)),
                "MAMBAKIT_SCAN_SEQ_CHUNKS": str(chunks),
            }
            out.append((f"seq {cfg}, {chunks} seq chunks", env))
    return out


def _bwd_variants(maxnregs, chunk_counts, configs=("",)) -> list[tuple[str, dict]]:
    """The tile-scan backward (the reference of the comparison), then the step-loop backward over its
    configs ("BLOCK_D,num_warps,SEG,PRELOAD"; "" the default), register caps and sequence chunks."""
    out = [("tile bwd default", {"MAMBAKIT_SCAN_BWD_KERNEL": "tile"})]
    out.append(("seq bwd default", {"MAMBAKIT_SCAN_BWD_KERNEL": "seq"}))
    for config in configs:
        for maxnreg in maxnregs:
            for chunks in chunk_counts:
                env = {
                    "MAMBAKIT_SCAN_BWD_KERNEL": "seq",
                    "MAMBAKIT_SCAN_BWD_SEQ_CHUNKS": str(chunks),
                    "MAMBAKIT_SCAN_BWD_MAXNREG": maxnreg,
                }
                if config:
                    env["MAMBAKIT_SCAN_BWD_SEQ_CONFIG"] = config
                name = f"seq bwd {config or 'default config'}, maxnreg {maxnreg}, {chunks} chunks"
                out.append((name, env))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--kinds", nargs="+", default=["fwd", "bwd"])
    parser.add_argument("--out", default="bench_out/scan_variants.json")
    parser.add_argument("--bwd-maxnreg", nargs="+", default=["0", "168"], help="register caps (0: none)")
    parser.add_argument("--bwd-chunks", nargs="+", type=int, default=[6, 12], help="sequence chunks")
    parser.add_argument(
        "--bwd-configs", nargs="+", default=[""], help='"BLOCK_D,num_warps,SEG,PRELOAD" ("" the default)'
    )
    args = parser.parse_args()
    a = ANCHOR
    rows, results = [], []
    for seqlen in args.seqlens:
        torch.manual_seed(seqlen)
        ins = make_inputs(a["batch"], seqlen, a["dim"], a["dstate"], a["ngroups"])
        call = [ins[k] for k in NAMES] + [True, None, None]
        dy = torch.randn_like(ins["x"])
        for kind in args.kinds:
            ref = None
            for name, env in variants(kind, args.bwd_maxnreg, args.bwd_chunks, args.bwd_configs):

                def fn(kind=kind, call=call, dy=dy):
                    if kind == "fwd":
                        return selective_scan_fwd(*call)
                    return selective_scan_bwd(dy, None, *call)

                try:
                    out = _with_env(env, fn)
                    out = [o for o in out if o is not None]
                    if ref is None:
                        ref = out
                        err = 0.0
                    else:
                        err = max(rel(o, r) for o, r in zip(out, ref))
                    ms = None
                    if err == err and err < 2e-2:
                        ms = _with_env(env, lambda fn=fn: bench(fn))
                except Exception:
                    traceback.print_exc()
                    err, ms = float("nan"), None
                nbytes = scan_bytes(a["batch"], seqlen, a["dim"], a["dstate"], a["ngroups"], kind == "bwd")
                if kind == "bwd":
                    nbytes -= scan_bytes(a["batch"], seqlen, a["dim"], a["dstate"], a["ngroups"], False)
                gbs = nbytes / ms / 1e6 if ms else None
                rows.append([kind, seqlen, name, ms, gbs, err])
                results.append(
                    dict(kind=kind, seqlen=seqlen, variant=name, env=env, ms=ms, gb_s=gbs, rel_err=err)
                )
                print(f"{kind} L={seqlen} {name}: {ms} ms, rel err vs tile {err:.2e}", flush=True)
            del ref
            torch.cuda.empty_cache()
    print_table(["kind", "seqlen", "variant", "ms", "GB/s", "rel err vs tile"], rows)
    write_json(args.out, {"environment": environment(), "anchor": a, "results": results})


if __name__ == "__main__":
    main()
