"""Context parallelism applied from outside to a built `LanguageModel`: each rank holds one contiguous,
equal-length slice of every sequence (rank order = sequence order) and the mixers' forwards are
replaced, per instance, by versions that call the context-parallel ops (parameter names unchanged).

- Mamba-2 / Mamba-1: `context_parallel_causal_conv1d` (halo of width-1 inputs from the previous rank)
  and `context_parallel_ssd` / `context_parallel_selective_scan` (state combine across ranks).
- Attention: all-gather of K and V (after the rotary embedding, which uses global positions) and a
  causal mask with this rank's offset. Chosen over PyTorch's context-parallel SDPA
  (`torch.distributed.tensor.experimental.context_parallel`) because the latter wants DTensor inputs
  and a ring over the whole buffer, does not take the document (seq_idx) masks packed training needs
  and is experimental; at hybrid scale (few attention layers, KV heads grouped) gathering K/V costs
  little. Contiguous slices leave causal attention unbalanced (later ranks attend to more keys).
- MLP: position-wise, unchanged.
seq_idx is each rank's slice of the document ids and keeps working across the split; cu_seqlens and
inference caches are refused. Parameters are replicated: sum their gradients over the group (as DDP or
FSDP over a combined data x context group would), see `sum_gradients`.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from mambakit.layers import MLP, Attention, Mamba1, Mamba2
from mambakit.layers.packing import check_hidden
from mambakit.layers.ssm_init import state_dtype
from mambakit.parallel.comm import all_gather_stack, gather_stack
from mambakit.parallel.context_parallel import (
    context_parallel_causal_conv1d,
    context_parallel_selective_scan,
    context_parallel_ssd,
)

__all__ = ["parallelize_context", "sum_gradients"]


def _refuse(cu_seqlens, cache) -> None:
    if cu_seqlens is not None:
        raise ValueError("cu_seqlens is not supported under context parallelism: pass each rank's seq_idx")
    if cache is not None:
        raise ValueError("cache (inference) is not supported under context parallelism")


def _mamba2_forward(self: Mamba2, hidden_states, seq_idx=None, cu_seqlens=None, cache=None):
    """Mamba2.forward on this rank's slice: (batch, seqlen_r, d_model) -> (batch, seqlen_r, d_model)."""
    _refuse(cu_seqlens, cache)
    check_hidden(hidden_states, self.d_model)
    batch, seqlen, _ = hidden_states.shape
    z, xBC, dt = self.in_proj(hidden_states).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
    xBC = context_parallel_causal_conv1d(
        xBC, self._conv_weight(), self.conv1d.bias, "silu", seq_idx=seq_idx, group=self.cp_group
    )
    x, B, C = self._split_xbc(xBC)
    A = -torch.exp(self.A_log.to(state_dtype(self.A_log.dtype)))
    y = context_parallel_ssd(
        x, dt, A, B, C, self.chunk_size, self.D, None, self.dt_bias, True, self.dt_limit,
        seq_idx=seq_idx, group=self.cp_group,
    )  # fmt: skip
    y = self.norm(y.reshape(batch, seqlen, self.d_inner), z)
    return self.out_proj(y)


def _mamba1_forward(self: Mamba1, hidden_states, seq_idx=None, cu_seqlens=None, cache=None):
    """Mamba1.forward on this rank's slice: (batch, seqlen_r, d_model) -> (batch, seqlen_r, d_model)."""
    _refuse(cu_seqlens, cache)
    check_hidden(hidden_states, self.d_model)
    x, z = self.in_proj(hidden_states).chunk(2, dim=-1)
    x = context_parallel_causal_conv1d(
        x, self._conv_weight(), self.conv1d.bias, "silu", seq_idx=seq_idx, group=self.cp_group
    )
    dt, B, C = self._ssm_inputs(x)
    A = -torch.exp(self.A_log.to(state_dtype(self.A_log.dtype)))
    y = context_parallel_selective_scan(
        x, dt, A, B, C, self.D, z, self.dt_proj.bias, True, seq_idx=seq_idx, group=self.cp_group
    )
    return self.out_proj(y)


def _flatten_ranks(t: torch.Tensor) -> torch.Tensor:
    """(world, batch, seqlen_r, ...) -> (batch, world * seqlen_r, ...)."""
    return t.transpose(0, 1).flatten(1, 2)


def _attention_forward(self: Attention, hidden_states, seq_idx=None, cu_seqlens=None, cache=None):
    """Causal attention of this rank's queries over the keys of all ranks (all-gathered K, V)."""
    _refuse(cu_seqlens, cache)
    if not self.causal:
        raise ValueError("context parallelism supports causal attention only")
    check_hidden(hidden_states, self.d_model)
    group = self.cp_group
    batch, seqlen, _ = hidden_states.shape
    dev = hidden_states.device
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    lengths = gather_stack(torch.tensor([seqlen], device=dev), group)
    if bool((lengths != seqlen).any()):
        raise ValueError(
            f"hidden_states must have the same seqlen on every rank, got {lengths.flatten().tolist()}"
        )
    total = world * seqlen
    key_pos = torch.arange(total, device=dev)
    pos = (rank * seqlen + torch.arange(seqlen, device=dev)).expand(batch, seqlen)
    if seq_idx is not None:
        ids = _flatten_ranks(gather_stack(seq_idx, group))  # (batch, total)
        is_start = torch.zeros_like(ids, dtype=torch.bool)
        is_start[:, 1:] = ids[:, 1:] != ids[:, :-1]
        start_all = torch.where(is_start, key_pos, 0).cummax(dim=1).values
        start = start_all[:, rank * seqlen : (rank + 1) * seqlen]
    else:
        start = torch.zeros_like(pos)
    q, k, v = self._qkv(hidden_states)
    q, k = self._rotate(q, k, pos - start)
    k = _flatten_ranks(all_gather_stack(k, group))  # (batch, total, num_kv_heads, head_dim)
    v = _flatten_ranks(all_gather_stack(v, group))
    mask = (key_pos <= pos[..., None]) & (key_pos >= start[..., None])  # (batch, seqlen, total)
    return self._attend(q, k, v, mask[:, None], is_causal=False)


_FORWARDS = {Mamba2: _mamba2_forward, Mamba1: _mamba1_forward, Attention: _attention_forward}


def parallelize_context(model: nn.Module, group: ProcessGroup) -> nn.Module:
    """Make every mixer of `model` (a built `LanguageModel`) run on sequence slices split over `group`,
    in place. Call the model with this rank's slice of input_ids (batch, seqlen / world) and seq_idx."""
    if getattr(model, "cp_group", None) is not None:
        raise ValueError("model is already context-parallel (parallelize_context was applied to it)")
    for block in model.backbone.layers:
        mixer = block.mixer
        if isinstance(mixer, MLP):
            continue
        forward = _FORWARDS.get(type(mixer))
        if forward is None:
            raise TypeError(f"context parallelism does not know the mixer {type(mixer).__name__}")
        mixer.cp_group = group
        mixer.forward = MethodType(forward, mixer)
    model.cp_group = group
    return model


def sum_gradients(model: nn.Module, group: ProcessGroup) -> None:
    """All-reduce (sum) every parameter's gradient over `group`: with the loss summed over all tokens
    of all ranks, the result is the one-process gradient."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
