"""The HF transformers format of MambaForCausalLM and Mamba2ForCausalLM, both ways.

A directory with config.json (`model_type` "mamba" or "mamba2") and model.safetensors, or shards
listed in model.safetensors.index.json (pytorch_model.bin is read too). The keys are mambakit's except
`backbone.embeddings` (mambakit: `backbone.embedding`); the layers are the official ones (Mamba-1:
in_proj x|z, x_proj dt|B|C, dt_proj; Mamba-2: in_proj z|x|B|C|dt, gated RMSNorm over groups of
d_inner / n_groups with the gate applied before the norm, as mambakit's `norm_before_gate=False`).
HF's embedding and head have exactly `vocab_size` rows; mambakit pads to `pad_vocab_size_multiple`:
the padding rows are zeros on load and dropped on save.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from mambakit.models.checkpoint import build_from_state_dict
from mambakit.models.config import CONFIG_NAME, ModelConfig, SSMConfig
from mambakit.models.formats._files import (
    BIN_WEIGHTS,
    SAFE_INDEX,
    SAFE_WEIGHTS,
    check_tensors,
    cpu_state_dict,
    expected_shapes,
    load_bin,
    load_safetensors,
    load_sharded,
    naming_source,
    read_json,
    save_safetensors_atomic,
    write_json_atomic,
)
from mambakit.models.lm import LanguageModel

MODEL_TYPES = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}
_VOCAB_KEYS = ("backbone.embedding.weight", "lm_head.weight")


def _int(d: dict, key: str, source: str, default=None) -> int:
    v = d.get(key, default)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{source}: {key} must be a positive int, got {v!r}")
    return v


def _float(v: object) -> float:
    """A JSON number, also in the forms transformers writes for non-finite values: {"__float__":
    "Infinity"} (transformers 5) or a bare Infinity (older versions; Python's json reads it)."""
    if isinstance(v, dict) and set(v) == {"__float__"}:
        v = v["__float__"]
    return float(v)


def config_from_hf(d: dict, source: str = "HF config") -> ModelConfig:
    """A `ModelConfig` from a MambaConfig / Mamba2Config dict (transformers' defaults fill gaps);
    errors name `source`."""
    return naming_source(source, lambda: _config_from_hf(d, source))


def _config_from_hf(d: dict, source: str) -> ModelConfig:
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{source}: model_type must be one of {sorted(MODEL_TYPES)}, got {model_type!r}")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={d['hidden_act']!r} is not supported (only 'silu')")
    v2 = model_type == "mamba2"
    hidden = _int(d, "hidden_size", source, 4096 if v2 else 768)
    expand = _int(d, "expand", source, 2)
    common = {
        "d_state": _int(d, "state_size", source, 128 if v2 else 16),
        "d_conv": _int(d, "conv_kernel", source, 4),
        "expand": expand,
        "dt_min": d.get("time_step_min", 1e-3),
        "dt_max": d.get("time_step_max", 1e-1),
        "dt_init_floor": d.get("time_step_floor", 1e-4),
        "conv_bias": bool(d.get("use_conv_bias", True)),
        "bias": bool(d.get("use_bias", False)),
    }
    if v2:
        if not d.get("rms_norm", True):
            raise ValueError(f"{source}: rms_norm=false is not supported")
        heads, head_dim = _int(d, "num_heads", source, 128), _int(d, "head_dim", source, 64)
        if heads * head_dim != expand * hidden:
            raise ValueError(
                f"{source}: num_heads * head_dim = {heads * head_dim} must equal expand * hidden_size "
                f"= {expand * hidden}"
            )
        ssm = SSMConfig(
            version=2,
            headdim=head_dim,
            ngroups=_int(d, "n_groups", source, 8),
            chunk_size=_int(d, "chunk_size", source, 256),
            dt_limit=tuple(_float(v) for v in d.get("time_step_limit", (0.0, math.inf))),
            norm_before_gate=False,
            **common,
        )
    else:
        rank = d.get("time_step_rank", "auto")
        ssm = SSMConfig(version=1, dt_rank=rank, **common)
    return ModelConfig(
        d_model=hidden,
        vocab_size=_int(d, "vocab_size", source, 32768 if v2 else 50280),
        pattern="M" * _int(d, "num_hidden_layers", source, 64 if v2 else 32),
        ssm=ssm,
        norm_eps=d.get("layer_norm_epsilon", 1e-5),
        residual_in_fp32=bool(d.get("residual_in_fp32", True)),
        tie_embeddings=bool(d.get("tie_word_embeddings", not v2)),
        rescale_prenorm_residual=bool(d.get("rescale_prenorm_residual", False)),
    )


