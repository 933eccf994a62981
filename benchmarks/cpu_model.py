"""CPU benchmark of whole 130M models: forward tokens/s, one training step, decode ms/token.

Runs mambakit's Mamba-1 and Mamba-2 130M presets and, when `transformers` is installed, HF's
pure-PyTorch MambaForCausalLM / Mamba2ForCausalLM of the same shape side by side in the same process.
Random weights, fp32, `--threads` CPU threads (default 2). Prints a table and writes JSON.

    python benchmarks/cpu_model.py --out bench_out/cpu_model.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mambakit.models.lm import LanguageModel  # noqa: E402
from mambakit.models.presets import preset  # noqa: E402

from _common import environment, write_json  # noqa: E402


def _time(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _random_ids(vocab: int, batch: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def _train_step(model: torch.nn.Module, ids: torch.Tensor, logits_of) -> None:
    model.zero_grad(set_to_none=True)
    logits = logits_of(model, ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()


def bench_mambakit(version: int, args) -> dict:
    config = preset(f"mamba{version}-130m")
    model = LanguageModel(config).eval()
    vocab = config.vocab_size
    fwd_ids = _random_ids(vocab, 1, args.fwd_seqlen)
    with torch.inference_mode():
        fwd_s = _time(lambda: model(fwd_ids), args.repeats)
    model.train()
    train_ids = _random_ids(vocab, 1, args.train_seqlen, seed=1)
    train_s = _time(lambda: _train_step(model, train_ids, lambda m, x: m(x)), args.repeats)
    model.eval()
    prompt = _random_ids(vocab, 1, args.prompt_len, seed=2)
    with torch.inference_mode():
        cache = model.allocate_inference_cache(1, args.prompt_len + args.decode_tokens + 1)
        logits = model(prompt, cache=cache)
        token = logits[:, -1:].argmax(-1)
        for _ in range(3):  # warm-up steps
            token = model.step(token, cache)[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(args.decode_tokens):
            token = model.step(token, cache)[:, -1:].argmax(-1)
        decode_s = (time.perf_counter() - t0) / args.decode_tokens
    return {
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "forward_tok_s": args.fwd_seqlen / fwd_s,
        "train_step_s": train_s,
        "decode_ms_per_token": decode_s * 1e3,
    }


def _hf_model(version: int):
    import transformers

    common = dict(
        vocab_size=50288, hidden_size=768, num_hidden_layers=24, expand=2, conv_kernel=4,
        use_bias=False, use_conv_bias=True, tie_word_embeddings=True,
    )  # fmt: skip
    if version == 1:
        cfg = transformers.MambaConfig(state_size=16, time_step_rank=48, **common)
        return transformers.MambaForCausalLM(cfg)
    cfg = transformers.Mamba2Config(
        state_size=128, num_heads=24, head_dim=64, n_groups=1, chunk_size=256, **common
    )
    return transformers.Mamba2ForCausalLM(cfg)


def bench_hf(version: int, args) -> dict | None:
    try:
        model = _hf_model(version).eval()
    except ImportError:
        return None
    vocab = 50277
    fwd_ids = _random_ids(vocab, 1, args.fwd_seqlen)
    with torch.inference_mode():
        fwd_s = _time(lambda: model(fwd_ids, use_cache=False), 1)
    model.train()
    train_ids = _random_ids(vocab, 1, args.train_seqlen, seed=1)
    train_s = _time(lambda: _train_step(model, train_ids, lambda m, x: m(x, use_cache=False).logits), 1)
    model.eval()
    prompt = _random_ids(vocab, 1, args.prompt_len, seed=2)

    def gen(n: int) -> float:
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0

    with torch.inference_mode():
        gen(2)  # warm-up
        short, long = gen(1), gen(1 + args.decode_tokens)
    return {
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "forward_tok_s": args.fwd_seqlen / fwd_s,
        "train_step_s": train_s,
        "decode_ms_per_token": (long - short) / args.decode_tokens * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fwd-seqlen", type=int, default=1024)
    parser.add_argument("--train-seqlen", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--out", default="bench_out/cpu_model.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from cpu_ops import format_probe, machine_probe  # the sibling script: one probe for both benchmarks

    probe_before = machine_probe()
    print(f"machine before: {format_probe(probe_before)}", flush=True)
    rows = []
    for version in (1, 2):
        ours = bench_mambakit(version, args)
        hf = None if args.no_hf else bench_hf(version, args)
        rows.append({"model": f"mamba{version}-130m", "mambakit": ours, "hf_transformers": hf})
    probe_after = machine_probe()
    print(f"\nmachine before: {format_probe(probe_before)}\nmachine after:  {format_probe(probe_after)}")
    print(f"CPU, fp32, {args.threads} threads, random weights")
    header = f"{'model':14s} {'impl':10s} {f'fwd tok/s (L={args.fwd_seqlen})':>18s} "
    header += f"{f'train step s (1x{args.train_seqlen})':>20s} {'decode ms/tok':>14s}"
    print(header)
    for row in rows:
        for impl in ("mambakit", "hf_transformers"):
            r = row[impl]
            if r is None:
                continue
            print(
                f"{row['model']:14s} {impl[:10]:10s} {r['forward_tok_s']:18.1f} "
                f"{r['train_step_s']:20.3f} {r['decode_ms_per_token']:14.2f}"
            )
        if row["hf_transformers"]:
            o, h = row["mambakit"], row["hf_transformers"]
            print(
                f"{row['model']:14s} {'ratio':10s} {o['forward_tok_s'] / h['forward_tok_s']:17.1f}x "
                f"{h['train_step_s'] / o['train_step_s']:19.1f}x "
                f"{h['decode_ms_per_token'] / o['decode_ms_per_token']:13.1f}x"
            )
    machine = {"before": probe_before, "after": probe_after}
    write_json(
        args.out,
        {"benchmark": "cpu_model", "environment": environment(), "machine": machine, "results": rows},
    )


if __name__ == "__main__":
    main()
