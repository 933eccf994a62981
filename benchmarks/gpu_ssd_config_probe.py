"""Run the SSD Triton forward+backward once per per-chunk tile configuration (each in its own process, so
that a faulting configuration cannot take the others down) at small model shapes, and check the result
against the PyTorch backend. Finds configurations that a Triton version miscompiles at some shape.

    python benchmarks/gpu_ssd_config_probe.py
"""

from __future__ import annotations

import os
import subprocess
import sys

# (batch, seqlen, nheads, headdim, dstate, chunk, seq_idx): default `mambakit train` model, tiny, anchor-like
SHAPES = [
    (16, 256, 4, 64, 32, 64, True),
    (8, 512, 8, 16, 16, 16, True),
    (4, 2048, 8, 64, 128, 256, False),  # (only with --all)
]
CONFIGS = ["64,64,8,2", "64,64,4,2", "64,64,4,3", "128,64,8,2", "64,32,4,2", "32,32,4,2"]

CHILD = r"""
import sys, torch
from mambakit.ops import ssd
b, l, h, p, n, cs, packed = [int(v) for v in sys.argv[1:8]]
torch.manual_seed(0)
dev = "cuda"
x = torch.randn(b, l, h, p, device=dev, dtype=torch.bfloat16)
dt = torch.randn(b, l, h, device=dev) * 0.5 - 1
A = -torch.rand(h, device=dev) * 4 - 0.5
B = torch.randn(b, l, 1, n, device=dev, dtype=torch.bfloat16)
C = torch.randn(b, l, 1, n, device=dev, dtype=torch.bfloat16)
D = torch.randn(h, device=dev)
bias = torch.randn(h, device=dev) * 0.5
seq = None
if packed:
    seq = (torch.arange(l, device=dev) // 100).to(torch.int32).expand(b, l).contiguous()
outs = {}
for be in ("triton", "torch"):
    leaves = [(t.detach().float() if be == "torch" else t.detach().clone()).requires_grad_()
              for t in (x, dt, B, C)]
    y = ssd(leaves[0], leaves[1], A, leaves[2], leaves[3], chunk_size=cs, D=D, dt_bias=bias, dt_softplus=True,
            seq_idx=seq, backend=be)
    y.backward(torch.ones_like(y))
    torch.cuda.synchronize()
    outs[be] = [y.detach().float()] + [t.grad.float() for t in leaves]
err = max(((a - r).norm() / r.norm()).item() for a, r in zip(outs["triton"], outs["torch"]))
print(f"ok rel_err={err:.2e}")
"""


def main() -> None:
    shapes = SHAPES if "--all" in sys.argv else SHAPES[:2]
    for shape in shapes:
        for cfg in CONFIGS:
            env = dict(os.environ, MAMBAKIT_SSD_CHUNK_CONFIG=cfg, CUDA_LAUNCH_BLOCKING="1")
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, *[str(int(v)) for v in shape]],
                env=env, capture_output=True, text=True, timeout=300,
            )
            last = (proc.stdout.strip().splitlines() or [""])[-1]
            err = [ln for ln in proc.stderr.splitlines() if "Error" in ln][-1:] if proc.returncode else []
            print(f"shape {shape} config {cfg}: rc {proc.returncode} {last} {' '.join(err)}", flush=True)


if __name__ == "__main__":
    main()
