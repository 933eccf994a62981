"""How each `distributed.strategy` splits a training step over the processes torchrun started.

- ddp, fsdp: data parallel. Each process takes its share of the micro-batches; the wrappers average
  gradients over processes.
- tp: tensor parallel over all processes (`mambakit.parallel.parallelize_tensor`). Every process
  takes every micro-batch whole; the model's own collectives make the gradients those of one
  process, and each process computes the whole loss.
- cp: context parallel over all processes (`mambakit.parallel.parallelize_context`). Every process
  takes every micro-batch's rows but only its slice of the sequence (seq_len / world_size tokens);
  the loss and the gradients are sums over the slices.
- fsdp_tp: a ("dp", "tp") mesh of world_size / tp_size x tp_size processes
  (`mambakit.parallel.parallelize_fsdp_tp`): tp inside each group of `distributed.tp_size`
  consecutive ranks, FSDP2 across the groups, which share the micro-batches as under fsdp.

`Layout` carries what the trainer's loop needs to know about that; `split_sequence` cuts a batch for
cp. The tp checkpoint helpers gather sharded parameters (and their optimizer state) into the one-
process layout and shard them back, so checkpoints move between strategies and process counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mambakit.training import distributed
from mambakit.training.data import Batch
from mambakit.training.distributed import DistInfo, parallelize

STRATEGIES = ("ddp", "fsdp", "tp", "cp", "fsdp_tp")


@dataclass(frozen=True)
class Layout:
    strategy: str
    data_rank: int  # which share of the micro-batches this process takes
    data_world: int  # how many shares there are
    seq_rank: int  # which slice of the sequence (cp), else 0
    seq_world: int  # how many slices (cp), else 1
    tp_size: int = 1  # processes of one tensor-parallel group (tp: all of them; fsdp_tp: tp_size)

    @property
    def grad_scale(self) -> float:
        """Factor on the summed loss before backward so that gradients come out as the sum over the
        global batch: the FSDP/DDP wrappers average over the data-parallel processes, TP and CP do not."""
        return float(self.data_world) if self.strategy in ("ddp", "fsdp", "fsdp_tp") else 1.0

    @property
    def loss_replicas(self) -> int:
        """How many processes hold each share of the loss (the members of a TP group hold the same):
        a logged sum over all processes is divided by it."""
        return self.tp_size


def layout(strategy: str, info: DistInfo, seq_len: int, tp_size: int = 2) -> Layout:
    """The layout of `strategy` for this process; `tp_size` is read by fsdp_tp only."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not info.enabled or strategy in ("ddp", "fsdp"):
        return Layout(strategy, info.rank, info.world_size, 0, 1)
    if strategy == "fsdp_tp":
        if tp_size < 2 or info.world_size % tp_size or info.world_size == tp_size:
            raise ValueError(
                f"distributed.tp_size={tp_size} must be at least 2 and divide the number of processes "
                f"({info.world_size}) into at least two groups for distributed.strategy='fsdp_tp'"
            )
        # init_device_mesh lays ranks out row-major: rank = dp_index * tp_size + tp_index
        return Layout(strategy, info.rank // tp_size, info.world_size // tp_size, 0, 1, tp_size)
    if strategy == "cp" and seq_len % info.world_size:
        raise ValueError(
            f"data.seq_len={seq_len} must be a multiple of the number of processes ({info.world_size}) "
            "for distributed.strategy='cp'"
        )
    if strategy == "cp":
        return Layout(strategy, 0, 1, info.rank, info.world_size)
    return Layout(strategy, 0, 1, 0, 1, info.world_size)


def split_sequence(batch: Batch, lay: Layout) -> Batch:
    """This process's slice of the sequence of `batch` (cp); the batch itself otherwise."""
    if lay.seq_world == 1:
        return batch
    per = batch.input_ids.shape[1] // lay.seq_world
    cut = slice(lay.seq_rank * per, (lay.seq_rank + 1) * per)
    return Batch(batch.input_ids[:, cut], batch.targets[:, cut], batch.seq_idx[:, cut])


def parallelize_model(model: nn.Module, lay: Layout, info: DistInfo) -> nn.Module:
    """Apply the layout's strategy to a built model: ddp and fsdp through `distributed.parallelize`
    (which also leaves a one-process model as it is); tp, cp and fsdp_tp after broadcasting rank 0's
    weights, since the shards and replicas must come from one model and equal seeds alone do not
    promise equal initial weights on every device."""
    from mambakit.parallel import parallelize_context, parallelize_fsdp_tp, parallelize_tensor

    if not info.enabled or lay.strategy in ("ddp", "fsdp"):
        return parallelize(model, lay.strategy, info)
    with torch.no_grad():
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
    if lay.strategy == "tp":
        return parallelize_tensor(model, dist.group.WORLD)
    if lay.strategy == "cp":
        return parallelize_context(model, dist.group.WORLD)
    from torch.distributed.device_mesh import init_device_mesh

    shape = (lay.data_world, lay.tp_size)
    mesh = init_device_mesh(info.device.type, shape, mesh_dim_names=("dp", "tp"))
    if mesh.get_local_rank("dp") != lay.data_rank:  # the row-major layout `layout` assumed
        raise RuntimeError(f"rank {info.rank}: mesh puts it in dp group {mesh.get_local_rank('dp')}")
    return parallelize_fsdp_tp(model, mesh)


def sum_gradients_cp(model: nn.Module) -> None:
    """cp: each process's gradients come from its slice of the sequence; the step needs their sum."""
    from mambakit.parallel import sum_gradients

    sum_gradients(model, dist.group.WORLD)


def _plan(model: nn.Module) -> dict:
    return getattr(model, "tp_plan", None) or {}


def _tensor_parallel(model: nn.Module) -> bool:
    """tp and fsdp_tp models carry their plan (`parallelize_tensor` / `parallelize_fsdp_tp` set it)."""
    return getattr(model, "tp_plan", None) is not None


def full_states(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) in the one-process layout, for a checkpoint, under any strategy.
    Collective under fsdp, tp and fsdp_tp: every process calls it."""
    if _tensor_parallel(model):
        return tp_full_states(model, optimizer)
    return distributed.full_model_state(model), distributed.full_optimizer_state(model, optimizer)


def load_full_states(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict
) -> None:
    """Load one-process-layout states (any strategy's checkpoint) into the model as this run lays it out."""
    if _tensor_parallel(model):
        tp_load_full_states(model, optimizer, model_state, optim_state)
    else:
        distributed.load_full_states(model, optimizer, model_state, optim_state)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip to the global gradient norm and return it: over the shards for tp models (a DTensor under
    FSDP2; the caller takes its full value)."""
    if _tensor_parallel(model):
        from mambakit.parallel.tensor_parallel import clip_grad_norm_

        return clip_grad_norm_(model, max_norm)
    return nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def _is_moment(v: object) -> bool:
    """Optimizer state shaped like its parameter (AdamW's moments), not a scalar such as `step`."""
    return torch.is_tensor(v) and v.dim() > 0


_FULL = StateDictOptions(full_state_dict=True)


def tp_full_states(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) of a tp or fsdp_tp model in the one-process layout, on the CPU,
    on every process (collective). FSDP shards are gathered by `torch.distributed.checkpoint`'s full
    state dicts, then TP shards (weights and AdamW moments) by `gather_full`; the optimizer state is
    keyed by parameter name, as `full_optimizer_state`."""
    from mambakit.parallel import full_state_dict, gather_full

    plan, group = _plan(model), model.tp_group
    model_state = full_state_dict(model)
    osd = get_optimizer_state_dict(model, optimizer, options=_FULL)
    state = {}
    for name in (n for n, _ in model.named_parameters() if n in osd["state"]):  # same order everywhere
        s = osd["state"][name]
        moments = {f"{name}/{k}": v for k, v in s.items() if _is_moment(v)}
        full = gather_full(moments, {k: plan[name] for k in moments} if name in plan else {}, group)
        state[name] = {k: _cpu(full.get(f"{name}/{k}", v)) for k, v in s.items()}
    return {k: v.cpu() for k, v in model_state.items()}, {"state": state, "param_groups": osd["param_groups"]}


def tp_load_full_states(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict
) -> None:
    """Load one-process-layout states (from any strategy's checkpoint) into a tp or fsdp_tp model: each
    process keeps its TP shard of the sharded parameters and of their moments (FSDP then takes its own
    shard through `torch.distributed.checkpoint`)."""
    plan = _plan(model)
    rank, world = dist.get_rank(model.tp_group), dist.get_world_size(model.tp_group)

    def shard(name: str, v: torch.Tensor) -> torch.Tensor:
        return plan[name].local(v, rank, world) if name in plan else v

    set_model_state_dict(model, {k: shard(k, v) for k, v in model_state.items()}, options=_FULL)
    state = {
        name: {k: shard(name, v) if _is_moment(v) else v for k, v in s.items()}
        for name, s in optim_state["state"].items()
    }
    osd = {"state": state, "param_groups": optim_state["param_groups"]}
    set_optimizer_state_dict(model, optimizer, osd, options=_FULL)


def _cpu(v: object) -> object:
    return v.cpu() if torch.is_tensor(v) else v
