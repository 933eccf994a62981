"""Check on a GPU that whole models using the Triton ops run under torch.compile and match eager.

python benchmarks/gpu_compile_check.py
"""

from __future__ import annotations

import torch

from mambakit.models.lm import LanguageModel
from mambakit.models.presets import preset


def main() -> None:
    for name in ("tiny-mamba1", "tiny-mamba2", "hybrid-tiny"):
        torch.manual_seed(0)
        model = LanguageModel(preset(name), device="cuda")
        ids = torch.randint(0, model.config.vocab_size, (2, 512), device="cuda")
        eager = model(ids)
        eager.float().square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        compiled = torch.compile(model)
        out = compiled(ids)
        out.float().square().mean().backward()
        y_err = ((out - eager).norm() / eager.norm()).item()
        g_err = max(
            ((p.grad - grads[n]).norm() / grads[n].norm().clamp_min(1e-12)).item()
            for n, p in model.named_parameters()
        )
        print(f"{name:12s} compiled vs eager: logits rel err {y_err:.2e}, worst grad rel err {g_err:.2e}")


if __name__ == "__main__":
    main()
