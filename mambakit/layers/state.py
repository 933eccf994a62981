"""Inference state: one state object per layer plus the count of tokens consumed.

These live beside the layers that allocate, fill and advance them, so that layers and models need
nothing from `mambakit.inference` (which imports them from here, as `mambakit.inference.cache`).

A Mamba layer keeps a constant-size state (the last `d_conv - 1` conv inputs and the SSM state); an
attention layer keeps a key/value cache that grows up to `max_seqlen`; an MLP keeps nothing (None).
The layers allocate their own state (`mixer.allocate_inference_cache`), write it during a prefill
(`mixer(hidden, cache=state)`) and advance it in place with `mixer.step(hidden, state)`; updating in
place keeps the buffers at fixed addresses, which CUDA-graph capture of a decode step needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MambaState:
    """State of one Mamba-1 or Mamba-2 layer.

    conv_state: (batch, conv_dim, d_conv - 1), activation dtype: the last inputs of the causal conv,
        oldest first (conv_dim = d_inner for Mamba-1, d_inner + 2 * ngroups * d_state for Mamba-2).
    ssm_state: float32 unless allocated with another `ssm_dtype` (bfloat16 / float16 halve it); Mamba-1
        (batch, d_inner, d_state), Mamba-2 (batch, nheads, headdim, d_state).
    seqlen_offset: tokens this layer has consumed; a prefill with seqlen_offset > 0 continues from
        the state (chunked prefill).
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor
    seqlen_offset: int = 0

    def reset(self) -> None:
        self.conv_state.zero_()
        self.ssm_state.zero_()
        self.seqlen_offset = 0


@dataclass
class KVCache:
    """Key/value cache of one attention layer.

    k, v: (batch, max_seqlen, num_kv_heads, head_dim), activation dtype; positions
        [0, seqlen_offset) are filled (keys after the rotary embedding).
    doc_start: (batch,) int64, the cache position where the current document of each row begins.
        After a prefill of packed documents (seq_idx) only the last document is continued, as the
        SSM layers continue only the last document's state; earlier positions are masked out.
    seqlen_offset: tokens this layer has consumed.
    """

    k: torch.Tensor
    v: torch.Tensor
    doc_start: torch.Tensor
    seqlen_offset: int = 0

    @property
    def max_seqlen(self) -> int:
        return self.k.shape[1]

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()
        self.doc_start.zero_()
        self.seqlen_offset = 0


LayerState = MambaState | KVCache | None


@dataclass
class InferenceCache:
    """The whole model's decoding state.

    states: one entry a layer (`MambaState`, `KVCache` or None for an MLP layer), in layer order.
    batch_size: rows decoded together; max_seqlen: capacity of the attention caches.
    seqlen_offset: tokens consumed so far (prompt plus generated); the model advances it.
    """

    states: list[LayerState]
    batch_size: int
    max_seqlen: int
    seqlen_offset: int = 0

    def reset(self) -> None:
        """Zero every state in place (the buffers keep their addresses) and rewind to position 0."""
        for state in self.states:
            if state is not None:
                state.reset()
        self.seqlen_offset = 0
