"""A small sampler for the end-of-training sample: prefill the prompt, then one token at a time.

Uses the model's inference cache and `step` when it has them (constant work per token), else re-runs
the full forward over the growing sequence. Full generation (batching, top-p, CUDA graphs) lives in
`mambakit.inference`; this is only enough to show what a run learned.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
) -> list[int]:
    """Token ids that follow `prompt_ids` (a non-empty list); temperature 0 means greedy."""
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    use_cache = hasattr(model, "allocate_inference_cache") and hasattr(model, "step")
    if use_cache:
        cache = model.allocate_inference_cache(1, len(prompt_ids) + max_new_tokens)
        logits = model(ids, cache=cache)[:, -1]
    else:
        logits = model(ids)[:, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = logits.float()
        if temperature == 0:
            token = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
        out.append(int(token))
        if use_cache:
            logits = model.step(token, cache)[:, -1]
        else:
            ids = torch.cat([ids, token], dim=1)
            logits = model(ids)[:, -1]
    model.train(was_training)
    return out
