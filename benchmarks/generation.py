"""Generation benchmark: decode latency and throughput, prefill speed, and Mamba vs a Transformer.

Random weights in the preset shapes, greedy decoding through `mambakit.inference.generate`.
On GPU (bf16, CUDA graphs unless --no-cuda-graph):
  decode    ms/token at batch 1 and tokens/s at batch 64 (prompt 128, 256 new tokens) for the
            130M and 1.4B/1.3B Mamba-1 and Mamba-2 presets; decoding state bytes per sequence.
  prefill   tokens/s of the chunked prefill at 2K and 16K tokens (batch 1).
  longctx   decode ms/token and peak memory after prompts of 1K, 4K, 16K, 64K tokens for a Mamba
            preset and a Transformer of the same size built from mambakit's attention and MLP
            layers (pattern "*-" repeated, GQA-free MHA, KV cache, SDPA): flat for Mamba, growing
            for attention.
On CPU (fp32): decode ms/token at batch 1 for the 130M presets.

    python benchmarks/generation.py --out bench_out/generation.json          # full
    python benchmarks/generation.py --quick                                   # a short run

Official numbers on one H100 (state-spaces/mamba) for reference: 1.4B Mamba-1 batch 1 2.28 ms/token;
130M batch 1 0.70 (Mamba-1) / 0.68 (Mamba-2) ms/token; batch 64 76.1K / 48.6K tokens/s (130M) and
19.9K / 9.6K tokens/s (1.4B / 1.3B).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mambakit.inference.generate import generate, prefill  # noqa: E402
from mambakit.models.config import AttentionConfig, MLPConfig, ModelConfig  # noqa: E402
from mambakit.models.lm import LanguageModel  # noqa: E402
from mambakit.models.presets import preset  # noqa: E402

from _common import environment, print_table, write_json  # noqa: E402

OFFICIAL = {  # H100, state-spaces/mamba README / paper
    ("mamba1-1.4b", 1): {"ms_per_token": 2.28},
    ("mamba1-130m", 1): {"ms_per_token": 0.70},
    ("mamba2-130m", 1): {"ms_per_token": 0.68},
    ("mamba1-130m", 64): {"tokens_per_s": 76.1e3},
    ("mamba2-130m", 64): {"tokens_per_s": 48.6e3},
    ("mamba1-1.4b", 64): {"tokens_per_s": 19.9e3},
    ("mamba2-1.3b", 64): {"tokens_per_s": 9.6e3},
}


def transformer_like(name: str) -> ModelConfig:
    """A Transformer with the Mamba preset's width, depth in parameters and vocabulary: a Mamba layer
    holds ~6 d^2 parameters, an attention layer 4 d^2 and a SwiGLU MLP (d_int = 8/3 d) 8 d^2, so
    n_layer Mamba layers ~ n_layer / 2 pairs "*-"."""
    c = preset(name)
    d = c.d_model
    return ModelConfig(
        d_model=d,
        vocab_size=c.vocab_size,
        pattern="*-" * (c.n_layer // 2),
        attn=AttentionConfig(num_heads=d // 64, rotary_emb_dim=64),
        mlp=MLPConfig(d_intermediate=(8 * d // 3 + 63) // 64 * 64, activation="swiglu"),
    )


def build(spec: str | ModelConfig, device, dtype) -> LanguageModel:
    torch.manual_seed(0)
    config = preset(spec) if isinstance(spec, str) else spec
    return LanguageModel(config, device=device, dtype=dtype).eval()


def state_bytes_per_sequence(model: LanguageModel, seqlen: int, dtype, ssm_dtype=None) -> int:
    """Bytes of decoding state (conv + SSM states, KV caches) one sequence of `seqlen` tokens needs."""
    cache = model.allocate_inference_cache(1, seqlen, dtype=dtype, device="meta", ssm_dtype=ssm_dtype)
    total = 0
    for s in cache.states:
        if s is None:
            continue
        for t in vars(s).values():
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_generate(
    model, batch, prompt_len, new_tokens, device, cuda_graph, repeats=2, compile=False, ssm_dtype=None
) -> dict:
    """Greedy generation from random prompts; the best of `repeats` timed runs after one warm-up
    (the warm-up captures the CUDA graph). Decode ms/token counts the steps after the first token."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    kw = dict(
        max_new_tokens=new_tokens, temperature=0, cuda_graph=cuda_graph, compile=compile, ssm_dtype=ssm_dtype
    )
    generate(model, ids, **kw)  # warm-up: compile, autotune, capture
    best = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        out = generate(model, ids, **kw)
        if best is None or out.decode_s < best.decode_s:
            best = out
    steps = best.tokens.shape[1]
    total_s = best.prefill_s + best.decode_s
    row = {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": steps,
        "prefill_s": best.prefill_s,
        "decode_ms_per_token": best.decode_s / max(steps - 1, 1) * 1e3,
        "decode_tokens_per_s": batch * (steps - 1) / best.decode_s if best.decode_s > 0 else None,
        "e2e_tokens_per_s": batch * steps / total_s,
    }
    if device.type == "cuda":
        row["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def bench_prefill(model, seqlen, device, repeats=3) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, seqlen), device=device)
    cache = model.allocate_inference_cache(1, seqlen)

    def once():
        cache.reset()
        prefill(model, ids, cache)

    once()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"seqlen": seqlen, "prefill_tokens_per_s": seqlen / min(times), "prefill_ms": min(times) * 1e3}


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--quick", action="store_true", help="a short run: fewer tokens, the 130M sizes only")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--no-cuda-graph", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step before capture")
    ap.add_argument(
        "--ssm-dtype", choices=["float32", "bfloat16"], default="float32",
        help="SSM state dtype of the decode section (the official decoder keeps it in the model dtype)",
    )  # fmt: skip
    ap.add_argument("--sections", default="decode,prefill,longctx", help="GPU sections to run")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (CPU runs)")
    args = ap.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    graph = not args.no_cuda_graph
    results: dict = {
        "environment": environment(),
        "device": str(device),
        "cuda_graph": graph and device.type == "cuda",
        "compile": args.compile,
        "ssm_dtype": args.ssm_dtype,
    }
    ssm_dtype = torch.bfloat16 if args.ssm_dtype == "bfloat16" else None
    sections = set(args.sections.split(","))

    if device.type != "cuda":
        dtype = torch.float32
        new = 16 if args.quick else 64
        rows = []
        for name in ("mamba1-130m", "mamba2-130m"):
            model = build(name, device, dtype)
            r = run_generate(model, 1, 128, new, device, False, repeats=1 if args.quick else 2)
            r["model"] = name
            rows.append(r)
            del model
            free(device)
        results["cpu_decode"] = rows
        print_table(
            ["model", "batch", "prompt", "new", "decode ms/token", "prefill s"],
            [
                [
                    r["model"],
                    r["batch"],
                    r["prompt_len"],
                    r["new_tokens"],
                    r["decode_ms_per_token"],
                    r["prefill_s"],
                ]
                for r in rows
            ],
        )
        if args.out:
            write_json(args.out, results)
        return 0

    dtype = torch.bfloat16
    names = ["mamba1-130m", "mamba2-130m"] + ([] if args.quick else ["mamba1-1.4b", "mamba2-1.3b"])
    new = 64 if args.quick else 256

    if "decode" in sections:
        rows = []
        for name in names:
            model = build(name, device, dtype)
            for batch in (1, 64):
                free(device)
                r = run_generate(
                    model, batch, 128, new, device, graph, compile=args.compile, ssm_dtype=ssm_dtype
                )
                r["model"] = name
                r["state_bytes_per_seq"] = state_bytes_per_sequence(model, 128 + new, dtype, ssm_dtype)
                r["official"] = OFFICIAL.get((name, batch))
                rows.append(r)
                print(
                    f"decode {name} batch {batch}: {r['decode_ms_per_token']:.3f} ms/token, "
                    f"{r['decode_tokens_per_s']:.0f} tokens/s",
                    flush=True,
                )
            del model
            free(device)
        results["decode"] = rows
        headers = [
            "model",
            "batch",
            "ms/token",
            "decode tok/s",
            "e2e tok/s",
            "official",
            "state KiB/seq",
            "peak MiB",
        ]
        table = [
            [r["model"], r["batch"], r["decode_ms_per_token"], r["decode_tokens_per_s"],
             r["e2e_tokens_per_s"], None if not r["official"] else next(iter(r["official"].values())),
             r["state_bytes_per_seq"] / 1024, r["peak_mem_mib"]]
            for r in rows
        ]  # fmt: skip
        print_table(headers, table)

    if "prefill" in sections:
        rows = []
        for name in names:
            model = build(name, device, dtype)
            for seqlen in (2048,) if args.quick else (2048, 16384):
                free(device)
                r = bench_prefill(model, seqlen, device)
                r["model"] = name
                rows.append(r)
            del model
            free(device)
        results["prefill"] = rows
        print_table(
            ["model", "seqlen", "prefill tok/s", "ms"],
            [[r["model"], r["seqlen"], r["prefill_tokens_per_s"], r["prefill_ms"]] for r in rows],
        )

    if "longctx" in sections:
        rows = []
        pairs = [("mamba2-130m", "transformer-130m")]
        if not args.quick:
            pairs.append(("mamba1-1.4b", "transformer-1.4b"))
        lengths = (1024, 4096) if args.quick else (1024, 4096, 16384, 65536)
        for mamba_name, tf_name in pairs:
            for label, spec in ((mamba_name, mamba_name), (tf_name, transformer_like(mamba_name))):
                model = build(spec, device, dtype)
                for L in lengths:
                    free(device)
                    try:
                        r = run_generate(model, 1, L, 32, device, graph, repeats=1)
                    except torch.OutOfMemoryError:
                        r = {"prompt_len": L, "error": "out of memory"}
                    r["model"] = label
                    r["params_m"] = model.num_parameters() / 1e6
                    r["state_bytes_per_seq"] = state_bytes_per_sequence(model, L + 32, dtype)
                    rows.append(r)
                    ms = r.get("decode_ms_per_token", float("nan"))
                    print(f"longctx {label} prompt {L}: {ms:.3f} ms/token", flush=True)
                del model
                free(device)
        results["longctx"] = rows
        print_table(
            ["model", "params M", "prompt", "decode ms/token", "state MiB/seq", "peak MiB", "prefill s"],
            [
                [r["model"], r["params_m"], r["prompt_len"], r.get("decode_ms_per_token"),
                 r["state_bytes_per_seq"] / 2**20, r.get("peak_mem_mib"), r.get("prefill_s")]
                for r in rows
            ],
        )  # fmt: skip

    if args.out:
        write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
