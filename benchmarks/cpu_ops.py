"""CPU benchmark of every op: the "reference" backend against the "torch" backend, forward, fp32.

Shapes are those of one 130M layer at `--seqlen` (default 2048), batch 1: Mamba-1 selective scan
(dim 1536, dstate 16), Mamba-2 SSD (24 heads of 64, dstate 128, `--chunk-size`), conv1d (dim 1536,
width 4, SiLU), RMSNorm and add+RMSNorm (dim 768), gated RMSNorm (dim 1536). A backend whose module is
missing is reported as not available. Prints a table and writes JSON.

    python benchmarks/cpu_ops.py --threads 2 --out bench_out/cpu_ops.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mambakit import ops  # noqa: E402

from _common import environment, print_table, time_ms, write_json  # noqa: E402


def _randn(*shape: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def op_cases(seqlen: int, chunk_size: int) -> dict:
    """name -> (shape description, call(backend)); inputs are built once, here."""
    g = torch.Generator().manual_seed(0)
    L = seqlen

    d, n = 1536, 16  # Mamba-1 130M: d_inner 1536, dstate 16, one group
    s6 = dict(
        x=_randn(1, L, d, gen=g),
        dt=_randn(1, L, d, gen=g, scale=0.5) - 4.0,  # softplus(dt + bias) of a trained layer's size
        A=-torch.rand(d, n, generator=g) * n,
        B=_randn(1, L, 1, n, gen=g),
        C=_randn(1, L, 1, n, gen=g),
        D=_randn(d, gen=g),
        z=_randn(1, L, d, gen=g),
        dt_bias=_randn(d, gen=g, scale=0.1),
    )
    h, p, n2 = 24, 64, 128  # Mamba-2 130M: 24 heads of 64, dstate 128, one group
    m2 = dict(
        x=_randn(1, L, h, p, gen=g),
        dt=_randn(1, L, h, gen=g, scale=0.5) - 4.0,
        A=-torch.rand(h, generator=g) * 16,
        B=_randn(1, L, 1, n2, gen=g),
        C=_randn(1, L, 1, n2, gen=g),
        D=_randn(h, gen=g),
        z=_randn(1, L, h, p, gen=g),
        dt_bias=_randn(h, gen=g, scale=0.1),
    )
    conv_x, conv_w, conv_b = _randn(1, L, d, gen=g), _randn(d, 4, gen=g, scale=0.5), _randn(d, gen=g)
    x768, r768, w768 = _randn(1, L, 768, gen=g), _randn(1, L, 768, gen=g), _randn(768, gen=g)
    x1536, z1536, w1536 = _randn(1, L, d, gen=g), _randn(1, L, d, gen=g), _randn(d, gen=g)

    return {
        "selective_scan": (
            f"b1 l{L} dim{d} n{n}",
            lambda be: ops.selective_scan(**s6, dt_softplus=True, backend=be),
        ),
        "ssd": (
            f"b1 l{L} h{h} p{p} n{n2} chunk{chunk_size}",
            lambda be: ops.ssd(**m2, chunk_size=chunk_size, dt_softplus=True, backend=be),
        ),
        "causal_conv1d": (
            f"b1 l{L} dim{d} w4 silu",
            lambda be: ops.causal_conv1d(conv_x, conv_w, conv_b, "silu", backend=be),
        ),
        "rms_norm": (f"b1 l{L} dim768", lambda be: ops.rms_norm(x768, w768, backend=be)),
        "gated_rms_norm": (
            f"b1 l{L} dim{d} group{d}",
            lambda be: ops.gated_rms_norm(x1536, z1536, w1536, backend=be),
        ),
        "add_rms_norm": (f"b1 l{L} dim768", lambda be: ops.add_rms_norm(x768, r768, w768, backend=be)),
    }


def machine_probe() -> dict:
    """What the shared machine gives right now: load average and two quick speed probes.

    The 2-core VM shares its host with other jobs that the load average inside the VM does not see;
    a 1024^3 matmul (GFLOP/s) and an elementwise pass over 16 MB (ms) show when they take the
    cores or memory bandwidth (on a quiet machine about 330 GFLOP/s and 0.7 ms at 2 threads).
    """
    a, v = torch.randn(1024, 1024), torch.randn(4_000_000)
    best_mm, best_mul = float("inf"), float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(5):
            a @ a
        t1 = time.perf_counter()
        for _ in range(5):
            v.mul(1.0001)
        t2 = time.perf_counter()
        best_mm, best_mul = min(best_mm, (t1 - t0) / 5), min(best_mul, (t2 - t1) / 5)
    return {
        "loadavg": os.getloadavg(),
        "matmul_gflops": 2 * 1024**3 / best_mm / 1e9,
        "mul_16MB_ms": best_mul * 1e3,
    }


def format_probe(p: dict) -> str:
    load = ", ".join(f"{x:.2f}" for x in p["loadavg"])
    return f"load {load}; matmul {p['matmul_gflops']:.0f} GFLOP/s; 16 MB mul {p['mul_16MB_ms']:.2f} ms"


def bench_backend(call, backend: str, repeats: int, warmup: int, min_time_s: float) -> dict:
    """Time one backend; a missing backend module is 'not available', any other failure an error."""
    try:
        with torch.inference_mode():
            return {"status": "ok", **time_ms(lambda: call(backend), repeats, warmup, min_time_s)}
    except (ImportError, NotImplementedError) as e:
        return {"status": "not available", "error": f"{type(e).__name__}: {e}"}
    except Exception as e:  # report and go on: one broken op should not hide the others' numbers
        traceback.print_exc()
        return {"status": "error", "error": f"{type(e).__name__}: {e}"}


def _shown(r: dict) -> object:
    return r["median_ms"] if r["status"] == "ok" else r["status"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--chunk-size", type=int, default=256, help="SSD chunk size")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs of the torch backend")
    ap.add_argument("--ref-repeats", type=int, default=3, help="timed runs of the (slow) reference")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--min-time", type=float, default=1.0, help="keep timing fast ops for this many seconds")
    ap.add_argument("--ops", nargs="*", default=None, help="only these ops (default: all)")
    ap.add_argument("--out", default="bench_out/cpu_ops.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    probe_before = machine_probe()
    print(f"machine before: {format_probe(probe_before)}", file=sys.stderr, flush=True)
    cases = op_cases(args.seqlen, args.chunk_size)
    names = args.ops or list(cases)
    unknown = sorted(set(names) - set(cases))
    if unknown:
        ap.error(f"--ops: unknown {unknown}; choose from {list(cases)}")

    results, rows = [], []
    for name in names:
        shape, call = cases[name]
        ref = bench_backend(call, "reference", args.ref_repeats, args.warmup, args.min_time)
        fast = bench_backend(call, "torch", args.repeats, args.warmup, args.min_time)
        ref_ms = ref.get("median_ms")
        fast_ms = fast.get("median_ms")
        speedup = ref_ms / fast_ms if ref_ms and fast_ms else None
        results.append({"op": name, "shape": shape, "reference": ref, "torch": fast, "speedup": speedup})

        rows.append(
            (
                name,
                shape,
                _shown(ref),
                _shown(fast),
                None if speedup is None else f"{speedup:.1f}x",
                ref.get("min_ms"),
                fast.get("min_ms"),
            )
        )
        print(
            f"{name}: reference {ref.get('status')}, torch {fast.get('status')}", file=sys.stderr, flush=True
        )

    probe_after = machine_probe()
    print(f"\nmachine before: {format_probe(probe_before)}\nmachine after:  {format_probe(probe_after)}")
    print(f"CPU ops, fp32 forward, {args.threads} threads: median ms (speedup of medians), and min ms")
    headers = ("op", "shape", "reference ms", "torch ms", "speedup", "reference min", "torch min")
    print_table(headers, rows)
    write_json(
        args.out,
        {
            "benchmark": "cpu_ops",
            "environment": environment(),
            "machine": {"before": probe_before, "after": probe_after},
            "args": vars(args),
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