def config_to_hf(config: ModelConfig) -> dict:
    """The MambaConfig / Mamba2Config dict of `config`; ValueError if HF's models cannot express it
    (attention or MLP layers, Mamba-2 with the norm before the gate)."""
    if set(config.pattern) != {"M"}:
        raise ValueError(
            f"pattern {config.pattern!r}: HF MambaForCausalLM / Mamba2ForCausalLM hold SSM layers "
            "only ('M' * n)"
        )
    s = config.ssm
    d = {
        "architectures": [MODEL_TYPES["mamba" if s.version == 1 else "mamba2"]],
        "model_type": "mamba" if s.version == 1 else "mamba2",
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "vocab_size": config.vocab_size,
        "state_size": s.d_state,
        "conv_kernel": s.d_conv,
        "expand": s.expand,
        "use_bias": s.bias,
        "use_conv_bias": s.conv_bias,
        "hidden_act": "silu",
        "layer_norm_epsilon": config.norm_eps,
        "residual_in_fp32": config.residual_in_fp32,
        "time_step_min": s.dt_min,
        "time_step_max": s.dt_max,
        "time_step_floor": s.dt_init_floor,
        # an init option, but transformers applies it to the weights it has just loaded (it rescales
        # out_proj in place): written False so a loaded model keeps the numbers saved here
        "rescale_prenorm_residual": False,
        "tie_word_embeddings": config.tie_embeddings,
    }
    if s.version == 1:
        d["time_step_rank"] = math.ceil(config.d_model / 16) if s.dt_rank == "auto" else s.dt_rank
    else:
        if s.norm_before_gate:
            raise ValueError("ssm.norm_before_gate=True: HF Mamba-2 gates before its norm")
        d.update(
            num_heads=s.expand * config.d_model // s.headdim,
            head_dim=s.headdim,
            n_groups=s.ngroups,
            chunk_size=s.chunk_size,
            # JSON has no infinity: Python's json writes Infinity, which transformers reads back
            time_step_limit=list(s.dt_limit),
        )
    return d


def to_hf_key(key: str) -> str:
    return "backbone.embeddings.weight" if key == "backbone.embedding.weight" else key


def weights_source(directory: str | os.PathLike) -> Path:
    """The weights file of an HF checkpoint: model.safetensors, its sharded index, or pytorch_model.bin."""
    directory = Path(directory)
    for name in (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no {SAFE_WEIGHTS}, {SAFE_INDEX} or {BIN_WEIGHTS} in {directory}")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.name == SAFE_INDEX:
        return load_sharded(path)
    return load_bin(path) if path.suffix == ".bin" else load_safetensors(path)


def load_hf(directory: str | os.PathLike, *, device=None, dtype=None) -> LanguageModel:
    """A mambakit model from an HF MambaForCausalLM / Mamba2ForCausalLM directory. Keys and shapes are
    checked before any tensor is assigned; the vocabulary rows are padded with zeros."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    config = config_from_hf(read_json(config_path), source=str(config_path))
    path = weights_source(directory)
    tensors = read_weights(path)
    shapes = expected_shapes(config)
    expected = {}
    for k, shape in shapes.items():
        if k in _VOCAB_KEYS:
            shape = (config.vocab_size, *shape[1:])
        expected[to_hf_key(k)] = shape
    optional = ()
    if config.tie_embeddings:
        optional = ("lm_head.weight",)
        expected.setdefault("lm_head.weight", expected["backbone.embeddings.weight"])
    check_tensors(expected, tensors, str(path), optional)
    pad = config.padded_vocab_size - config.vocab_size
    state_dict = {}
    for k in shapes:
        t = tensors[to_hf_key(k)]
        if k in _VOCAB_KEYS and pad:
            t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
        state_dict[k] = t
    return build_from_state_dict(config, state_dict, source=str(path), device=device, dtype=dtype)


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of at most `max_bytes` (a tensor larger than that gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def save_hf(model: LanguageModel, directory: str | os.PathLike, *, max_shard_size: int | None = None) -> Path:
    """Write `model` as an HF checkpoint: config.json + model.safetensors, or, when the weights pass
    `max_shard_size` bytes, model-0000i-of-0000n.safetensors + model.safetensors.index.json. Every file
    is written atomically; weight files of an earlier save in `directory` that this one does not
    write are removed afterwards, so the loader never meets two versions. A tied head is stored once."""
    if max_shard_size is not None and (
        isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size <= 0
    ):
        raise ValueError(f"max_shard_size must be a positive int (bytes) or None, got {max_shard_size!r}")
    config = model.config
    hf_config = config_to_hf(config)
    tensors = {}
    for k, v in cpu_state_dict(model).items():
        tensors[to_hf_key(k)] = v[: config.vocab_size].contiguous() if k in _VOCAB_KEYS else v
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    written: set[str] = set()
    if max_shard_size is None or total <= max_shard_size:
        save_safetensors_atomic(tensors, directory / SAFE_WEIGHTS)
        written.add(SAFE_WEIGHTS)
    else:
        shards = _shards(tensors, max_shard_size)
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors_atomic(shard, directory / name)
            written.add(name)
            weight_map.update(dict.fromkeys(shard, name))
        # the index last: a crash before it leaves no index pointing at missing shards
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json_atomic(index, directory / SAFE_INDEX)
        written.add(SAFE_INDEX)
    write_json_atomic(hf_config, directory / CONFIG_NAME)
    old = [directory / SAFE_WEIGHTS, directory / SAFE_INDEX, *directory.glob("model-*-of-*.safetensors")]
    for stale in old:
        if stale.name not in written and stale.is_file():
            stale.unlink()
    return directory


def is_hf_config(d: dict) -> bool:
    """Whether a config.json dict is an HF transformers config (it names a model_type)."""
    return "model_type" in d


__all__ = ["MODEL_TYPES", "config_from_hf", "config_to_hf", "is_hf_config", "load_hf", "save_hf"]
