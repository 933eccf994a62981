"""Next-token selection: repetition penalty, temperature, top-k, top-p, min-p, then greedy or a draw.

Every function takes logits (batch, vocab) and works on the whole batch at once, on the logits' device,
with no host synchronization (so a decode loop can run ahead of the GPU). Filters set the logits of
the tokens they drop to -inf. The order is the usual one (as in Hugging Face transformers):
repetition penalty -> temperature -> top-k -> top-p -> min-p -> softmax -> draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it before the draw.
    top_k: keep the k most likely tokens (0: off). top_p: keep the smallest set of most likely tokens
    whose probability mass reaches top_p (1.0: off). min_p: keep tokens whose probability is at least
    min_p times the most likely token's (0.0: off). repetition_penalty: CTRL-style penalty on tokens
    already in the prompt or the generated text (1.0: off); > 1 discourages repeats.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        def number(name: str, v: object) -> float:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            return float(v)

        if number("temperature", self.temperature) < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < number("top_p", self.top_p) <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {self.top_p!r}")
        if not 0 <= number("min_p", self.min_p) <= 1:
            raise ValueError(f"min_p must lie in [0, 1] (0 = off), got {self.min_p!r}")
        if number("repetition_penalty", self.repetition_penalty) <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019): for tokens with seen[b, v] true, divide a positive logit by `penalty`
    and multiply a negative one by it, so that penalty > 1 always makes a seen token less likely."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are kept too)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass is >= p.

    A token is kept when the mass of the tokens ranked before it is still below p; the most likely
    token is always kept."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the most likely token's probability."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits.float(), dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, -math.inf)


def process_logits(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """Penalty, temperature and filters in order; float32 logits (batch, vocab) with -inf for dropped
    tokens. `seen` (batch, vocab) bool marks tokens the repetition penalty applies to."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (batch, vocab) -> next tokens (batch,) int64.

    Greedy takes the argmax; otherwise one draw from softmax(processed logits), made as
    argmax(probs / E) with E ~ Exponential(1) from `generator` (an exact categorical draw that needs
    no host sync, unlike torch.multinomial). The same generator seed gives the same tokens.
    """
    if params.greedy and seen is None:
        # the argmax of the logits as they are: upcasting is exact and keeps the first maximum, so the
        # float32 copy (one kernel a token while decoding) would change nothing
        return logits.argmax(dim=-1)
    logits = process_logits(logits, params, seen)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)
