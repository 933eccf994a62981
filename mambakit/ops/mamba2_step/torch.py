"""PyTorch backend of `mamba2_block_step`: the reference's composition over the PyTorch backends of the
step ops (what a Mamba-2 block's step runs on a CPU)."""

from __future__ import annotations

import torch

from mambakit.ops.conv1d import torch as conv_torch
from mambakit.ops.mamba2_step.reference import compose_block_step
from mambakit.ops.norm import torch as norm_torch
from mambakit.ops.ssd import torch as ssd_torch


def mamba2_block_step_impl(*args) -> tuple[torch.Tensor, torch.Tensor]:
    return compose_block_step(
        norm_torch.add_rms_norm_impl, conv_torch.causal_conv1d_update_impl, ssd_torch.ssd_state_update_impl,
        norm_torch.gated_rms_norm_impl, *args,
    )  # fmt: skip
