"""Decoding with the fused Mamba block steps (`ops.mamba1/2_block_step`) against the unfused step.

For each model and batch size, one process captures the CUDA-graph decode step three times, with
MAMBAKIT_FUSED_STEP=0 (unfused: 6-7 kernels a block), with the fused op (3-4 kernels a block) launched
plainly, and with the fused op under programmatic dependent launch (PDL, `ops/_launch.py`); decodes the
same tokens with each, and prints replay ms/token, kernels a step, and how far the fused logits are
from the unfused ones (max |difference| over max |logit|, and the share of equal greedy tokens). The
two fused runs must give identical logits (the same kernels; PDL only moves their start). The fused
runs take the fused op at every batch size; "rule" says whether `Block.step` would
(`layers/step_ops.fused_step_applies`).
`--sweep` also times tile choices of the fused kernels (`ops/mamba{1,2}_step/triton.py` TILES).
bf16 weights, random weights in the preset shapes.

    python benchmarks/gpu_block_step.py --out bench_out/block_step.json
    python benchmarks/gpu_block_step.py --models mamba1-130m --batch 1 --sweep
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode_profile import kernels_per_step, replay_ms  # noqa: E402

from mambakit.inference.cuda_graph import CUDAGraphDecoder  # noqa: E402
from mambakit.layers.mamba1 import Mamba1  # noqa: E402
from mambakit.layers.mamba2 import Mamba2  # noqa: E402
from mambakit.models.lm import LanguageModel  # noqa: E402
from mambakit.models.presets import preset  # noqa: E402
from mambakit.ops import _launch  # noqa: E402
from mambakit.ops.mamba1_step import triton as mamba1_triton  # noqa: E402
from mambakit.ops.mamba2_step import triton as mamba2_triton  # noqa: E402

from _common import environment, print_table, write_json  # noqa: E402

SWEEP1 = [
    {},
    {"x_cublas": True},
    {"out_cublas": True},
    {"in_min_channels": 1},
    {"in_min_channels": 4},
    {"in_elems": 8192},
    {"x_elems": 2048},
    {"x_elems": 8192},
    {"out_elems": 4096},
    {"out_elems": 16384},
    {"out_elems": 32768},
    {"per_thread": 32},
    {"per_thread": 128},
    {"ssm_channels": 8},
    {"ssm_channels": 32},
]
SWEEP2 = [
    {},
    {"in_elems": 4096},
    {"in_elems": 16384},
    {"out_rows": 4},
    {"out_rows": 16},
    {"out_warps": 2},
    {"out_warps": 8},
    {"per_thread": 64},
    {"per_thread": 256},
    {"headdim_block": 8},
    {"headdim_block": 32},
]


def _decode(
    model, batch: int, tokens: torch.Tensor, fused: bool, iters: int, profile: bool, pdl: bool = True
) -> dict:
    os.environ["MAMBAKIT_FUSED_STEP"] = "1" if fused else "0"
    _launch.LAUNCH["pdl"] = pdl
    widths = Mamba1.fused_step_batch_width, Mamba2.fused_step_batch_width
    Mamba1.fused_step_batch_width = Mamba2.fused_step_batch_width = 1 << 30  # the fused op at any batch
    try:
        dec = CUDAGraphDecoder(model, batch, 512)
    finally:
        Mamba1.fused_step_batch_width, Mamba2.fused_step_batch_width = widths
    logits = []
    for t in range(tokens.shape[1]):
        logits.append(dec.step(tokens[:, t]).float().clone())
    dec.input_ids.copy_(tokens[:, :1])
    out = {"ms": replay_ms(dec, tokens, iters), "logits": torch.stack(logits, 1)}
    if profile:
        kernels = kernels_per_step(dec, 20)
        out["kernels_per_step"] = sum(c for c, _ in kernels.values())
        out["kernels"] = {k: {"per_step": c, "us": t} for k, (c, t) in kernels.items()}
    del dec
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models = ["mamba1-130m", "mamba2-130m", "mamba1-1.4b", "mamba2-1.3b"]
    ap.add_argument("--models", nargs="+", default=models)
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--steps", type=int, default=16, help="tokens decoded to compare the logits")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default="bench_out/block_step.json")
    args = ap.parse_args()
    device = torch.device("cuda")
    rows, results = [], []
    for name in args.models:
        torch.manual_seed(0)
        model = LanguageModel(preset(name), device=device, dtype=torch.bfloat16).eval()
        for batch in args.batch:
            tokens = torch.randint(0, 1000, (batch, args.steps), device=device)
            base = _decode(model, batch, tokens, False, args.iters, True)
            plain = _decode(model, batch, tokens, True, args.iters, False, pdl=False)
            fused = _decode(model, batch, tokens, True, args.iters, True)
            scale = base["logits"].abs().max().item()
            rel = (fused["logits"] - base["logits"]).abs().max().item() / scale
            same = (fused["logits"].argmax(-1) == base["logits"].argmax(-1)).float().mean().item()
            pdl_diff = (fused["logits"] - plain["logits"]).abs().max().item()
            mixer = Mamba2 if "mamba2" in name else Mamba1
            rule = batch <= max(1, mixer.fused_step_batch_width // model.config.d_model)
            row = [name, batch, rule, base["ms"], plain["ms"], fused["ms"], base["ms"] / fused["ms"],
                   base["kernels_per_step"], fused["kernels_per_step"], rel, same, pdl_diff]  # fmt: skip
            rows.append(row)
            top = sorted(fused["kernels"].items(), key=lambda kv: -kv[1]["us"])[:8]
            print(f"\n{name} batch {batch}, fused step (PDL), top kernels")
            table = [[k[:80], v["per_step"], v["us"]] for k, v in top]
            print_table(["kernel", "per step", "us per step"], table)
            keys = ["model", "batch", "rule_takes_fused", "unfused_ms", "fused_no_pdl_ms", "fused_ms",
                    "speedup",
                    "unfused_kernels", "fused_kernels", "max_rel_logit_diff", "greedy_agreement",
                    "pdl_vs_plain_max_abs_diff"]  # fmt: skip
            result = dict(zip(keys, row))
            result["fused_top_kernels"] = dict(top)
            if args.sweep:
                sweep = []
                version2 = "mamba2" in name
                fused_triton, changes = (mamba2_triton, SWEEP2) if version2 else (mamba1_triton, SWEEP1)
                default = dict(fused_triton.TILES)
                for change in changes:
                    fused_triton.TILES.update(change)
                    try:
                        ms = _decode(model, batch, tokens, True, args.iters, False)["ms"]
                    finally:
                        fused_triton.TILES.clear()
                        fused_triton.TILES.update(default)
                    sweep.append({"tiles": change, "ms": ms})
                    print(f"  tiles {change or 'default'}: {ms:.4f} ms")
                result["sweep"] = sweep
            results.append(result)
        del model
        torch.cuda.empty_cache()
    print()
    head = ["model", "batch", "rule", "unfused ms", "fused ms", "fused+PDL ms", "speedup", "kernels unfused",
            "kernels fused", "max rel logit diff", "greedy agree", "PDL vs plain diff"]  # fmt: skip
    print_table(head, rows)
    write_json(args.out, {"environment": environment(), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
