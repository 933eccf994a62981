"""2-D parallelism, FSDP2 x tensor parallel, over a DeviceMesh with dimensions ("dp", "tp"), and the
unsharded state dict that makes checkpoints independent of the layout.

`parallelize_fsdp_tp` shards each mixer over "tp" (`parallelize_tensor`: plain local tensors), then
applies FSDP2 `fully_shard` over "dp" to each block and to the root, as `training.distributed` does for
1-D FSDP. Rows of a batch are split over "dp" only: the ranks of one "tp" group take the same rows.
FSDP2 averages gradients over "dp": scale the loss by the "dp" size to get sums (as the trainer does).

Checkpoints: `full_state_dict` gathers FSDP shards (over "dp") and then TP shards (over "tp", with
`gather_full`) into the one-process state dict with mambakit's names. Save it in the own format
(`save_full`); any layout loads it by building the model from the checkpoint and parallelizing it,
since the parallelize functions cut shards from full weights.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from mambakit.parallel.tensor_parallel import gather_full, parallelize_tensor

__all__ = ["full_state_dict", "parallelize_fsdp_tp", "save_full"]


def parallelize_fsdp_tp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """TP over mesh["tp"], then FSDP2 over mesh["dp"], of a built `LanguageModel` (same weights on
    every rank), in place; returns the model."""
    from torch.distributed.fsdp import fully_shard

    names = mesh.mesh_dim_names or ()
    if tuple(names) != ("dp", "tp"):
        raise ValueError(f"mesh must have dimensions ('dp', 'tp'), got {names!r}")
    parallelize_tensor(model, mesh.get_group("tp"))
    # the trainer never modifies a module's output in place (see training.distributed)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for block in model.backbone.layers:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded, name-keyed state dict of a model parallelized with any of TP, FSDP2 or both, on
    every rank (collective: call it on all ranks)."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    plan = getattr(model, "tp_plan", None)
    if plan:
        sd = gather_full(sd, plan, model.tp_group)
    return sd


def save_full(model: nn.Module, directory: str | os.PathLike, is_main: bool) -> None:
    """Write the unsharded model in mambakit's own format (config.json + model.safetensors) from the
    main rank; collective (every rank gathers)."""
    from mambakit.models import LanguageModel

    sd = full_state_dict(model)
    if is_main:
        with torch.device("meta"):
            plain = LanguageModel(model.config)
        plain.load_state_dict(sd, assign=True)
        plain.tie_weights()
        plain.save_pretrained(directory)
