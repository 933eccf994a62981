"""Tensor and context parallelism applied from outside to a built model (see docs/parallel.md)."""

from mambakit.parallel.context_parallel import (
    context_parallel_causal_conv1d,
    context_parallel_selective_scan,
    context_parallel_ssd,
)

__all__ = ["context_parallel_causal_conv1d", "context_parallel_selective_scan", "context_parallel_ssd"]
