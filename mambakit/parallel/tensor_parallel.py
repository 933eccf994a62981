"""Tensor parallelism (Megatron-style) applied from outside to a built `LanguageModel`.

Each mixer's parameters are replaced by this rank's shard (plain local tensors, a module swap in
place: the layer code runs unchanged on local sizes) and hooks add the communication:
- input projections are column-parallel: `copy_to_parallel` on their input (its gradient is summed);
- output projections are row-parallel: `reduce_from_parallel` on their output, the one all-reduce of a
  mixer in the forward (a bias is added once, after the sum);
- Mamba-2: in_proj rows z | x | B | C | dt are split per block, so the local in_proj yields
  [z_r | x_r | B_r | C_r | dt_r] for this rank's heads and B/C groups (ngroups divisible by the TP
  degree: each rank owns whole groups and the heads that read them); conv, SSD, A_log, D, dt_bias and
  the gated RMSNorm (groups of d_inner / ngroups, aligned with shards) are local;
- Mamba-1: in_proj rows x | z split over channels, conv, dt_proj rows, A_log, D local; x_proj reads
  channel-sharded x, so its output (dt_low | B | C) is a partial sum: `reduce_both` all-reduces it in
  forward (every rank then has the unsharded dt_low, B, C) and in backward (the rank's channels each
  use it: the gradient is the sum over ranks). One extra (small) all-reduce a Mamba-1 block;
- attention: query heads and KV heads split (both divisible by the degree), out_proj row-parallel;
- MLP: fc1 column-parallel (SwiGLU's y | gate blocks split separately), fc2 row-parallel.
Embedding, LM head and norms are replicated: the vocabularies here are small, the logits and the loss
stay the one-process code, and a tied head needs nothing special (vocab-parallel would need a
vocab-parallel cross-entropy). Their gradients come out identical on every rank.

`model.tp_plan` records every sharded parameter as (dim, block sizes): this rank's tensor is the
concatenation, block by block, of its 1/degree piece of each block; `gather_full` undoes it (for
checkpoints in the own format and for tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from mambakit.layers import MLP, Attention, Mamba1, Mamba2
from mambakit.parallel.comm import copy_to_parallel, reduce_both, reduce_from_parallel

__all__ = ["ShardSpec", "clip_grad_norm_", "gather_full", "parallelize_tensor"]


@dataclass(frozen=True)
class ShardSpec:
    """A parameter sharded along `dim` in `blocks` (global sizes, each divisible by the degree)."""

    dim: int
    blocks: tuple[int, ...]

    def local(self, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        pieces, start = [], 0
        for size in self.blocks:
            part = size // world
            pieces.append(full.narrow(self.dim, start + rank * part, part))
            start += size
        return torch.cat(pieces, dim=self.dim)

    def full(self, locals_: list[torch.Tensor]) -> torch.Tensor:
        world, out, start = len(locals_), [], 0
        for size in self.blocks:
            part = size // world
            out.extend(t.narrow(self.dim, start, part) for t in locals_)
            start += part
        return torch.cat(out, dim=self.dim)


def _require(name: str, value: int, world: int, what: str) -> None:
    if value % world != 0:
        raise ValueError(f"{name}={value} must be divisible by the tensor-parallel degree {world} ({what})")


def _mixer_plan(mixer: nn.Module, world: int) -> dict[str, ShardSpec]:
    """Shard specs of a mixer's parameters (names relative to the mixer); sizes checked."""
    if isinstance(mixer, Mamba2):
        _require("ngroups", mixer.ngroups, world, "each rank owns whole B/C groups")
        gn = mixer.ngroups * mixer.d_state
        conv = ShardSpec(0, (mixer.d_inner, gn, gn))
        heads = ShardSpec(0, (mixer.nheads,))
        inp = ShardSpec(0, (mixer.d_inner, mixer.d_inner, gn, gn, mixer.nheads))
        plan = {"in_proj.weight": inp, "in_proj.bias": inp, "conv1d.weight": conv, "conv1d.bias": conv,
                "dt_bias": heads, "A_log": heads, "D": heads, "norm.weight": ShardSpec(0, (mixer.d_inner,)),
                "out_proj.weight": ShardSpec(1, (mixer.d_inner,))}  # fmt: skip
    elif isinstance(mixer, Mamba1):
        _require("d_inner", mixer.d_inner, world, "Mamba-1 channels")
        ch = ShardSpec(0, (mixer.d_inner,))
        inp = ShardSpec(0, (mixer.d_inner, mixer.d_inner))
        plan = {"in_proj.weight": inp, "in_proj.bias": inp, "conv1d.weight": ch, "conv1d.bias": ch,
                "x_proj.weight": ShardSpec(1, (mixer.d_inner,)), "dt_proj.weight": ch, "dt_proj.bias": ch,
                "A_log": ch, "D": ch, "out_proj.weight": ShardSpec(1, (mixer.d_inner,))}  # fmt: skip
    elif isinstance(mixer, Attention):
        _require("num_kv_heads", mixer.num_kv_heads, world, "attention KV heads")
        hd = mixer.head_dim
        inp = ShardSpec(0, (mixer.num_heads * hd, mixer.num_kv_heads * hd, mixer.num_kv_heads * hd))
        plan = {
            "in_proj.weight": inp,
            "in_proj.bias": inp,
            "out_proj.weight": ShardSpec(1, (mixer.num_heads * hd,)),
        }
    elif isinstance(mixer, MLP):
        width = mixer.fc2.in_features
        _require("d_intermediate", width, world, "MLP width")
        fc1 = ShardSpec(0, (width, width) if mixer.activation == "swiglu" else (width,))
        plan = {"fc1.weight": fc1, "fc1.bias": fc1, "fc2.weight": ShardSpec(1, (width,))}
    else:
        raise TypeError(f"tensor parallelism does not know the mixer {type(mixer).__name__}")
    params = dict(mixer.named_parameters())
    return {k: v for k, v in plan.items() if params.get(k) is not None}


