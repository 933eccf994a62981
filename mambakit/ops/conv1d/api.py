"""Causal depthwise conv1d (+ SiLU) with conv state in and out: the one public entry and its step.

Backends: `reference.py`, `torch.py`, `triton/`; each defines `causal_conv1d_impl` and
`causal_conv1d_update_impl` with the arguments below (minus `backend`), already checked.
"""

from __future__ import annotations

import torch

from mambakit.ops._backend import BackendModules, resolve_backend
from mambakit.ops._checks import check_optional, check_seq_idx, check_tensor

_impl = BackendModules(__package__)
_IMPLEMENTED = _impl.implemented
_ACTIVATIONS = (None, "silu")


def _check_activation(activation: str | None) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution along the sequence.

    Shapes: x (batch, seqlen, dim); weight (dim, width); bias (dim,);
    initial_state and final state (batch, dim, width - 1): the width-1 inputs before position 0,
    oldest first; seq_idx (batch, seqlen) document ids.

        out_t[d] = act(bias[d] + sum_{k<width} weight[d, k] * x_{t - width + 1 + k}[d])

    Inputs before position 0 come from initial_state (zeros if None). With seq_idx, taps never reach
    into an earlier document (they read zeros); initial_state feeds only the first document of a row.
    The final state is the last width-1 inputs of the row (as the state of the last document), in x's
    dtype. Returns out (batch, seqlen, dim) in x's dtype, and the final state if return_final_state.
    """
    check_tensor("x", x, (None, None, None))
    batch, seqlen, dim = x.shape
    dev = x.device
    check_tensor("weight", weight, (dim, None), device=dev)
    width = weight.shape[1]
    if width < 1:
        raise ValueError(f"weight must have width >= 1, got shape {tuple(weight.shape)}")
    check_optional("bias", bias, (dim,), device=dev)
    _check_activation(activation)
    check_optional("initial_state", initial_state, (batch, dim, width - 1), device=dev)
    check_seq_idx(seq_idx, batch, seqlen, dev)
    name = resolve_backend(backend, dev, _IMPLEMENTED)
    out, final = _impl(name).causal_conv1d_impl(
        x, weight, bias, activation, initial_state, return_final_state, seq_idx
    )
    return (out, final) if return_final_state else out


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decoding step: shifts x into `conv_state` in place and returns the conv output.

    Shapes: x (batch, dim); conv_state (batch, dim, width - 1), oldest first; weight (dim, width);
    bias (dim,). Returns (batch, dim) in x's dtype.
    """
    check_tensor("x", x, (None, None))
    batch, dim = x.shape
    dev = x.device
    check_tensor("weight", weight, (dim, None), device=dev)
    check_tensor("conv_state", conv_state, (batch, dim, weight.shape[1] - 1), device=dev)
    check_optional("bias", bias, (dim,), device=dev)
    _check_activation(activation)
    name = resolve_backend(backend, dev, _IMPLEMENTED)
    return _impl(name).causal_conv1d_update_impl(x, conv_state, weight, bias, activation)


__all__ = ["causal_conv1d", "causal_conv1d_update"]
