"""Reference backend of `mamba2_block_step`: the pre-norm Mamba-2 block's decoding step written as the
layers compute it, op by op, with the same roundings to the model's dtype between ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mambakit.ops.conv1d import reference as conv_ref
from mambakit.ops.norm import reference as norm_ref
from mambakit.ops.ssd import reference as ssd_ref


def compose_block_step(
    add_rms_norm, conv_update, state_update, gated_rms_norm,
    hidden, residual, norm_weight, norm_eps, residual_in_fp32, in_proj_weight, conv_state, conv_weight,
    conv_bias, dt_bias, A_log, D, dt_limit, ssm_state, ngroups, gate_norm_weight, gate_norm_eps,
    gate_group_size, norm_before_gate, out_proj_weight,
):  # fmt: skip
    """The block's step from four step-op implementations (add_rms_norm, causal_conv1d_update,
    ssd_state_update, gated_rms_norm), each with its backend's positional arguments."""
    batch = hidden.shape[0]
    _, nheads, headdim, dstate = ssm_state.shape
    d_inner = nheads * headdim
    gn = ngroups * dstate
    normed, residual_out = add_rms_norm(hidden, residual, norm_weight, norm_eps, residual_in_fp32)
    z, xBC, dt = F.linear(normed, in_proj_weight).split([d_inner, d_inner + 2 * gn, nheads], dim=-1)
    xBC = conv_update(xBC, conv_state, conv_weight, conv_bias, "silu")
    x, B, C = xBC.split([d_inner, gn, gn], dim=-1)
    y = state_update(
        ssm_state, x.reshape(batch, nheads, headdim), dt, A_log, B.reshape(batch, ngroups, dstate),
        C.reshape(batch, ngroups, dstate), D, None, dt_bias, True, dt_limit, True,
    )  # fmt: skip
    y = gated_rms_norm(y.reshape(batch, d_inner), z, gate_norm_weight, gate_norm_eps, gate_group_size,
                       norm_before_gate)  # fmt: skip
    return F.linear(y, out_proj_weight), residual_out


def mamba2_block_step_impl(*args) -> tuple[torch.Tensor, torch.Tensor]:
    return compose_block_step(
        norm_ref.add_rms_norm_impl, conv_ref.causal_conv1d_update_impl, ssd_ref.ssd_state_update_impl,
        norm_ref.gated_rms_norm_impl, *args,
    )  # fmt: skip
