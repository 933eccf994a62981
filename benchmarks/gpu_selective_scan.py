"""GPU benchmark of the Mamba-1 selective scan: Triton kernels vs the chunked PyTorch backend and (when
importable) the official CUDA `selective_scan_fn` of mamba_ssm.

Anchor shape: batch 4, dim 4096, dstate 16, ngroups 1, bf16 x/dt/B/C/z, fp32 A/D/dt_bias, with D, z,
dt_bias and softplus; seqlen 2048 and 8192. Times are triton.testing.do_bench medians (ms) on random inputs.
Before timing, the Triton result is compared with the PyTorch backend (relative max error of y and of every
gradient). A small sweep of kernel tile configurations (BLOCK_L, BLOCK_D, num_warps) at seqlen 2048 picks
the forward and backward configurations used for the table (`--no-sweep` keeps the defaults). Also a
1M-token forward (batch 1, dim 1024, bf16): finite output and peak memory.

Bytes = the unavoidable traffic: forward reads x, dt, z, B, C and writes y; backward reads x, dt, z, B, C,
dy and writes dx, ddt, dz, dB, dC. GB/s = those bytes / time, so it says how close a kernel is to the
memory floor (the scan is compute bound well above it).

    python benchmarks/gpu_selective_scan.py --out results/gpu_selective_scan.json
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mambakit.ops.selective_scan import selective_scan  # noqa: E402

from _common import environment, print_table, profile_kernels, write_json  # noqa: E402

DEV = "cuda"
ANCHOR = dict(batch=4, dim=4096, dstate=16, ngroups=1)


def bench(fn, grad_to_none=None) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median"))


def make_inputs(batch, seqlen, dim, dstate, ngroups, dtype=torch.bfloat16, requires_grad=False) -> dict:
    ins = dict(
        x=torch.randn(batch, seqlen, dim, device=DEV, dtype=dtype),
        dt=(torch.randn(batch, seqlen, dim, device=DEV) * 0.5 - 1.0).to(dtype),
        A=-torch.rand(dim, dstate, device=DEV) * 4 - 0.5,
        B=torch.randn(batch, seqlen, ngroups, dstate, device=DEV, dtype=dtype),
        C=torch.randn(batch, seqlen, ngroups, dstate, device=DEV, dtype=dtype),
        D=torch.randn(dim, device=DEV),
        z=torch.randn(batch, seqlen, dim, device=DEV, dtype=dtype),
        dt_bias=torch.randn(dim, device=DEV) * 0.5,
    )
    if requires_grad:
        for v in ins.values():
            v.requires_grad_(True)
    return ins


def scan_bytes(batch, seqlen, dim, dstate, ngroups, backward: bool, elt: int = 2) -> float:
    act = batch * seqlen * dim * elt
    bc = 2 * batch * seqlen * ngroups * dstate * elt
    fwd = 4 * act + bc  # x, dt, z in; y out
    bwd = 7 * act + 2 * bc  # x, dt, z, dy in; dx, ddt, dz out; B, C in, dB, dC out
    return fwd + bwd if backward else fwd


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def run_scan(backend: str, ins: dict) -> torch.Tensor:
    return selective_scan(**ins, dt_softplus=True, backend=backend)


def check_against_torch(ins: dict) -> dict:
    """Relative max errors of y and each gradient, Triton vs the PyTorch backend (fp32 copies of the
    inputs for the PyTorch side, so the error is the Triton kernel's)."""
    out, grads = {}, {}
    dy = torch.randn_like(ins["x"])
    for be in ("triton", "torch"):
        leaf = {
            k: (v.detach().float() if be == "torch" else v.detach()).requires_grad_() for k, v in ins.items()
        }
        y = run_scan(be, leaf)
        y.backward(dy.to(y.dtype))
        grads[be] = {"y": y.detach(), **{k: v.grad for k, v in leaf.items()}}
        del y, leaf
    for k in grads["triton"]:
        t = grads["triton"][k]
        out[k] = rel_err(t, grads["torch"][k]) if torch.isfinite(t).all() else float("nan")
    return out


def official():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:
        return None
    return selective_scan_fn


def official_inputs(ins: dict) -> dict:
    """The official layout: u, delta, z (batch, dim, L); B, C (batch, ngroups, dstate, L)."""
    t = {k: v.detach() for k, v in ins.items()}
    out = dict(
        u=t["x"].transpose(1, 2).contiguous(),
        delta=t["dt"].transpose(1, 2).contiguous(),
        A=t["A"],
        B=t["B"].permute(0, 2, 3, 1).contiguous(),
        C=t["C"].permute(0, 2, 3, 1).contiguous(),
        D=t["D"],
        z=t["z"].transpose(1, 2).contiguous(),
        delta_bias=t["dt_bias"],
    )
    if ins["x"].requires_grad:
        for v in out.values():
            v.requires_grad_(True)
    return out


def time_row(name: str, fwd, seqlen: int, leaves: list[torch.Tensor] | None) -> list:
    """[name, seqlen, fwd ms, fwd GB/s, fwd+bwd ms, fwd+bwd GB/s]; an OOM or error gives '-' cells."""
    row = [name, seqlen, None, None, None, None]
    b = ANCHOR
    try:
        with torch.no_grad():
            ms = bench(fwd)
        row[2], row[3] = (
            ms,
            scan_bytes(b["batch"], seqlen, b["dim"], b["dstate"], b["ngroups"], False) / ms / 1e6,
        )
        if leaves is not None:
            first = fwd()
            dy = torch.randn_like(first)
            del first

            def fwd_bwd():
                fwd().backward(dy)

            ms = bench(fwd_bwd, grad_to_none=leaves)
            row[4] = ms
            row[5] = scan_bytes(b["batch"], seqlen, b["dim"], b["dstate"], b["ngroups"], True) / ms / 1e6
    except torch.cuda.OutOfMemoryError:
        print(f"{name} L={seqlen}: out of memory")
    except Exception:
        print(f"{name} L={seqlen} failed:")
        traceback.print_exc()
    torch.cuda.empty_cache()
    return row


FWD_CONFIGS = [(16, 16, 4), (16, 32, 4), (16, 32, 8), (32, 16, 4), (8, 32, 4), (16, 64, 8), (32, 32, 8)]
BWD_CONFIGS = [(16, 8, 4), (16, 16, 4), (16, 16, 8), (8, 16, 4), (32, 8, 4), (16, 32, 8), (8, 32, 4)]


def sweep(seqlen: int) -> dict:
    """Time the launchers directly over a few tile configurations; returns the best of each."""
    from mambakit.ops.selective_scan.triton.scan_bwd import selective_scan_bwd
    from mambakit.ops.selective_scan.triton.scan_fwd import selective_scan_fwd

    ins = make_inputs(ANCHOR["batch"], seqlen, ANCHOR["dim"], ANCHOR["dstate"], ANCHOR["ngroups"])
    args = [ins[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")] + [True, None, None]
    dy = torch.randn_like(ins["x"])
    result = {"fwd": {}, "bwd": {}}
    for cfg in FWD_CONFIGS:
        try:
            result["fwd"][str(cfg)] = bench(lambda cfg=cfg: selective_scan_fwd(*args, config=cfg))
        except Exception as e:  # a tile too large for the registers / shared memory
            result["fwd"][str(cfg)] = f"failed: {type(e).__name__}"
    for cfg in BWD_CONFIGS:
        try:
            result["bwd"][str(cfg)] = bench(lambda cfg=cfg: selective_scan_bwd(dy, None, *args, config=cfg))
        except Exception as e:
            result["bwd"][str(cfg)] = f"failed: {type(e).__name__}"
    for kind in ("fwd", "bwd"):
        timed = {k: v for k, v in result[kind].items() if isinstance(v, float)}
        result[f"best_{kind}"] = min(timed, key=timed.get) if timed else None
        print(f"sweep {kind} (L={seqlen}, ms): " + ", ".join(f"{k}: {v}" for k, v in result[kind].items()))
    return result


def million_token_forward() -> dict:
    dim, seqlen = 1024, 1 << 20
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ins = make_inputs(1, seqlen, dim, 16, 1)
    base = torch.cuda.max_memory_allocated()
    with torch.no_grad():
        y, final = selective_scan(**ins, dt_softplus=True, return_final_state=True, backend="triton")
        torch.cuda.synchronize()
        ms = bench(lambda: run_scan("triton", ins))
    out = {
        "batch": 1,
        "seqlen": seqlen,
        "dim": dim,
        "finite": bool(torch.isfinite(y).all() and torch.isfinite(final).all()),
        "fwd_ms": ms,
        "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30,
        "peak_above_inputs_GiB": (torch.cuda.max_memory_allocated() - base) / 2**30,
    }
    print(f"1M-token forward: {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/gpu_selective_scan.json")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--no-sweep", action="store_true", help="keep the default tile configurations")
    parser.add_argument("--skip-torch", action="store_true", help="skip the (slow, memory-hungry) torch rows")
    parser.add_argument(
        "--breakdown", type=int, default=0, help="seqlen of a per-kernel profile of fwd+bwd (0: none)"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    torch.manual_seed(0)
    payload: dict = {"environment": environment(), "anchor": ANCHOR}

    if not args.no_sweep:
        sw = sweep(2048)
        payload["sweep"] = sw
        if sw["best_fwd"]:
            os.environ["MAMBAKIT_SCAN_CONFIG"] = sw["best_fwd"].strip("()").replace(" ", "")
        if sw["best_bwd"]:
            os.environ["MAMBAKIT_SCAN_BWD_CONFIG"] = sw["best_bwd"].strip("()").replace(" ", "")
    payload["configs"] = {
        "fwd": os.environ.get("MAMBAKIT_SCAN_CONFIG", "default"),
        "bwd": os.environ.get("MAMBAKIT_SCAN_BWD_CONFIG", "default"),
    }
    print(f"tile configs (BLOCK_L, BLOCK_D, num_warps): {payload['configs']}")

    a = ANCHOR
    ins = make_inputs(a["batch"], 2048, a["dim"], a["dstate"], a["ngroups"])
    payload["check_vs_torch_L2048"] = errs = check_against_torch(ins)
    print("rel err triton vs torch (L=2048): " + ", ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    del ins
    torch.cuda.empty_cache()

    rows = []
    sel = official()
    for seqlen in args.seqlens:
        ins = make_inputs(a["batch"], seqlen, a["dim"], a["dstate"], a["ngroups"], requires_grad=True)
        leaves = list(ins.values())
        rows.append(time_row("triton", lambda ins=ins: run_scan("triton", ins), seqlen, leaves))
        if not args.skip_torch:
            rows.append(time_row("torch", lambda ins=ins: run_scan("torch", ins), seqlen, leaves))
        if sel is not None:
            off = official_inputs(ins)
            kw = {k: off[k] for k in ("D", "z", "delta_bias")}

            def run_official(off=off, kw=kw):
                return sel(off["u"], off["delta"], off["A"], off["B"], off["C"], **kw, delta_softplus=True)

            rows.append(time_row("mamba_ssm selective_scan_fn", run_official, seqlen, list(off.values())))
            del off, kw
        del ins, leaves
        torch.cuda.empty_cache()
    headers = ["impl", "seqlen", "fwd ms", "fwd GB/s", "fwd+bwd ms", "fwd+bwd GB/s"]
    print_table(headers, rows)
    payload["rows"] = [dict(zip(headers, r)) for r in rows]
    if sel is None:
        payload["official"] = "mamba_ssm not importable"

    if args.breakdown:
        ins = make_inputs(a["batch"], args.breakdown, a["dim"], a["dstate"], a["ngroups"], requires_grad=True)
        dy = torch.randn_like(ins["x"])
        leaves = list(ins.values())  # gradients returned, not accumulated into .grad (as in a model)
        payload["breakdown"] = rows = profile_kernels(
            lambda: torch.autograd.grad(run_scan("triton", ins), leaves, dy)
        )
        print(f"Triton forward+backward at seqlen {args.breakdown}, GPU time per kernel:")
        print_table(
            ["kernel", "ms", "launches"], [[r["kernel"], r["ms_per_call"], r["launches"]] for r in rows]
        )
        del ins, dy, leaves
        torch.cuda.empty_cache()

    try:
        payload["million_token_forward"] = million_token_forward()
    except Exception as e:
        traceback.print_exc()
        payload["million_token_forward"] = f"failed: {type(e).__name__}: {e}"
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
