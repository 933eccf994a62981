"""The official state-spaces (mamba_ssm `MambaLMHeadModel`) checkpoint format, both ways.

A directory with config.json (`d_model`, `n_layer`, `vocab_size`, `ssm_cfg`, `attn_layer_idx`,
`attn_cfg`, `d_intermediate`, `rms_norm`, `residual_in_fp32`, `fused_add_norm`,
`pad_vocab_size_multiple`, `tie_embeddings`) and pytorch_model.bin with `backbone.layers.N.mixer...`
keys. An official block N is a mixer (Mamba1/Mamba2, or attention when N is in `attn_layer_idx`) and,
when `d_intermediate > 0`, a gated MLP with its own pre-norm (`norm2`, `mlp.fc1`, `mlp.fc2`). In a
mambakit pattern that block is 'M' or '*', followed by '-' when it has the MLP; the residual
arithmetic is the same (the MLP is a second add + norm inside the block).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from mambakit.models.checkpoint import build_from_state_dict
from mambakit.models.config import CONFIG_NAME, AttentionConfig, MLPConfig, ModelConfig, SSMConfig
from mambakit.models.formats._files import (
    BIN_WEIGHTS,
    SAFE_WEIGHTS,
    check_tensors,
    cpu_state_dict,
    expected_shapes,
    load_bin,
    load_safetensors,
    naming_source,
    read_json,
    save_bin_atomic,
    write_json_atomic,
)
from mambakit.models.lm import LanguageModel

# mamba_ssm's GatedMLP rounds its hidden width up to a multiple of this
MLP_MULTIPLE = 128
# mamba_ssm builds every norm with its default epsilon
OFFICIAL_NORM_EPS = 1e-5

_TOP_KEYS = {
    "d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
    "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings",
}  # fmt: skip
_SSM_FIELDS = {
    1: ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init_floor", "conv_bias", "bias"),
    2: (
        "d_state", "d_conv", "expand", "headdim", "ngroups", "A_init_range", "dt_min", "dt_max",
        "dt_init_floor", "dt_limit", "chunk_size", "conv_bias", "bias", "norm_before_gate",
    ),
}  # fmt: skip
# ssm_cfg keys that steer only initialization or kernel choice: they change no loaded numbers
_SSM_IGNORED = {"dt_init", "dt_scale", "conv_init", "use_fast_path", "use_mem_eff_path", "sequence_parallel"}
# attn_cfg key -> AttentionConfig field
_ATTN_FIELDS = {
    "num_heads": "num_heads",
    "num_heads_kv": "num_kv_heads",
    "head_dim": "head_dim",
    "rotary_emb_dim": "rotary_emb_dim",
    "rotary_emb_base": "rope_theta",
    "qkv_proj_bias": "qkv_bias",
    "out_proj_bias": "out_bias",
}


def _fail(source: str, what: str) -> ValueError:
    return ValueError(f"{source}: {what}")


def _ssm_from_official(cfg: object, source: str) -> SSMConfig:
    if not isinstance(cfg, dict):
        raise _fail(source, f"ssm_cfg must be an object, got {cfg!r}")
    cfg = dict(cfg)
    layer = cfg.pop("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise _fail(source, f"ssm_cfg.layer must be 'Mamba1' or 'Mamba2', got {layer!r}")
    version = 1 if layer == "Mamba1" else 2
    for key in _SSM_IGNORED:
        cfg.pop(key, None)
    # Mamba2 options mambakit does not implement: refuse rather than load different numbers
    if cfg.pop("d_ssm", None) is not None:
        raise _fail(source, "ssm_cfg.d_ssm (an SSM narrower than d_inner) is not supported")
    if cfg.pop("D_has_hdim", False):
        raise _fail(source, "ssm_cfg.D_has_hdim=true is not supported")
    if not cfg.pop("rmsnorm", True):
        raise _fail(source, "ssm_cfg.rmsnorm=false (Mamba-2 without its gated norm) is not supported")
    if cfg.get("process_group") is not None:
        raise _fail(source, "ssm_cfg.process_group is not supported")
    cfg.pop("process_group", None)
    unknown = sorted(set(cfg) - set(_SSM_FIELDS[version]))
    if unknown:
        raise _fail(source, f"ssm_cfg has keys that {layer} does not take: {unknown}")
    return SSMConfig(version=version, **cfg)


def _attn_from_official(cfg: object, source: str) -> AttentionConfig:
    if not isinstance(cfg, dict):
        raise _fail(source, f"attn_cfg must be an object, got {cfg!r}")
    cfg = dict(cfg)
    if not cfg.pop("causal", False):
        raise _fail(source, "attn_cfg.causal must be true (mambakit's attention is causal)")
    fixed = {"softmax_scale": None, "mlp_dim": 0, "d_conv": 0, "rotary_emb_interleaved": False}
    for key, ok in fixed.items():
        if cfg.pop(key, ok) != ok:
            raise _fail(source, f"attn_cfg.{key} other than {ok!r} is not supported")
    unknown = sorted(set(cfg) - set(_ATTN_FIELDS))
    if unknown:
        raise _fail(source, f"attn_cfg has unknown keys {unknown}")
    # mamba_ssm's MHA has biases on both projections unless told otherwise
    fields = {"qkv_bias": True, "out_bias": True}
    fields.update({_ATTN_FIELDS[k]: v for k, v in cfg.items()})
    return AttentionConfig(**fields)


def config_from_official(d: dict, source: str = "official config") -> ModelConfig:
    """A `ModelConfig` from an official config.json dict; fields the official format has but mambakit
    cannot compute the same way are ValueErrors naming `source`. Missing fields take mamba_ssm's
    `MambaConfig` defaults."""
    return naming_source(source, lambda: _config_from_official(d, source))


def _config_from_official(d: dict, source: str) -> ModelConfig:
    unknown = sorted(set(d) - _TOP_KEYS)
    if unknown:
        raise _fail(source, f"unknown keys {unknown}")
    for key in ("d_model", "n_layer", "vocab_size"):
        if key not in d:
            raise _fail(source, f"missing key {key!r}")
    if not d.get("rms_norm", True):
        raise _fail(source, "rms_norm=false (LayerNorm blocks) is not supported")
    n_layer = d["n_layer"]
    if isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer <= 0:
        raise _fail(source, f"n_layer must be a positive int, got {n_layer!r}")
    attn_idx = d.get("attn_layer_idx") or []
    if not isinstance(attn_idx, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layer for i in attn_idx
    ):
        raise _fail(source, f"attn_layer_idx must list layer indices in [0, {n_layer}), got {attn_idx!r}")
    d_intermediate = d.get("d_intermediate", 0) or 0
    if isinstance(d_intermediate, bool) or not isinstance(d_intermediate, int) or d_intermediate < 0:
        raise _fail(source, f"d_intermediate must be an int >= 0, got {d_intermediate!r}")
    has_mlp = d_intermediate > 0
    pattern = "".join(("*" if i in attn_idx else "M") + ("-" if has_mlp else "") for i in range(n_layer))
    mlp = MLPConfig()
    if has_mlp:
        width = (d_intermediate + MLP_MULTIPLE - 1) // MLP_MULTIPLE * MLP_MULTIPLE
        mlp = MLPConfig(d_intermediate=width, activation="swiglu", bias=False)
    return ModelConfig(
        d_model=d["d_model"],
        vocab_size=d["vocab_size"],
        pattern=pattern,
        ssm=_ssm_from_official(d.get("ssm_cfg") or {}, source),
        attn=_attn_from_official(d.get("attn_cfg") or {}, source) if attn_idx else AttentionConfig(),
        mlp=mlp,
        norm_eps=OFFICIAL_NORM_EPS,
        residual_in_fp32=bool(d.get("residual_in_fp32", True)),
        tie_embeddings=bool(d.get("tie_embeddings", True)),
        pad_vocab_size_multiple=d.get("pad_vocab_size_multiple", 8),
    )


def official_blocks(pattern: str) -> list[tuple[str, bool]]:
    """The official blocks of a mambakit pattern: (mixer 'M' or '*', has an MLP) each. Every MLP must
    follow a mixer, and either every mixer or none has one (`d_intermediate` is model-wide)."""
    blocks: list[tuple[str, bool]] = []
    for i, ch in enumerate(pattern):
        if ch in "M*":
            blocks.append((ch, False))
        elif not blocks or blocks[-1][1]:
            raise ValueError(
                f"pattern {pattern!r} has an MLP ('-') at position {i} that does not follow a mixer: "
                "the official format puts at most one MLP after each mixer, inside its block"
            )
        else:
            blocks[-1] = (blocks[-1][0], True)
    if len({has for _, has in blocks}) > 1:
        raise ValueError(
            f"pattern {pattern!r} gives MLPs to some mixers only: the official format has one "
            "d_intermediate for all blocks (every mixer followed by '-', or none)"
        )
    return blocks


def config_to_official(config: ModelConfig) -> dict:
    """The official config.json dict of `config`; ValueError for what the official model cannot express."""
    blocks = official_blocks(config.pattern)
    if not math.isclose(config.norm_eps, OFFICIAL_NORM_EPS, rel_tol=1e-9):
        raise ValueError(
            f"norm_eps={config.norm_eps}: the official model uses {OFFICIAL_NORM_EPS} in every norm"
        )
    s = config.ssm
    ssm_cfg: dict = {"layer": f"Mamba{s.version}"}
    for name in _SSM_FIELDS[s.version]:
        value = getattr(s, name)
        if name == "dt_limit":
            if value == (0.0, math.inf):
                continue  # the official default; JSON has no infinity
            value = list(value)
        elif name == "A_init_range":
            value = list(value)
        ssm_cfg[name] = value
    d_intermediate = 0
    if blocks and blocks[0][1]:
        m = config.mlp
        if m.activation != "swiglu" or m.bias:
            raise ValueError(
                f"mlp.activation={m.activation!r}, mlp.bias={m.bias}: the official MLP is gated SiLU "
                "(swiglu) without biases"
            )
        if m.d_intermediate % MLP_MULTIPLE:
            raise ValueError(
                f"mlp.d_intermediate={m.d_intermediate}: the official MLP width is a multiple of "
                f"{MLP_MULTIPLE}"
            )
        d_intermediate = m.d_intermediate
    attn_idx = [i for i, (ch, _) in enumerate(blocks) if ch == "*"]
    attn_cfg: dict = {}
    if attn_idx:
        a = config.attn
        attn_cfg = {
            "num_heads": a.num_heads,
            "num_heads_kv": a.num_kv_heads if a.num_kv_heads is not None else a.num_heads,
            "head_dim": a.head_dim if a.head_dim is not None else config.d_model // a.num_heads,
            "rotary_emb_dim": a.rotary_emb_dim,
            "rotary_emb_base": a.rope_theta,
            "qkv_proj_bias": a.qkv_bias,
            "out_proj_bias": a.out_bias,
            "causal": True,
        }
    return {
        "d_model": config.d_model,
        "d_intermediate": d_intermediate,
        "n_layer": len(blocks),
        "vocab_size": config.vocab_size,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": attn_idx,
        "attn_cfg": attn_cfg,
        "rms_norm": True,
        "residual_in_fp32": config.residual_in_fp32,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
        "tie_embeddings": config.tie_embeddings,
    }


_LAYER_KEY = re.compile(r"backbone\.layers\.(\d+)\.(norm|mixer)\.(.+)")


def key_to_official(config: ModelConfig) -> dict[str, str]:
    """mambakit key -> official key for every tensor of `config` (a tied head left out)."""
    layer_of: dict[int, tuple[int, bool]] = {}  # mambakit layer -> (official block, is its MLP)
    block = -1
    for j, ch in enumerate(config.pattern):
        if ch == "-":
            layer_of[j] = (block, True)
        else:
            block += 1
            layer_of[j] = (block, False)
    mapping = {}
    for key in expected_shapes(config):
        m = _LAYER_KEY.fullmatch(key)
        if m is None:
            mapping[key] = key  # embedding, norm_f, lm_head: same names
            continue
        j, part, rest = int(m[1]), m[2], m[3]
        i, is_mlp = layer_of[j]
        if not is_mlp:
            mapping[key] = f"backbone.layers.{i}.{part}.{rest}"
        else:
            sub = "norm2" if part == "norm" else "mlp"
            mapping[key] = f"backbone.layers.{i}.{sub}.{rest}"
    return mapping


def weights_path(directory: str | os.PathLike) -> Path:
    """pytorch_model.bin (the official file), else model.safetensors with official keys."""
    directory = Path(directory)
    if (directory / BIN_WEIGHTS).is_file() or not (directory / SAFE_WEIGHTS).is_file():
        return directory / BIN_WEIGHTS
    return directory / SAFE_WEIGHTS


def load_official(directory: str | os.PathLike, *, device=None, dtype=None) -> LanguageModel:
    """A mambakit model from an official state-spaces checkpoint directory. The file's keys and
    shapes are checked against the config before any tensor is assigned."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    config = config_from_official(read_json(config_path), source=str(config_path))
    path = weights_path(directory)
    tensors = load_bin(path) if path.suffix == ".bin" else load_safetensors(path)
    mapping = key_to_official(config)
    shapes = expected_shapes(config)
    expected = {mapping[k]: shape for k, shape in shapes.items()}
    head = None
    if config.tie_embeddings:
        # mamba_ssm's state_dict holds the tied head too (the same tensor as the embedding)
        expected_head = shapes["backbone.embedding.weight"]
        head = tensors.pop("lm_head.weight", None)
        if head is not None and tuple(head.shape) != expected_head:
            raise ValueError(
                f"{path} has tensors of the wrong shape: lm_head.weight: expected {expected_head}, "
                f"found {tuple(head.shape)}"
            )
    check_tensors(expected, tensors, str(path))
    if (
        config.tie_embeddings
        and head is not None
        and not torch.equal(head, tensors["backbone.embedding.weight"])
    ):
        raise ValueError(
            f"{path}: tie_embeddings is true but lm_head.weight differs from backbone.embedding.weight"
        )
    state_dict = {k: tensors[mapping[k]] for k in shapes}
    return build_from_state_dict(config, state_dict, source=str(path), device=device, dtype=dtype)


def save_official(model: LanguageModel, directory: str | os.PathLike) -> Path:
    """Write `model` as an official checkpoint (config.json + pytorch_model.bin, each atomically).
    Patterns the official layout cannot express are ValueErrors before anything is written."""
    config = model.config
    official_config = config_to_official(config)
    mapping = key_to_official(config)
    sd = cpu_state_dict(model)
    tensors = {mapping[k]: v for k, v in sd.items()}
    if config.tie_embeddings:
        # mamba_ssm's own state_dict lists the tied head; its loader expects the key
        tensors["lm_head.weight"] = tensors["backbone.embedding.weight"]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_bin_atomic(tensors, directory / BIN_WEIGHTS)
    write_json_atomic(official_config, directory / CONFIG_NAME)
    return directory


def is_official_config(d: dict) -> bool:
    """Whether a config.json dict looks like the official format."""
    return "d_model" in d and "n_layer" in d and "pattern" not in d


__all__ = [
    "config_from_official",
    "config_to_official",
    "is_official_config",
    "key_to_official",
    "load_official",
    "official_blocks",
    "save_official",
]
