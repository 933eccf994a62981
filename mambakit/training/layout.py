"""How each `distributed.strategy` splits a training step over the processes torchrun started.

- ddp, fsdp: data parallel. Each process takes its share of the micro-batches; the wrappers average
  gradients over processes.
- tp: tensor parallel over all processes (`mambakit.parallel.parallelize_tensor`). Every process
  takes every micro-batch whole; the model's own collectives make the gradients those of one
  process, and each process computes the whole loss.
- cp: context parallel over all processes (`mambakit.parallel.parallelize_context`). Every process
  takes every micro-batch's rows but only its slice of the sequence (seq_len / world_size tokens);
  the loss and the gradients are sums over the slices.

`Layout` carries what the trainer's loop needs to know about that; `split_sequence` cuts a batch for
cp. The tp checkpoint helpers gather sharded parameters (and their optimizer state) into the one-
process layout and shard them back, so checkpoints move between strategies and process counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mambakit.training.data import Batch
from mambakit.training.distributed import DistInfo

STRATEGIES = ("ddp", "fsdp", "tp", "cp")


@dataclass(frozen=True)
class Layout:
    strategy: str
    data_rank: int  # which share of the micro-batches this process takes
    data_world: int  # how many shares there are
    seq_rank: int  # which slice of the sequence (cp), else 0
    seq_world: int  # how many slices (cp), else 1

    @property
    def grad_scale(self) -> float:
        """Factor on the summed loss before backward so that gradients come out as the sum over the
        global batch: the data-parallel wrappers average over processes, tp and cp do not."""
        return float(self.data_world) if self.strategy in ("ddp", "fsdp") else 1.0

    @property
    def loss_is_replicated(self) -> bool:
        """Every process holds the same whole loss (tp): logged sums must not be summed over processes."""
        return self.strategy == "tp" and self.seq_world == 1 and self.data_world == 1


def layout(strategy: str, info: DistInfo, seq_len: int) -> Layout:
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not info.enabled or strategy in ("ddp", "fsdp"):
        return Layout(strategy, info.rank, info.world_size, 0, 1)
    if strategy == "cp" and seq_len % info.world_size:
        raise ValueError(
            f"data.seq_len={seq_len} must be a multiple of the number of processes ({info.world_size}) "
            "for distributed.strategy='cp'"
        )
    if strategy == "cp":
        return Layout(strategy, 0, 1, info.rank, info.world_size)
    return Layout(strategy, 0, 1, 0, 1)


def split_sequence(batch: Batch, lay: Layout) -> Batch:
    """This process's slice of the sequence of `batch` (cp); the batch itself otherwise."""
    if lay.seq_world == 1:
        return batch
    per = batch.input_ids.shape[1] // lay.seq_world
    cut = slice(lay.seq_rank * per, (lay.seq_rank + 1) * per)
    seq_idx = None if batch.seq_idx is None else batch.seq_idx[:, cut]
    return Batch(batch.input_ids[:, cut], batch.targets[:, cut], seq_idx)


def parallelize_model(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """Apply tp or cp to a built model over all processes (every process built the same weights)."""
    from mambakit.parallel import parallelize_context, parallelize_tensor

    group = dist.group.WORLD
    return parallelize_tensor(model, group) if strategy == "tp" else parallelize_context(model, group)


def sum_gradients_cp(model: nn.Module) -> None:
    """cp: each process's gradients come from its slice of the sequence; the step needs their sum."""
    from mambakit.parallel import sum_gradients

    sum_gradients(model, dist.group.WORLD)


def _plan(model: nn.Module) -> dict:
    return getattr(model, "tp_plan", None) or {}


def _is_moment(v: object) -> bool:
    """Optimizer state shaped like its parameter (AdamW's moments), not a scalar such as `step`."""
    return torch.is_tensor(v) and v.dim() > 0


def tp_full_states(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) of a tp model in the one-process layout, on the CPU, on every
    process (collective). The optimizer state is keyed by parameter name, as `full_optimizer_state`."""
    from mambakit.parallel import gather_full

    plan, group = _plan(model), model.tp_group
    model_state = gather_full({k: v.detach() for k, v in model.state_dict().items()}, plan, group)
    names = {id(p): n for n, p in model.named_parameters()}
    state = {}
    for name, p in model.named_parameters():  # the same order on every process: the gathers pair up
        s = optimizer.state.get(p)
        if not s:
            continue
        moments = {f"{name}/{k}": v for k, v in s.items() if _is_moment(v)}
        full = gather_full(moments, {k: plan[name] for k in moments} if name in plan else {}, group)
        state[name] = {k: _cpu(full.get(f"{name}/{k}", v)) for k, v in s.items()}
    groups = [{**g, "params": [names[id(p)] for p in g["params"]]} for g in optimizer.param_groups]
    return {k: v.cpu() for k, v in model_state.items()}, {"state": state, "param_groups": groups}


def tp_load_full_states(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict
) -> None:
    """Load one-process-layout states (from any strategy's checkpoint) into a tp model: each process
    keeps its shard of the sharded parameters and of their optimizer state."""
    plan = _plan(model)
    rank, world = dist.get_rank(model.tp_group), dist.get_world_size(model.tp_group)

    def shard(name: str, v: torch.Tensor) -> torch.Tensor:
        return plan[name].local(v, rank, world) if name in plan else v

    model.load_state_dict({k: shard(k, v) for k, v in model_state.items()})
    params = dict(model.named_parameters())
    index = {}  # parameter name -> its position in the optimizer, as `Optimizer.load_state_dict` wants
    for g in optimizer.param_groups:
        for p in g["params"]:
            index[next(n for n, q in params.items() if q is p)] = len(index)
    state = {
        index[name]: {k: shard(name, v).to(params[name].device) if _is_moment(v) else v for k, v in s.items()}
        for name, s in optim_state["state"].items()
    }
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in optim_state["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _cpu(v: object) -> object:
    return v.cpu() if torch.is_tensor(v) else v
