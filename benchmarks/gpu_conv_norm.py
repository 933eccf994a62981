"""GPU benchmark of the memory-bound ops: causal depthwise conv1d and the RMS norms, Triton vs the PyTorch
backend (and the official `causal_conv1d_fn` / `mamba_ssm` norms when importable).

Conv anchor: bf16, batch 4, seqlen 8192, dim 4096, width 4, bias, SiLU, forward and forward+backward.
Norm anchor: bf16 rows (4 * 8192, 2048): RMSNorm, gated RMSNorm (group 2048 and 256, gate before the
norm as Mamba-2 does) and residual-add + RMSNorm with a float32 residual stream.

Bytes are the unavoidable traffic (each input read once, each output written once; the backward also
reads x, z, residual and dout again), so GB/s against the H100's ~3.0 TB/s copy bandwidth says how close
a kernel is to the memory floor. Times are triton.testing.do_bench medians (ms). Before timing, every
Triton result (outputs and gradients) is compared with the PyTorch backend: relative max error.

    python benchmarks/gpu_conv_norm.py --out results/gpu_conv_norm.json
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mambakit.ops import add_rms_norm, causal_conv1d, gated_rms_norm, rms_norm  # noqa: E402

from _common import environment, print_table, write_json  # noqa: E402

DEV = "cuda"
PEAK_GBS = 3000.0
CONV = dict(batch=4, seqlen=8192, dim=4096, width=4)
NORM_ROWS, NORM_DIM = 4 * 8192, 2048


def bench(fn: Callable[[], object], grad_to_none=None) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def fwd_bwd(fn: Callable[[], object], leaves: list[torch.Tensor]) -> Callable[[], None]:
    """A closure running fn's forward and backward against fixed random output gradients."""
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]

    def step():
        o = fn()
        o = o if isinstance(o, tuple) else (o,)
        torch.autograd.backward(list(o), grads)

    return step


