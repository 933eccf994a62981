"""Optimizer and schedule: AdamW over two parameter groups and a linear-warmup + cosine learning rate.

No weight decay on parameters a layer marked `_no_weight_decay` (A_log, D, dt_bias, norm weights) nor on
any parameter with fewer than 2 dimensions (biases, norms). Embeddings (tied to the LM head by default)
are matrices and do decay, as in nanoGPT: decaying the output projection regularizes the logits.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mambakit.training.config import OptimConfig


def no_decay(param: nn.Parameter) -> bool:
    return bool(getattr(param, "_no_weight_decay", False)) or param.ndim < 2


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[{params with decay, weight_decay}, {params without, weight_decay 0}], each parameter once (tied
    weights are one Parameter) and in the model's order, so the optimizer state is reproducible."""
    decay, keep = [], []
    for p in model.parameters():  # parameters() already yields a shared Parameter once
        if p.requires_grad:
            (keep if no_decay(p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW on `param_groups`; fused kernels when cfg.fused is 'true', or 'auto' with CUDA parameters."""
    params = list(model.parameters())
    on_cuda = all(p.device.type == "cuda" for p in params)
    fused = cfg.fused == "true" or (cfg.fused == "auto" and on_cuda)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
    )
    # the key a scheduler adds: present from the start, saved and loaded optimizer states have the same keys
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    return optimizer


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step` (0-based): (step + 1) / warmup for step < warmup, then a
    cosine from 1 at step = warmup down to min_ratio at step = total_steps - 1, constant after."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with `lr_factor` of cfg.lr, positioned at `start_step` (the lr of that step is set).

    A resumed run builds it at its checkpoint's step from the current config: with the same config the
    learning rates are the uninterrupted run's; with more steps the cosine stretches to the new end.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.min_lr_ratio),
        last_epoch=start_step - 1,
    )
