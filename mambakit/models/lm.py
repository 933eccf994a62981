"""The language model: embedding -> pattern of pre-norm residual blocks -> final RMSNorm -> LM head.

Parameter keys follow the official state-spaces checkpoints: backbone.embedding, backbone.layers.{i}.norm,
backbone.layers.{i}.mixer.*, backbone.norm_f, lm_head (tied to the embedding by default).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from mambakit import ops
from mambakit.layers import MLP, Attention, Block, Mamba1, Mamba2
from mambakit.layers.norm import RMSNorm
from mambakit.layers.state import InferenceCache
from mambakit.models.config import ModelConfig
from mambakit.ops._checks import values_unreadable


def build_mixer(kind: str, config: ModelConfig, layer_idx: int, device=None, dtype=None) -> nn.Module:
    """The mixer of one pattern character: 'M' SSM, '*' attention, '-' MLP."""
    kw = {"layer_idx": layer_idx, "device": device, "dtype": dtype}
    d = config.d_model
    if kind == "M":
        s = config.ssm
        if s.version == 1:
            return Mamba1(
                d, s.d_state, s.d_conv, s.expand, s.dt_rank, s.dt_min, s.dt_max, s.dt_init_floor,
                s.conv_bias, s.bias, **kw,
            )  # fmt: skip
        return Mamba2(
            d, s.d_state, s.d_conv, s.expand, s.headdim, s.ngroups, s.A_init_range, s.dt_min, s.dt_max,
            s.dt_init_floor, s.dt_limit, s.chunk_size, s.conv_bias, s.bias, s.norm_before_gate,
            config.norm_eps, **kw,
        )  # fmt: skip
    if kind == "*":
        a = config.attn
        return Attention(
            d, a.num_heads, a.num_kv_heads, a.head_dim, a.rotary_emb_dim, a.rope_theta, a.qkv_bias,
            a.out_bias, True, **kw,
        )  # fmt: skip
    if kind == "-":
        m = config.mlp
        return MLP(d, m.d_intermediate, m.activation, m.bias, **kw)
    raise ValueError(f"pattern character {kind!r} is not one of 'M', '*', '-'")


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, **kw)
        self.layers = nn.ModuleList(
            Block(
                config.d_model,
                build_mixer(ch, config, i, **kw),
                config.norm_eps,
                config.residual_in_fp32,
                **kw,
            )
            for i, ch in enumerate(config.pattern)
        )
        self.norm_f = RMSNorm(config.d_model, config.norm_eps, **kw)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """input_ids' values lie in [0, vocab_size) (not checked where they cannot be read: see
    `ops._checks.values_unreadable`)."""
    if not values_unreadable(input_ids) and bool(((input_ids < 0) | (input_ids >= vocab_size)).any()):
        raise ValueError(
            f"input_ids must lie in [0, vocab_size={vocab_size}), got values in "
            f"[{int(input_ids.min())}, {int(input_ids.max())}]"
        )


class LanguageModel(nn.Module):
    """A causal language model over `config.pattern`; logits (batch, seqlen, vocab_size)."""

    def __init__(self, config: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(
            config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype
        )
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(batch, seqlen) -> (batch, seqlen, d_model). With tied weights on the CPU the lookup's
        gradient is sparse (the rows it used): autograd adds it into the LM head's dense gradient, so
        the weight's .grad stays dense, but no (vocab, d_model) zeros are filled and added. On the 2-core
        benchmark VM those two passes over fresh memory were ~0.45 s of a 1.7 s Mamba-1 130M training
        step (page faults). Untied embeddings keep dense gradients (AdamW takes no sparse ones); on GPUs
        the passes are cheap and sparse gradients would only complicate compilation."""
        w = self.backbone.embedding.weight
        sparse = (
            w.device.type == "cpu"
            and self.lm_head.weight is w
            and torch.is_grad_enabled()
            and w.requires_grad
        )
        return F.embedding(input_ids, w, sparse=sparse)

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, initializer_range) for linear and embedding weights, zero biases, except the
        parameters a mixer marked `_no_reinit` (dt_proj); then GPT-2-style rescaling of the weights
        that write into the residual stream (out_proj, fc2): kaiming-uniform / sqrt(n_layer)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if not getattr(module.weight, "_no_reinit", False):
                    nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                if not getattr(module.bias, "_no_reinit", False):
                    nn.init.zeros_(module.bias)
        if self.config.rescale_prenorm_residual:
            # each layer adds one branch to the residual stream
            scale = math.sqrt(self.config.n_layer)
            for name, p in self.named_parameters():
                if name.endswith(("mixer.out_proj.weight", "mixer.fc2.weight")):
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                    p /= scale

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        """Number of parameters (a tied head counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.backbone.embedding.weight.numel()
        return n

    @classmethod
    def from_preset(cls, name: str, *, device=None, dtype=None, **overrides) -> LanguageModel:
        """A freshly initialized model of preset `name` (see `mambakit.models.presets`)."""
        from mambakit.models.presets import preset

        return cls(preset(name, **overrides), device=device, dtype=dtype)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """config.json + model.safetensors in `directory`, each written atomically."""
        from mambakit.models.checkpoint import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device=None, dtype=None) -> LanguageModel:
        from mambakit.models.checkpoint import from_pretrained

        return from_pretrained(directory, device=device, dtype=dtype)

    def _check_input_ids(self, input_ids: object, cache: InferenceCache | None, step: bool) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must have an integer dtype, got {input_ids.dtype}")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0 or (step and input_ids.shape[1] != 1):
            want = "(batch, 1)" if step else "(batch, seqlen) with seqlen >= 1"
            raise ValueError(f"input_ids must have shape {want}, got {tuple(input_ids.shape)}")
        check_token_ids(input_ids, self.config.vocab_size)
        if cache is not None and cache.batch_size != input_ids.shape[0]:
            raise ValueError(
                f"cache was allocated for batch {cache.batch_size} "
                f"but input_ids has batch {input_ids.shape[0]}"
            )
        return input_ids

    def _final_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        norm_f = self.backbone.norm_f
        hidden, _ = ops.add_rms_norm(
            hidden, residual, norm_f.weight, norm_f.eps, self.config.residual_in_fp32
        )
        return hidden

    def _logits(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return self.lm_head(self._final_norm(hidden, residual))[..., : self.config.vocab_size]

    def forward(
        self,
        input_ids: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        cache: InferenceCache | None = None,
        return_hidden_states: bool = False,
        logits_to_keep: int | None = None,
    ) -> torch.Tensor:
        """input_ids (batch, seqlen) integer -> logits (batch, seqlen, vocab_size).

        seq_idx (batch, seqlen) or cu_seqlens (nseqs + 1,) mark packed documents. With `cache`
        (from `allocate_inference_cache`) this is a prefill that fills every layer's state; a second
        prefill continues where the first stopped. With `return_hidden_states=True` the result is the
        final-normed hidden states (batch, seqlen, d_model) instead, the LM head's input, for a loss that
        applies the head itself (`ops.linear_cross_entropy(h, lm_head.weight, ..., vocab_size=...)`).
        `logits_to_keep=k` returns only the last k positions (batch, k, ...): the others never reach the
        final norm and the LM head (a prefill needs the last position's logits only).
        """
        self._check_input_ids(input_ids, cache, step=False)
        if logits_to_keep is not None and (
            isinstance(logits_to_keep, bool)
            or not isinstance(logits_to_keep, int)
            or not 1 <= logits_to_keep <= input_ids.shape[1]
        ):
            raise ValueError(
                f"logits_to_keep must be None or an int in [1, seqlen={input_ids.shape[1]}], "
                f"got {logits_to_keep!r}"
            )
        hidden, residual = self._embed(input_ids), None
        for i, layer in enumerate(self.backbone.layers):
            state = cache.states[i] if cache is not None else None
            hidden, residual = layer(hidden, residual, seq_idx=seq_idx, cu_seqlens=cu_seqlens, cache=state)
        if cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        if logits_to_keep is not None:
            hidden = hidden[:, -logits_to_keep:]
            residual = None if residual is None else residual[:, -logits_to_keep:]
        if return_hidden_states:
            return self._final_norm(hidden, residual)
        return self._logits(hidden, residual)

    def step(self, input_ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """One decoding step: input_ids (batch, 1) -> logits (batch, 1, vocab_size); advances `cache`."""
        if not isinstance(cache, InferenceCache):
            raise TypeError(f"cache must be an InferenceCache, got {type(cache).__name__}")
        self._check_input_ids(input_ids, cache, step=True)
        hidden, residual = self._embed(input_ids), None
        for layer, state in zip(self.backbone.layers, cache.states):
            hidden, residual = layer.step(hidden, residual, state)
        cache.seqlen_offset += 1
        return self._logits(hidden, residual)

    def generate(self, input_ids, **kwargs):
        """Generate text after `input_ids`: see `mambakit.inference.generate.generate` for the arguments."""
        from mambakit.inference.generate import generate

        return generate(self, input_ids, **kwargs)

    def allocate_inference_cache(
        self,
        batch_size: int,
        max_seqlen: int,
        dtype: torch.dtype | None = None,
        device=None,
        ssm_dtype: torch.dtype | None = None,
    ) -> InferenceCache:
        """Zeroed per-layer states for `batch_size` rows and up to `max_seqlen` tokens; conv and KV
        states in `dtype` (default: the parameters' dtype), SSM states in `ssm_dtype` (default float32;
        bfloat16 halves the decoding state, whose steps still run in float32, at bfloat16 precision)."""
        for name, v in (("batch_size", batch_size), ("max_seqlen", max_seqlen)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        weight = self.backbone.embedding.weight
        dtype = dtype or weight.dtype
        device = device or weight.device
        states = [
            layer.allocate_inference_cache(
                batch_size, max_seqlen, dtype=dtype, device=device, ssm_dtype=ssm_dtype
            )
            for layer in self.backbone.layers
        ]
        return InferenceCache(states=states, batch_size=batch_size, max_seqlen=max_seqlen)
