"""CUDA-graph decoding: one captured `model.step` per batch size, replayed for every token.

A decode step launches a few dozen small kernels; at batch 1 their launch cost, not the GPU, sets the
speed. Capturing the step once into a CUDA graph and replaying it launches them all at once.

The graph is bound to fixed buffers: an `InferenceCache` allocated here (the decoder owns it, and
generation prefills into it), a static (batch, 1) input and the (batch, vocab) logits it writes. The
step must then have no Python-int-dependent shapes and no host syncs: the Mamba steps have none, and
attention caches are put in static mode (`enable_static_position`: the write position is a device
tensor and the step attends over the whole `max_seqlen` cache under a mask). Python-side counters
(`seqlen_offset`) are advanced by `step` after each replay, so eager code sees a consistent cache.

With `greedy=True` the graph also takes the argmax of the logits and feeds it back: it writes the
token into the static input (so the next replay needs no copy) and into column t of a (batch,
max_seqlen) token history at a device-side position. Greedy decoding is then one graph launch a token,
with nothing launched between replays (at batch 1 the argmax, the input copy and their launch gaps
outside the graph cost about as much as a whole block's step).

Graphs are kept per model in `model._mambakit_cuda_graphs`, keyed by batch size, and reused while the
capacity (`max_seqlen`) and dtype fit. They capture the parameters' addresses: after moving or
replacing parameters, call `clear_cuda_graphs(model)`.
"""

from __future__ import annotations

import torch
from torch import nn

from mambakit.inference.cache import InferenceCache, KVCache

_ATTR = "_mambakit_cuda_graphs"


class CUDAGraphDecoder:
    """A captured decode step for one batch size, with the cache it advances.

    `cache` is the cache to prefill into (`reset()` it first, or call `reset`); `step(tokens)` runs one
    token through the graph and returns the logits buffer (batch, vocab_size), valid until the next step.
    """

    def __init__(
        self, model: nn.Module, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
        warmup_steps: int = 2, compile: bool = False, ssm_dtype: torch.dtype | None = None,
        greedy: bool = False,
    ) -> None:  # fmt: skip
        device = model.backbone.embedding.weight.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, got {device}")
        self.model = model
        self.batch_size = batch_size
        self.max_seqlen = max_seqlen
        self.compiled = compile
        self.greedy = greedy
        # torch.compile fuses the step's small elementwise kernels before capture (~15% faster on
        # the 130M presets at batch 1 on an H100), at the cost of a compilation per batch size
        step_fn = torch.compile(model.step, dynamic=False) if compile else model.step
        self.cache_dtype = dtype or model.backbone.embedding.weight.dtype
        self.cache: InferenceCache = model.allocate_inference_cache(
            batch_size, max_seqlen, dtype=self.cache_dtype, ssm_dtype=ssm_dtype
        )
        self.ssm_dtype = ssm_dtype
        from mambakit.layers.attention import enable_static_position

        self._positions = [enable_static_position(s) for s in self.cache.states if isinstance(s, KVCache)]
        self.input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        # greedy: the argmax of each step, column t for step t (the position is a device tensor so that
        # the graph can advance it)
        self.history = torch.zeros(batch_size, max_seqlen if greedy else 0, dtype=torch.long, device=device)
        self._history_pos = torch.zeros(1, 1, dtype=torch.long, device=device)
        self._steps = 0

        def captured() -> torch.Tensor:
            logits = step_fn(self.input_ids, self.cache)[:, -1]
            if greedy:
                torch.argmax(logits, dim=-1, keepdim=True, out=self.input_ids)
                self.history.scatter_(1, self._history_pos.expand(batch_size, 1), self.input_ids)
                self._history_pos.add_(1)
            return logits

        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad():
            # warm up on a side stream (Triton compiles and autotunes, cuBLAS picks its kernels)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmup_steps + 2 * compile):
                    self.reset()
                    captured()
            torch.cuda.current_stream().wait_stream(stream)
            self.reset()
            with torch.cuda.graph(self.graph):
                self.logits = captured()
        self.reset()

    def reset(self) -> None:
        """Zero the cache and rewind it (and the attention write positions) to position 0."""
        self.cache.reset()
        for p in self._positions:
            p.zero_()
        self._history_pos.zero_()
        self._steps = 0

    def step(self, tokens: torch.Tensor | None) -> torch.Tensor:
        """tokens (batch,) or (batch, 1) int64 -> logits (batch, vocab_size), a buffer the next step
        overwrites. A greedy decoder also takes tokens=None: the step's input is then the previous
        step's argmax, already in place."""
        if self.cache.seqlen_offset >= self.max_seqlen:
            raise ValueError(f"cache is full: it holds max_seqlen={self.max_seqlen} tokens")
        if tokens is not None:
            self.input_ids.copy_(tokens.reshape(self.batch_size, 1))
        elif not self.greedy or self._steps == 0:
            raise ValueError(
                "tokens=None continues from the previous step's argmax: a greedy decoder after a step"
            )
        self.graph.replay()
        self._steps += 1
        self.cache.seqlen_offset += 1
        for s in self.cache.states:
            if s is not None:
                s.seqlen_offset += 1
        return self.logits

    def last_tokens(self) -> torch.Tensor:
        """A greedy decoder's argmax of the last step's logits, (batch,) int64: a view of the history,
        which later steps do not overwrite (until `reset`)."""
        if not self.greedy or self._steps == 0:
            raise ValueError("last_tokens() needs a greedy decoder (greedy=True) that has taken a step")
        return self.history[:, self._steps - 1]


def cuda_graph_decoder(
    model: nn.Module,
    batch_size: int,
    max_seqlen: int,
    dtype: torch.dtype | None = None,
    compile: bool = False,
    ssm_dtype: torch.dtype | None = None,
    greedy: bool = False,
) -> CUDAGraphDecoder:
    """The model's decoder for `batch_size`, captured now or reused (when it holds >= max_seqlen tokens
    and has the same cache and SSM-state dtypes and greedy flag); its cache is reset."""
    graphs: dict[int, CUDAGraphDecoder] = model.__dict__.setdefault(_ATTR, {})
    dec = graphs.get(batch_size)
    want_dtype = dtype or model.backbone.embedding.weight.dtype
    stale = dec is None or dec.max_seqlen < max_seqlen or dec.cache_dtype != want_dtype
    if stale or dec.compiled != compile or dec.ssm_dtype != ssm_dtype or dec.greedy != greedy:
        graphs.pop(batch_size, None)  # free the old graph and cache before capturing a new one
        del dec
        dec = CUDAGraphDecoder(
            model, batch_size, max_seqlen, dtype=want_dtype, compile=compile, ssm_dtype=ssm_dtype,
            greedy=greedy,
        )  # fmt: skip
        graphs[batch_size] = dec
    else:
        dec.reset()
    return dec


def clear_cuda_graphs(model: nn.Module) -> None:
    """Drop every captured decoder of `model` (and their caches)."""
    model.__dict__.pop(_ATTR, None)
