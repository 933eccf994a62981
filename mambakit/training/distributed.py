"""Scale-out with PyTorch's own engine: process group from torchrun's environment, a 1-D DeviceMesh
("dp"), and DistributedDataParallel or FSDP2 `fully_shard` applied to a built model from outside.

Also the helpers the trainer needs that differ with or without a process group: gradient-sync control
for accumulation, reductions of logged numbers, and full (unsharded, name-keyed) state dicts so that
checkpoints are independent of the number of processes. Without torchrun everything degrades to the
one-process case (no process group, no wrapper).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object | None = None  # DeviceMesh when world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.mesh is not None


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when CUDA is available, else cpu; 'cuda' -> cuda:<local_rank>."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"train.device={spec!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={spec!r} but CUDA is not available; use train.device='cpu'")
    return device


def init_distributed(device_spec: str, backend: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local_rank)
    if world <= 1:
        return DistInfo(device=device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    return DistInfo(dist.get_rank(), world, local_rank, device, mesh)


def shutdown(info: DistInfo) -> None:
    """Leave the process group. The barrier and the pause give gloo's run-loop threads time to drop
    the finished all-reduces they still hold: one dropped during interpreter shutdown needs the GIL
    and aborts the process ("terminate called without an active exception", pytorch/pytorch#179291)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        time.sleep(0.05)


def parallelize(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """DDP wraps the model; FSDP2 shards each block, then the root (embedding, final norm, tied head)."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # FSDP2 warns that a module returning a view (the logits slice, the residual) would lose its
        # backward hook to an in-place op on it; the trainer never modifies outputs in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for layer in model.backbone.layers:
            fully_shard(layer, mesh=info.mesh)
        fully_shard(model, mesh=info.mesh)
        return model
    raise ValueError(f"distributed.strategy must be 'ddp' or 'fsdp', got {strategy!r}")


def grad_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if hasattr(model, "no_sync") and not sync:  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_reduce(value: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return value


def broadcast_object(obj: object, info: DistInfo) -> object:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded model state on the CPU, keys without wrapper prefixes (empty on ranks other than 0
    when distributed)."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Unsharded optimizer state keyed by parameter names (empty on ranks other than 0 when distributed)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_states(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict
) -> None:
    """Load full states (as written by `full_*_state`) into a possibly wrapped or sharded model; every
    rank passes the same full states."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
