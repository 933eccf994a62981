"""Tensor and context parallelism applied from outside to a built model (see docs/parallel.md)."""

from mambakit.parallel.context_parallel import (
    context_parallel_causal_conv1d,
    context_parallel_selective_scan,
    context_parallel_ssd,
)
from mambakit.parallel.context_parallel_model import parallelize_context, sum_gradients
from mambakit.parallel.tensor_parallel import ShardSpec, gather_full, parallelize_tensor

__all__ = [
    "ShardSpec",
    "context_parallel_causal_conv1d",
    "context_parallel_selective_scan",
    "context_parallel_ssd",
    "gather_full",
    "parallelize_context",
    "parallelize_tensor",
    "sum_gradients",
]