def _set_local_sizes(mixer: nn.Module, world: int) -> None:
    """The attributes the layer code reads, divided to this rank's share."""
    if isinstance(mixer, Mamba2):
        mixer.d_inner //= world
        mixer.nheads //= world
        mixer.ngroups //= world
        mixer.conv_dim //= world
    elif isinstance(mixer, Mamba1):
        mixer.d_inner //= world
    elif isinstance(mixer, Attention):
        mixer.num_heads //= world
        mixer.num_kv_heads //= world
    for lin in mixer.modules():
        if isinstance(lin, nn.Linear):
            lin.out_features, lin.in_features = lin.weight.shape


def _reduce_output(group: ProcessGroup):
    def hook(module: nn.Linear, args, output: torch.Tensor) -> torch.Tensor:
        if module.bias is None:
            return reduce_from_parallel(output, group)
        return reduce_from_parallel(output - module.bias, group) + module.bias  # the bias once

    return hook


def _copy_input(group: ProcessGroup):
    def hook(module: nn.Module, args):
        return (copy_to_parallel(args[0], group), *args[1:])

    return hook


def _input_projections(mixer: nn.Module) -> list[nn.Linear]:
    return [mixer.fc1] if isinstance(mixer, MLP) else [mixer.in_proj]


def _output_projection(mixer: nn.Module) -> nn.Linear:
    return mixer.fc2 if isinstance(mixer, MLP) else mixer.out_proj


def parallelize_tensor(model: nn.Module, group: ProcessGroup) -> nn.Module:
    """Shard every mixer of `model` (a built `LanguageModel`, same weights on every rank) over the ranks
    of `group` (for a DeviceMesh: `mesh.get_group("tp")`), in place. Returns the model, with
    `model.tp_plan` ({parameter name: ShardSpec}) and `model.tp_group` set."""
    if getattr(model, "tp_plan", None) is not None:
        raise ValueError("model is already tensor-parallel (parallelize_tensor was applied to it)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    plan: dict[str, ShardSpec] = {}
    for i, block in enumerate(model.backbone.layers):
        mixer = block.mixer
        specs = _mixer_plan(mixer, world)
        with torch.no_grad():
            for name, spec in specs.items():
                owner_name, _, attr = name.rpartition(".")
                owner = mixer.get_submodule(owner_name) if owner_name else mixer
                old = getattr(owner, attr)
                new = nn.Parameter(spec.local(old, rank, world).clone(), requires_grad=old.requires_grad)
                new.__dict__.update({k: v for k, v in old.__dict__.items() if k.startswith("_no_")})
                setattr(owner, attr, new)
                plan[f"backbone.layers.{i}.mixer.{name}"] = spec
        _set_local_sizes(mixer, world)
        for proj in _input_projections(mixer):
            proj.register_forward_pre_hook(_copy_input(group))
        _output_projection(mixer).register_forward_hook(_reduce_output(group))
        if isinstance(mixer, Mamba1):
            mixer.x_proj.register_forward_hook(lambda m, a, out: reduce_both(out, group))
    model.tp_plan = plan
    model.tp_group = group
    return model


def gather_full(tensors: dict[str, torch.Tensor], plan: dict[str, ShardSpec], group: ProcessGroup):
    """{name: this rank's tensor} -> {name: unsharded tensor} on every rank (parameters, gradients or
    a state dict); names not in `plan` are replicated and returned as they are. Collective."""
    out = {}
    for name, t in tensors.items():
        spec = plan.get(name)
        if spec is None:
            out[name] = t
            continue
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        out[name] = spec.full(parts)
    return out


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients of a TP (or FSDP2 x TP) model by their global L2 norm, as
    `torch.nn.utils.clip_grad_norm_` would on the one-process model; returns that norm (on every rank).

    Squares of TP-sharded gradients are summed over the "tp" group; replicated ones are counted once.
    FSDP2 gradients (DTensors over "dp") contribute their local shards, summed over "dp". Collective.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm!r}")
    plan = getattr(model, "tp_plan", {})
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    dp_group = None
    grads = []
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad
        if hasattr(g, "to_local"):  # DTensor from FSDP2
            dp_group = g.device_mesh.get_group()
            g = g.to_local()
        grads.append(g)
        sq = g.double().square().sum().cpu()
        if name in plan:
            sharded += sq
        else:
            replicated += sq
    if plan:
        dist.all_reduce(sharded, group=model.tp_group)
    total = sharded + replicated
    if dp_group is not None:
        dist.all_reduce(total, group=dp_group)
    norm = total.sqrt().float()
    scale = max_norm / (float(norm) + 1e-6)
    if scale < 1:
        for g in grads:
            g.mul_(scale)
    return norm
