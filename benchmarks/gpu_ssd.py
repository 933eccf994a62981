"""GPU benchmark of the SSD (Mamba-2) scan: Triton kernels vs the chunked PyTorch backend, PyTorch SDPA
flash attention and (when importable) the official `mamba_chunk_scan_combined`.

Anchor shape: batch 4, nheads 64, headdim 64, ngroups 1, dstate 128, chunk 256, bf16 x/B/C, fp32 dt,
D per head, dt_bias, softplus; seqlen 2048, 8192, 16384. Attention: batch 4, 16 heads of 128, causal,
bf16. Times are triton.testing.do_bench medians (ms) on random inputs. Before timing, the Triton
result is compared with the PyTorch backend (relative max error of y, and of every gradient for the
forward+backward rows). Also a 1M-token forward (batch 1, nheads 8): finite output and peak memory.

FLOPs count one multiply-add as 2, the anchor's convention: forward = b*L*h*(4*P*N + 2*Q*P) +
b*L*g*2*Q*N (chunk states, state-to-output, intra-chunk scores x values over the full chunk square,
C B^T per group); forward+backward = 3x forward. Bytes = the unavoidable traffic (x, y read/written
once, B, C, dt), so GB/s says how close the forward is to the memory floor.

    python benchmarks/gpu_ssd.py --out results/gpu_ssd.json
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mambakit.ops.ssd import ssd  # noqa: E402

from _common import environment, print_table, profile_kernels, write_json  # noqa: E402

DEV = "cuda"
ANCHOR = dict(batch=4, nheads=64, headdim=64, ngroups=1, dstate=128, chunk=256)


def bench(fn, grad_to_none=None) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median"))


def make_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, dtype=torch.bfloat16, requires_grad=False):
    dev = DEV
    ins = dict(
        x=torch.randn(batch, seqlen, nheads, headdim, device=dev, dtype=dtype),
        dt=torch.randn(batch, seqlen, nheads, device=dev) * 0.5 - 1.0,
        A=-torch.rand(nheads, device=dev) * 4 - 0.5,
        B=torch.randn(batch, seqlen, ngroups, dstate, device=dev, dtype=dtype),
        C=torch.randn(batch, seqlen, ngroups, dstate, device=dev, dtype=dtype),
        D=torch.randn(nheads, device=dev),
        dt_bias=torch.randn(nheads, device=dev) * 0.5,
    )
    if requires_grad:
        for v in ins.values():
            v.requires_grad_(True)
    return ins


def ssd_flops(batch, seqlen, nheads, headdim, ngroups, dstate, chunk) -> float:
    per_token_head = 4 * headdim * dstate + 2 * chunk * headdim
    return batch * seqlen * (nheads * per_token_head + ngroups * 2 * chunk * dstate)


def ssd_bytes(batch, seqlen, nheads, headdim, ngroups, dstate, elt=2) -> float:
    return batch * seqlen * (2 * nheads * headdim * elt + 2 * ngroups * dstate * elt + nheads * 4)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def run_ssd(backend: str, ins: dict, chunk: int):
    return ssd(**ins, chunk_size=chunk, dt_softplus=True, backend=backend)


def check_against_torch(ins_grad: dict, chunk: int) -> dict:
    """Relative max errors of y and of each gradient, Triton vs the PyTorch backend on the same inputs."""
    out = {}
    grads = {}
    for be in ("triton", "torch"):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in ins_grad.items()}
        y = run_ssd(be, leaves, chunk)
        gen = torch.Generator(device=y.device).manual_seed(0)
        g = torch.randn(y.shape, device=y.device, dtype=y.dtype, generator=gen)
        y.backward(g)
        grads[be] = (y.detach(), {k: v.grad for k, v in leaves.items()})
        del y, leaves
    out["y"] = rel_err(grads["triton"][0], grads["torch"][0])
    for k in ins_grad:
        out[f"d{k}"] = rel_err(grads["triton"][1][k], grads["torch"][1][k])
    out["finite"] = bool(torch.isfinite(grads["triton"][0]).all()) and all(
        bool(torch.isfinite(v).all()) for v in grads["triton"][1].values()
    )
    return out


def time_ssd(backend: str, seqlen: int, check: bool) -> dict:
    a = ANCHOR
    shape = (a["batch"], seqlen, a["nheads"], a["headdim"], a["ngroups"], a["dstate"])
    flops = ssd_flops(*shape, a["chunk"])
    res = {"backend": backend, "seqlen": seqlen}
    ins = make_inputs(*shape)
    res["fwd_ms"] = bench(lambda: run_ssd(backend, ins, a["chunk"]))
    insg = make_inputs(*shape, requires_grad=True)
    if check and backend == "triton":
        try:
            res["rel_err_vs_torch"] = check_against_torch(insg, a["chunk"])
        except torch.OutOfMemoryError as e:  # the PyTorch backend's (chunk x chunk) tensors at long seqlen
            res["check_error"] = f"OutOfMemoryError: {e}"[:200]
            torch.cuda.empty_cache()
    gy = torch.randn(a["batch"], seqlen, a["nheads"], a["headdim"], device=DEV, dtype=torch.bfloat16)

    def fwd_bwd():
        run_ssd(backend, insg, a["chunk"]).backward(gy)

    res["fwd_bwd_ms"] = bench(fwd_bwd, grad_to_none=list(insg.values()))
    res["fwd_tflops"] = flops / res["fwd_ms"] / 1e9
    res["fwd_bwd_tflops"] = 3 * flops / res["fwd_bwd_ms"] / 1e9
    res["fwd_gbps"] = ssd_bytes(*shape) / res["fwd_ms"] / 1e6
    return res


def time_ssd_graph(seqlen: int) -> dict:
    """The Triton forward replayed from a CUDA graph: its GPU time without the host's launch work (the
    eager `triton` row is host-bound where the kernels are short, e.g. at seqlen 2048)."""
    a = ANCHOR
    shape = (a["batch"], seqlen, a["nheads"], a["headdim"], a["ngroups"], a["dstate"])
    ins = make_inputs(*shape)
    with torch.no_grad():
        for _ in range(2):  # compile and autotune before the capture
            run_ssd("triton", ins, a["chunk"])
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run_ssd("triton", ins, a["chunk"])
    return {"backend": "triton (graph replay)", "seqlen": seqlen, "fwd_ms": bench(graph.replay)}


def time_official(seqlen: int) -> dict | None:
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:
        return None
    a = ANCHOR
    shape = (a["batch"], seqlen, a["nheads"], a["headdim"], a["ngroups"], a["dstate"])
    flops = ssd_flops(*shape, a["chunk"])

    def run(ins):
        return mamba_chunk_scan_combined(
            ins["x"], ins["dt"], ins["A"], ins["B"], ins["C"], a["chunk"], D=ins["D"],
            dt_bias=ins["dt_bias"], dt_softplus=True,
        )  # fmt: skip

    ins = make_inputs(*shape)
    res = {"backend": "mamba_ssm", "seqlen": seqlen, "fwd_ms": bench(lambda: run(ins))}
    insg = make_inputs(*shape, requires_grad=True)
    gy = torch.randn(a["batch"], seqlen, a["nheads"], a["headdim"], device=DEV, dtype=torch.bfloat16)
    res["fwd_bwd_ms"] = bench(lambda: run(insg).backward(gy), grad_to_none=list(insg.values()))
    res["fwd_tflops"] = flops / res["fwd_ms"] / 1e9
    res["fwd_bwd_tflops"] = 3 * flops / res["fwd_bwd_ms"] / 1e9
    res["fwd_gbps"] = ssd_bytes(*shape) / res["fwd_ms"] / 1e6
    res["rel_err_vs_triton"] = rel_err(run(ins), run_ssd("triton", ins, a["chunk"]))
    return res


def time_sdpa(seqlen: int) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, d = 4, 16, 128
    q, k, v = (
        torch.randn(b, h, seqlen, d, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
    )
    flops = 4 * b * h * seqlen * seqlen * d / 2  # causal half
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fwd = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        go = torch.randn_like(q)
        fb = bench(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(go),
            grad_to_none=[q, k, v],
        )
    return {
        "backend": "sdpa_flash",
        "seqlen": seqlen,
        "fwd_ms": fwd,
        "fwd_bwd_ms": fb,
        "fwd_tflops": flops / fwd / 1e9,
        "fwd_bwd_tflops": 3.5 * flops / fb / 1e9,  # backward of attention is ~2.5 forwards
    }


def kernel_breakdown(seqlen: int) -> list[dict]:
    """GPU time per kernel (ms per call) of one Triton forward+backward at the anchor, from torch.profiler."""
    a = ANCHOR
    shape = (a["batch"], seqlen, a["nheads"], a["headdim"], a["ngroups"], a["dstate"])
    insg = make_inputs(*shape, requires_grad=True)
    gy = torch.randn(a["batch"], seqlen, a["nheads"], a["headdim"], device=DEV, dtype=torch.bfloat16)
    return profile_kernels(lambda: run_ssd("triton", insg, a["chunk"]).backward(gy))


def tuned_kernels() -> dict:
    """The autotuned per-chunk SSD kernels, by name."""
    from mambakit.ops.ssd.triton import bwd_chunk, chunk_scan

    return {
        "chunk_scan_fwd": chunk_scan.chunk_scan_fwd_tuned,
        "chunk_bwd_dx": bwd_chunk.chunk_bwd_dx_kernel,
        "chunk_bwd_dB": bwd_chunk.chunk_bwd_dB_kernel,
        "chunk_bwd_dC": bwd_chunk.chunk_bwd_dC_kernel,
    }


def tuned_configs() -> dict:
    """The tile config the autotuner chose for each per-chunk SSD kernel (at the last tuned shape)."""
    return {name: str(getattr(k, "best_config", None)) for name, k in tuned_kernels().items()}


def tuning_timings() -> dict:
    """Each per-chunk SSD kernel's autotuning trials at the last shape it was tuned for: config -> ms
    (Triton's median of its own benchmark runs), fastest first."""
    out = {}
    for name, k in tuned_kernels().items():
        timings = getattr(getattr(k, "tuned", None), "configs_timings", None) or {}
        ms = {str(c): (t[0] if isinstance(t, (list, tuple)) else t) for c, t in timings.items()}
        out[name] = dict(sorted(ms.items(), key=lambda kv: kv[1]))
    return out


def million_tokens() -> dict:
    seqlen = 1 << 20
    ins = make_inputs(1, seqlen, 8, 64, 1, 128)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y = run_ssd("triton", ins, 256)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = bench(lambda: run_ssd("triton", ins, 256))
    return {
        "seqlen": seqlen,
        "finite": bool(torch.isfinite(y).all()),
        "peak_extra_gb": peak / 1e9,
        "fwd_ms": ms,
        "tokens_per_s": seqlen / ms * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument(
        "--backends", nargs="+", default=["triton", "triton-graph", "torch", "mamba_ssm", "sdpa"]
    )
    parser.add_argument("--skip-million", action="store_true")
    parser.add_argument(
        "--breakdown", type=int, default=8192, help="seqlen of the per-kernel profile (0: none)"
    )
    parser.add_argument("--out", default=None, help="write results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_ssd.py needs a CUDA device")
    torch.manual_seed(0)

    rows, results = [], []
    for seqlen in args.seqlens:
        for name in args.backends:
            try:
                if name in ("triton", "torch"):
                    r = time_ssd(name, seqlen, check=True)
                elif name == "triton-graph":
                    r = time_ssd_graph(seqlen)
                elif name == "mamba_ssm":
                    r = time_official(seqlen)
                    if r is None:
                        continue
                else:
                    r = time_sdpa(seqlen)
            except Exception as e:  # e.g. out of memory for the PyTorch backend at long seqlen
                traceback.print_exc()
                r = {"backend": name, "seqlen": seqlen, "error": f"{type(e).__name__}: {e}"[:300]}
            torch.cuda.empty_cache()
            results.append(r)
            err = r.get("rel_err_vs_torch", {})
            rows.append([
                seqlen, r["backend"], r.get("fwd_ms"), r.get("fwd_bwd_ms"), r.get("fwd_tflops"),
                r.get("fwd_bwd_tflops"), r.get("fwd_gbps"),
                None if not err else f"{max(v for k, v in err.items() if k != 'finite'):.2e}",
                r.get("error", ""),
            ])  # fmt: skip
            print(r, flush=True)
    print_table(
        [
            "seqlen",
            "impl",
            "fwd ms",
            "fwd+bwd ms",
            "fwd TFLOP/s",
            "f+b TFLOP/s",
            "fwd GB/s",
            "max rel err",
            "error",
        ],
        rows,
    )
    breakdown = timings = None
    if args.breakdown:
        try:
            breakdown = kernel_breakdown(args.breakdown)
            print("tuned tiles:", tuned_configs())
            timings = tuning_timings()
            for name, trials in timings.items():
                print(f"{name} tuning trials (ms):")
                for config, ms in trials.items():
                    print(f"  {ms:8.3f}  {config}")
            print(f"Triton forward+backward at seqlen {args.breakdown}, GPU time per kernel:")
            print_table(
                ["kernel", "ms", "launches"],
                [[r["kernel"], r["ms_per_call"], r["launches"]] for r in breakdown],
            )
        except Exception as e:
            traceback.print_exc()
            breakdown = [{"error": f"{type(e).__name__}: {e}"[:300]}]
    million = None
    if not args.skip_million:
        try:
            million = million_tokens()
        except Exception as e:
            traceback.print_exc()
            million = {"error": f"{type(e).__name__}: {e}"[:300]}
        print("1M tokens (batch 1, nheads 8, headdim 64, dstate 128, bf16):", million)
    if args.out:
        write_json(
            args.out,
            {
                "env": environment(),
                "anchor": ANCHOR,
                "results": results,
                "million": million,
                "breakdown": breakdown,
                "tuning_trials_ms": timings,
            },
        )


if __name__ == "__main__":
    main()