def compare(make: Callable[[str], object], leaves: list[torch.Tensor]) -> float:
    """Largest relative error, Triton vs the PyTorch backend, over outputs and gradients of `leaves`."""
    res = {}
    for be in ("triton", "torch"):
        for t in leaves:
            t.grad = None
        outs = make(be)
        outs = outs if isinstance(outs, tuple) else (outs,)
        g = torch.Generator(device=DEV).manual_seed(0)
        douts = [torch.randn(o.shape, device=DEV, dtype=o.dtype, generator=g) for o in outs]
        torch.autograd.backward(list(outs), douts)
        res[be] = [o.detach() for o in outs] + [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    errs = [rel_err(a, b) for a, b in zip(res["triton"], res["torch"])]
    assert all(e == e for e in errs), "NaN in a Triton result"
    return max(errs)


def row(results: list, op: str, impl: str, mode: str, ms: float | None, nbytes: float, err: float | None):
    gbs = None if ms is None else nbytes / ms / 1e6
    results.append(
        dict(
            op=op,
            impl=impl,
            mode=mode,
            ms=ms,
            gb_per_s=gbs,
            pct_of_peak=None if gbs is None else 100 * gbs / PEAK_GBS,
            rel_err_vs_torch=err,
        )
    )


def try_time(results, op, impl, mode, fn, nbytes, err=None, grad_to_none=None):
    try:
        ms = bench(fn, grad_to_none)
    except Exception:  # a failing comparison point is reported, not fatal
        traceback.print_exc()
        ms = None
    row(results, op, impl, mode, ms, nbytes, err)


def bench_conv(results: list, bwd_configs: list[str]) -> None:
    b, l, d, w = CONV["batch"], CONV["seqlen"], CONV["dim"], CONV["width"]
    x = torch.randn(b, l, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(d, w, device=DEV) / w).requires_grad_()
    bias = torch.randn(d, device=DEV).requires_grad_()
    leaves = [x, weight, bias]
    act = x.numel() * x.element_size()

    def conv(be):
        return causal_conv1d(x, weight, bias, "silu", backend=be)

    err = compare(conv, leaves)
    print(f"conv1d: Triton vs torch backend, max relative error (out, dx, dweight, dbias) {err:.2e}")
    for be in ("triton", "torch"):
        e = err if be == "triton" else None
        with torch.no_grad():
            try_time(results, "conv1d", be, "fwd", lambda be=be: conv(be), 2 * act, e)
        try_time(
            results, "conv1d", be, "fwd+bwd", fwd_bwd(lambda be=be: conv(be), leaves), 5 * act, e, leaves
        )

    if bwd_configs:
        # the backward's tile configs side by side (MAMBAKIT_CONV_BWD_CONFIG), fwd+bwd of the Triton op
        step = fwd_bwd(lambda: conv("triton"), leaves)
        for cfg in bwd_configs:
            os.environ["MAMBAKIT_CONV_BWD_CONFIG"] = cfg
            try_time(results, "conv1d", f"triton bwd {cfg}", "fwd+bwd", step, 5 * act, None, leaves)
        os.environ.pop("MAMBAKIT_CONV_BWD_CONFIG")

    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        print("causal_conv1d not importable: no official comparison")
        return

    # the official op takes (batch, dim, seqlen); a transposed view of ours is its channel-last layout
    def official():
        return causal_conv1d_fn(x.transpose(1, 2), weight, bias, activation="silu").transpose(1, 2)

    try:  # a failing comparison point is reported, not fatal
        with torch.no_grad():
            e = rel_err(official(), conv("torch"))
            try_time(results, "conv1d", "official(channel-last)", "fwd", official, 2 * act, e)
        step = fwd_bwd(official, leaves)
        try_time(results, "conv1d", "official(channel-last)", "fwd+bwd", step, 5 * act, e, leaves)
    except Exception:
        traceback.print_exc()


def bench_norms(results: list) -> None:
    m, d = NORM_ROWS, NORM_DIM
    bf = dict(device=DEV, dtype=torch.bfloat16)
    x = torch.randn(m, d, **bf, requires_grad=True)
    z = torch.randn(m, d, **bf, requires_grad=True)
    res = torch.randn(m, d, device=DEV, requires_grad=True)
    w = torch.randn(d, device=DEV, requires_grad=True)
    n = m * d

    def gated(group):
        return lambda be: gated_rms_norm(x, z, w, 1e-5, group, False, backend=be)

    cases = [
        ("rms_norm", lambda be: rms_norm(x, w, backend=be), [x, w], 4 * n, 6 * n),
        ("gated(g=2048)", gated(None), [x, z, w], 6 * n, 10 * n),
        ("gated(g=256)", gated(256), [x, z, w], 6 * n, 10 * n),
        # x bf16 + residual fp32 -> normed bf16 + residual fp32; backward adds dresidual_out (fp32)
        (
            "add_rms_norm",
            lambda be: add_rms_norm(x, res, w, 1e-5, True, backend=be),
            [x, res, w],
            12 * n,
            18 * n,
        ),
    ]
    for name, fn, leaves, fwd_bytes, bwd_bytes in cases:
        err = compare(fn, leaves)
        print(f"{name}: Triton vs torch backend, max relative error {err:.2e}")
        for be in ("triton", "torch"):
            e = err if be == "triton" else None
            with torch.no_grad():
                try_time(results, name, be, "fwd", lambda be=be, fn=fn: fn(be), fwd_bytes, e)
            step = fwd_bwd(lambda be=be, fn=fn: fn(be), leaves)
            try_time(results, name, be, "fwd+bwd", step, fwd_bytes + bwd_bytes, e, leaves)

    try:
        from mamba_ssm.ops.triton.layer_norm import rms_norm_fn
    except Exception:
        print("mamba_ssm not importable: no official norm comparison")
        return

    def official():
        return rms_norm_fn(x, w, None, residual=res, eps=1e-5, prenorm=True, residual_in_fp32=True)

    try:  # a failing comparison point is reported, not fatal
        with torch.no_grad():
            e = rel_err(official()[0], add_rms_norm(x, res, w, 1e-5, True, backend="torch")[0])
            try_time(results, "add_rms_norm", "official", "fwd", official, 12 * n, e)
        step = fwd_bwd(official, [x, res, w])
        try_time(results, "add_rms_norm", "official", "fwd+bwd", step, 30 * n, e, [x, res, w])
    except Exception:
        traceback.print_exc()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-norms", action="store_true")
    parser.add_argument("--skip-conv", action="store_true")
    parser.add_argument(
        "--conv-shape", default=None, help="batch,seqlen,dim of the conv (default the anchor 4,8192,4096)"
    )
    parser.add_argument(
        "--bwd-configs", nargs="*", default=[], help="conv backward configs 'block_l,block_d,warps,per_sm'"
    )
    parser.add_argument("--out", default=None, help="write results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_conv_norm.py needs a CUDA device")
    results: list = []
    if args.conv_shape:
        CONV["batch"], CONV["seqlen"], CONV["dim"] = (int(v) for v in args.conv_shape.split(","))
    if not args.skip_conv:
        bench_conv(results, args.bwd_configs)
    if not args.skip_norms:
        bench_norms(results)
    headers = ["op", "impl", "mode", "ms", "GB/s", "% of 3.0 TB/s", "rel err vs torch"]
    print_table(
        headers,
        [
            [
                r["op"],
                r["impl"],
                r["mode"],
                r["ms"],
                r["gb_per_s"],
                r["pct_of_peak"],
                None if r["rel_err_vs_torch"] is None else f"{r['rel_err_vs_torch']:.1e}",
            ]
            for r in results
        ],
    )
    if args.out:
        write_json(
            args.out, {"env": environment(), "conv": CONV, "norm": [NORM_ROWS, NORM_DIM], "results": results}
        )


if __name__ == "__main__":
    main()
