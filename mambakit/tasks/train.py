"""A small training and evaluation loop for the synthetic tasks.

Fresh batches from a seeded generator at every step (the tasks are infinite), cross-entropy only on the
answer positions, AdamW over mambakit's parameter groups (no weight decay on A_log, D, dt biases, norms)
with linear warmup and cosine decay (`mambakit.training.optim`), gradient clipping, and evaluation on
batches from a separate seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mambakit.tasks.base import IGNORE, TaskBatch, answer_accuracy, check_int, make_generator
from mambakit.training.optim import lr_factor, param_groups

Sampler = Callable[[int, torch.Generator], TaskBatch]


@dataclass
class TrainSettings:
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        check_int("steps", self.steps)
        check_int("batch_size", self.batch_size)
        check_int("warmup_steps", self.warmup_steps, 0)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one a step
    train_accuracy: list[tuple[int, float]] = field(default_factory=list)  # (step, accuracy of the batch)
    seconds: float = 0.0


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answer positions: logits (b, l, vocab), targets (b, l) with IGNORE."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def train(
    model: nn.Module, sample: Sampler, settings: TrainSettings, log: Callable[[str], None] | None = None
):
    """Train `model` on batches from `sample(batch_size, generator)`; returns a TrainResult."""
    generator = make_generator(settings.seed)
    optimizer = torch.optim.AdamW(
        param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.98)
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, settings.warmup_steps, settings.steps, settings.min_lr_ratio)
    )
    result = TrainResult()
    model.train()
    start = time.perf_counter()
    for step in range(settings.steps):
        batch = sample(settings.batch_size, generator)
        logits = model(batch.input_ids)
        loss = answer_loss(logits, batch.targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        schedule.step()
        result.losses.append(loss.item())
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            acc = answer_accuracy(logits.detach(), batch.targets)
            result.train_accuracy.append((step + 1, acc))
            if log is not None:
                log(f"  step {step + 1:5d}  loss {loss.item():.4f}  batch accuracy {acc:.3f}")
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def evaluate(
    model: nn.Module, sample: Sampler, num_examples: int, batch_size: int, seed: int = 12345
) -> float:
    """Answer-position accuracy of `model` over `num_examples` rows from `sample` (seeded by `seed`)."""
    check_int("num_examples", num_examples)
    check_int("batch_size", batch_size)
    generator = make_generator(seed)
    model.eval()
    correct = total = 0
    done = 0
    while done < num_examples:
        b = min(batch_size, num_examples - done)
        batch = sample(b, generator)
        logits = model(batch.input_ids)
        n = int(batch.answer_mask.sum())
        correct += round(answer_accuracy(logits, batch.targets) * n)
        total += n
        done += b
    model.train()
    return correct / total
