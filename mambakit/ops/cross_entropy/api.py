"""Cross-entropy of a linear LM head: the one public entry, `linear_cross_entropy`.

Backends: `reference.py` (full logits, the definition), `torch.py` (chunked over tokens) and `triton/`
(the same chunk loop and cuBLAS matmuls, with the softmax's elementwise work as fused kernels). Each
defines `linear_cross_entropy_impl` with the arguments below (minus `backend`), already checked.
"""

from __future__ import annotations

import torch

from mambakit.ops._backend import BackendModules, resolve_backend
from mambakit.ops._checks import check_positive_int, check_tensor, values_unreadable

_impl = BackendModules(__package__)
_IMPLEMENTED = _impl.implemented

# elements of one chunk's (tokens, vocab) logits: 2**27 float32 = 512 MiB at most
_CHUNK_ELEMENTS = 2**27
_REDUCTIONS = ("mean", "sum", "none")


def default_chunk_size(vocab_size: int) -> int:
    """Tokens a chunk when `chunk_size=None`: the largest power of two whose (chunk, vocab) float32
    logits fit in 2**27 elements (512 MiB), at least 256. Vocabulary 50,277: 2048 tokens (412 MB);
    a byte vocabulary (257): 262,144 tokens, i.e. usually one chunk."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, vocab_size))
    return max(256, 1 << (rows.bit_length() - 1))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of the logits `hidden @ weight[:vocab_size].T` against `targets`, without
    materializing those logits (backend "torch": at most `chunk_size` tokens' logits at a time).

    Shapes:
        hidden: (N, d_model), or (..., d_model) with targets of shape (...); the final-normed
            hidden states
        weight: (padded_vocab, d_model), the LM head (rows from vocab_size on are padding: they are
            never logits and get zero gradient)
        targets: (N,) int32/int64, class ids in [0, vocab_size) or ignore_index

    Math: logits_i = hidden_i @ weight[:vocab_size].T, in the autocast dtype under autocast (else the
    inputs' dtype), then float32 (float64 for float64 inputs); loss_i = logsumexp(logits_i) -
    logits_i[targets_i], 0 where targets_i == ignore_index. reduction "mean": sum / number of
    non-ignored targets (NaN when all are ignored, as F.cross_entropy), "sum", or "none" (the per-token
    losses, shape of targets). Equal to `F.cross_entropy(F.linear(hidden, weight)[..., :vocab_size]
    .float().flatten(0, -2), targets.flatten(), ignore_index=ignore_index, reduction=reduction)` up to
    rounding. Gradients flow to hidden and weight (not twice differentiable).

    vocab_size: the number of real classes (default weight.shape[0]). chunk_size: tokens a chunk
    (default `default_chunk_size(vocab_size)`); the result does not depend on it beyond rounding.
    Backends "reference", "torch" and "triton" ("auto": "triton" for CUDA tensors, else "torch").
    Returns a float32 (float64) tensor.
    """
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.ndim < 2:
        raise ValueError(f"hidden must have shape (N, d_model), got {tuple(hidden.shape)}")
    check_tensor("hidden", hidden, (None,) * hidden.ndim)
    lead, d_model = tuple(hidden.shape[:-1]), hidden.shape[-1]
    dev = hidden.device
    check_tensor("weight", weight, (None, d_model), device=dev)
    check_tensor("targets", targets, lead, dtypes=(torch.int32, torch.int64), device=dev)
    castable = (torch.float16, torch.bfloat16, torch.float32)  # what autocast casts
    autocast = torch.is_autocast_enabled(dev.type) and hidden.dtype in castable and weight.dtype in castable
    if hidden.dtype != weight.dtype and not autocast:
        raise TypeError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype outside autocast"
        )
    padded = weight.shape[0]
    if vocab_size is None:
        vocab_size = padded
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size must be an int in [1, weight.shape[0]={padded}], got {vocab_size!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab_size)
    check_positive_int("chunk_size", chunk_size)
    check_target_values(targets, ignore_index, vocab_size)
    name = resolve_backend(backend, dev, _IMPLEMENTED)
    hidden, targets = hidden.reshape(-1, d_model), targets.reshape(-1)  # (N, d_model), (N,)
    loss = _impl(name).linear_cross_entropy_impl(
        hidden, weight, targets, ignore_index, vocab_size, reduction, chunk_size
    )
    return loss.reshape(lead) if reduction == "none" else loss


def check_target_values(targets: torch.Tensor, ignore_index: int, vocab_size: int) -> None:
    """targets' values lie in [0, vocab_size) or equal ignore_index (unchecked where they cannot be read)."""
    if values_unreadable(targets):
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if targets.numel() and bool(bad.any()):
        first = int(targets[bad][0])
        raise ValueError(
            f"targets must lie in [0, vocab_size={vocab_size}) or equal ignore_index={ignore_index}, "
            f"got {first}"
        )


__all__ = ["linear_cross_entropy", "default_chunk_size"]
