"""Multi-head attention with grouped-query heads, optional rotary embedding and a KV cache.

Shapes: hidden (batch, seqlen, d_model); q (batch, seqlen, num_heads, head_dim); k, v (batch, seqlen,
num_kv_heads, head_dim); every group of num_heads // num_kv_heads query heads shares one k/v head.
Packed documents (seq_idx) attend only within their document, and rotary positions restart at each
document, so a packed batch computes what separate runs would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mambakit.layers.packing import check_hidden, check_state_batch, resolve_seq_idx
from mambakit.layers.rotary import apply_rotary, rotary_cos_sin
from mambakit.layers.state import KVCache


class Attention(nn.Module):
    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        rotary_emb_dim: int = 0,
        rope_theta: float = 10000.0,
        qkv_bias: bool = False,
        out_bias: bool = False,
        causal: bool = True,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        num_kv_heads = num_kv_heads or num_heads
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads={num_kv_heads} must be positive and divide num_heads={num_heads}")
        if head_dim is None:
            if d_model % num_heads != 0:
                raise ValueError(f"num_heads={num_heads} must divide d_model={d_model} when head_dim is None")
            head_dim = d_model // num_heads
        if rotary_emb_dim < 0 or rotary_emb_dim % 2 != 0 or rotary_emb_dim > head_dim:
            raise ValueError(f"rotary_emb_dim={rotary_emb_dim} must be even and in [0, head_dim={head_dim}]")
        self.d_model = d_model
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.rotary_emb_dim = rotary_emb_dim
        self.rope_theta = rope_theta
        self.causal = causal
        self.layer_idx = layer_idx
        self.in_proj = nn.Linear(d_model, (num_heads + 2 * num_kv_heads) * head_dim, bias=qkv_bias, **kw)
        self.out_proj = nn.Linear(num_heads * head_dim, d_model, bias=out_bias, **kw)

    def _qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, seqlen, _ = hidden_states.shape
        hd, nh, nkv = self.head_dim, self.num_heads, self.num_kv_heads
        q, k, v = self.in_proj(hidden_states).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        return (
            q.reshape(batch, seqlen, nh, hd),
            k.reshape(batch, seqlen, nkv, hd),
            v.reshape(batch, seqlen, nkv, hd),
        )

    def _rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        if self.rotary_emb_dim == 0:
            return q, k
        dtype = torch.promote_types(q.dtype, torch.float32)
        cos, sin = rotary_cos_sin(positions, self.rotary_emb_dim, self.rope_theta, dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, is_causal: bool
    ) -> torch.Tensor:
        """q (b, lq, nh, hd), k, v (b, lk, nkv, hd), mask (b, 1, lq, lk) bool or None -> (b, lq, d_model)."""
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=is_causal,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        batch, _, lq, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, lq, self.num_heads * self.head_dim))

    def forward(
        self,
        hidden_states: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """hidden_states (batch, seqlen, d_model) -> (batch, seqlen, d_model).

        With `cache` this is a prefill: keys and values go into the cache after the tokens it already
        holds, and the queries attend to the cached prefix too (chunked prefill).
        """
        check_hidden(hidden_states, self.d_model)
        batch, seqlen, _ = hidden_states.shape
        seq_idx = resolve_seq_idx(seq_idx, cu_seqlens, batch, seqlen)
        if seq_idx is not None and (seq_idx.shape != (batch, seqlen) or seq_idx.is_floating_point()):
            raise ValueError(f"seq_idx must be an integer tensor of shape ({batch}, {seqlen})")
        dev = hidden_states.device
        offset = 0
        doc_start = torch.zeros(batch, dtype=torch.long, device=dev)
        if cache is not None:
            if not self.causal:
                raise ValueError("cache needs causal attention (causal=True)")
            check_state_batch("cache", cache.k.shape[0], batch)
            offset = cache.seqlen_offset
            if offset + seqlen > cache.max_seqlen:
                raise ValueError(
                    f"cache holds {offset} tokens and max_seqlen={cache.max_seqlen}: "
                    f"no room for {seqlen} more"
                )
            if offset > 0:
                doc_start = cache.doc_start.clone()

        # absolute cache positions of the queries, and where each query's document starts
        pos = offset + torch.arange(seqlen, device=dev).expand(batch, seqlen)
        if seq_idx is not None:
            is_start = torch.zeros(batch, seqlen, dtype=torch.bool, device=dev)
            is_start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
            start = torch.where(is_start, pos, doc_start[:, None]).cummax(dim=1).values
        else:
            start = doc_start[:, None].expand(batch, seqlen)

        q, k, v = self._qkv(hidden_states)
        q, k = self._rotate(q, k, pos - start)
        if cache is not None:
            with torch.no_grad():
                cache.k[:, offset : offset + seqlen] = k
                cache.v[:, offset : offset + seqlen] = v
                cache.doc_start.copy_(start[:, -1])
            cache.seqlen_offset += seqlen
            position = static_position(cache)
            if position is not None:
                position.fill_(cache.seqlen_offset)
            if offset > 0:
                k = torch.cat([cache.k[:, :offset].to(k.dtype), k], dim=1)
                v = torch.cat([cache.v[:, :offset].to(v.dtype), v], dim=1)

        if not self.causal:
            mask = None if seq_idx is None else (seq_idx[:, None, :, None] == seq_idx[:, None, None, :])
            return self._attend(q, k, v, mask, is_causal=False)
        if seq_idx is None and offset == 0:
            return self._attend(q, k, v, None, is_causal=True)
        key_pos = torch.arange(offset + seqlen, device=dev)
        mask = (key_pos <= pos[..., None]) & (key_pos >= start[..., None])  # (batch, seqlen, keys)
        return self._attend(q, k, v, mask[:, None], is_causal=False)

    def step(self, hidden_states: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token: hidden_states (batch, 1, d_model) -> (batch, 1, d_model); appends to `cache`.

        A cache in static mode (`enable_static_position`, as CUDA-graph decoding sets it) takes the
        write position from a device tensor and attends over the whole `max_seqlen` cache under a
        mask: no shape depends on the Python count, so the step can be captured and replayed.
        """
        check_hidden(hidden_states, self.d_model, step=True)
        check_state_batch("cache", cache.k.shape[0], hidden_states.shape[0])
        offset = cache.seqlen_offset
        if offset >= cache.max_seqlen:
            raise ValueError(f"cache is full: it holds max_seqlen={cache.max_seqlen} tokens")
        q, k, v = self._qkv(hidden_states)
        position = static_position(cache)
        if position is not None:
            return self._step_static(q, k, v, cache, position)
        q, k = self._rotate(q, k, (offset - cache.doc_start)[:, None])
        cache.k[:, offset] = k[:, 0]
        cache.v[:, offset] = v[:, 0]
        cache.seqlen_offset += 1
        key_pos = torch.arange(offset + 1, device=hidden_states.device)
        mask = (key_pos >= cache.doc_start[:, None])[:, None, None, :]  # (batch, 1, 1, keys)
        k_all = cache.k[:, : offset + 1].to(q.dtype)
        v_all = cache.v[:, : offset + 1].to(q.dtype)
        return self._attend(q, k_all, v_all, mask, is_causal=False)

    def _step_static(self, q, k, v, cache: KVCache, position: torch.Tensor) -> torch.Tensor:
        """The step with shapes fixed by max_seqlen; position (1,) int64 on the cache's device."""
        q, k = self._rotate(q, k, (position - cache.doc_start)[:, None])
        cache.k.index_copy_(1, position, k.to(cache.k.dtype))
        cache.v.index_copy_(1, position, v.to(cache.v.dtype))
        key_pos = torch.arange(cache.max_seqlen, device=q.device)
        mask = (key_pos >= cache.doc_start[:, None]) & (key_pos <= position)  # (batch, keys)
        position.add_(1)
        cache.seqlen_offset += 1
        return self._attend(q, cache.k.to(q.dtype), cache.v.to(q.dtype), mask[:, None, None, :], False)

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None, device=None, ssm_dtype=None
    ) -> KVCache:
        """Empty cache: k, v (batch, max_seqlen, num_kv_heads, head_dim) in `dtype` (`ssm_dtype` is for
        SSM layers and unused here)."""
        device = device or self.out_proj.weight.device
        dtype = dtype or self.out_proj.weight.dtype
        shape = (batch_size, max_seqlen, self.num_kv_heads, self.head_dim)
        return KVCache(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            doc_start=torch.zeros(batch_size, dtype=torch.long, device=device),
        )


def enable_static_position(cache: KVCache) -> torch.Tensor:
    """Put `cache` in static mode: from now on its steps read and advance a (1,) int64 device tensor
    holding the write position (kept equal to `cache.seqlen_offset` by prefills and steps), so a
    decode step has no Python-int-dependent shapes (CUDA-graph capture). Returns that tensor."""
    position = static_position(cache)
    if position is None:
        position = torch.full((1,), cache.seqlen_offset, dtype=torch.long, device=cache.k.device)
        cache._static_position = position  # type: ignore[attr-defined]
    return position


def static_position(cache: KVCache) -> torch.Tensor | None:
    """The device write position of a cache in static mode, else None."""
    return cache.__dict__.get("_static_position")
