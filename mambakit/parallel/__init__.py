"""Tensor and context parallelism applied from outside to a built model (see docs/parallel.md)."""

from mambakit.parallel.context_parallel import (
    context_parallel_causal_conv1d,
    context_parallel_selective_scan,
    context_parallel_ssd,
)
from mambakit.parallel.context_parallel_model import parallelize_context, sum_gradients
from mambakit.parallel.fsdp_tp import full_state_dict, parallelize_fsdp_tp, save_full
from mambakit.parallel.tensor_parallel import ShardSpec, clip_grad_norm_, gather_full, parallelize_tensor

__all__ = [
    "ShardSpec",
    "clip_grad_norm_",
    "context_parallel_causal_conv1d",
    "context_parallel_selective_scan",
    "context_parallel_ssd",
    "full_state_dict",
    "gather_full",
    "parallelize_context",
    "parallelize_fsdp_tp",
    "parallelize_tensor",
    "save_full",
    "sum_gradients",
]
