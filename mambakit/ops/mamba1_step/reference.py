"""Reference backend of `mamba1_block_step`: the pre-norm Mamba-1 block's decoding step written as the
layers compute it, op by op, with the same roundings to the model's dtype between ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambakit.ops.conv1d import reference as conv_ref
from mambakit.ops.norm import reference as norm_ref
from mambakit.ops.selective_scan import reference as scan_ref


def compose_block_step(
    add_rms_norm, conv_update, state_update,
    hidden, residual, norm_weight, norm_eps, residual_in_fp32, in_proj_weight, conv_state, conv_weight,
    conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A_log, D, ssm_state, out_proj_weight,
):  # fmt: skip
    """The block's step from three step-op implementations (add_rms_norm, causal_conv1d_update,
    selective_state_update), each with its backend's positional arguments. Shapes as in the entry."""
    d_inner = conv_weight.shape[0]
    dstate = A_log.shape[1]
    normed, residual_out = add_rms_norm(hidden, residual, norm_weight, norm_eps, residual_in_fp32)
    x, z = F.linear(normed, in_proj_weight).split([d_inner, d_inner], dim=-1)
    x = conv_update(x, conv_state, conv_weight, conv_bias, "silu")
    dt_rank = dt_proj_weight.shape[1]
    dt_low, B, C = F.linear(x, x_proj_weight).split([dt_rank, dstate, dstate], dim=-1)
    y = state_update(
        ssm_state, x, dt_low, A_log, B[:, None], C[:, None], D, z, dt_bias, True, True, dt_proj_weight
    )
    return F.linear(y, out_proj_weight), residual_out


def mamba1_block_step_impl(*args) -> tuple[torch.Tensor, torch.Tensor]:
    return compose_block_step(
        norm_ref.add_rms_norm_impl, conv_ref.causal_conv1d_update_impl, scan_ref.selective_state_update_impl,
        *args,
    )  # fmt: skip
