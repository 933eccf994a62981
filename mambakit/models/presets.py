"""Named model configurations: the official Mamba-1 / Mamba-2 sizes, hybrids after Waleffe et al. (2024),
and tiny models for tests and demos. `preset(name, **overrides)` returns a fresh `ModelConfig`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from mambakit.models.config import AttentionConfig, MLPConfig, ModelConfig, SSMConfig

GPT_NEOX_VOCAB = 50277  # the tokenizer of the official Mamba checkpoints (padded to 16 in the model)


def hybrid_pattern(n_ssm: int, n_attn: int, n_mlp: int) -> str:
    """A layer pattern with the attention layers spread evenly among the mixers and MLPs after mixers.

    The mixers (n_ssm SSM + n_attn attention) come in order; attention i sits at mixer position
    floor((i + 1/2) * n_mixers / n_attn), so the first layer is always an SSM. Mixer j is followed by
    floor((j + 1) * n_mlp / n_mixers) - floor(j * n_mlp / n_mixers) MLP layers (one each when
    n_mlp == n_mixers). Example: hybrid_pattern(3, 1, 4) == "M-M-*-M-".
    """
    for name, v in (("n_ssm", n_ssm), ("n_attn", n_attn), ("n_mlp", n_mlp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if n_ssm == 0:
        raise ValueError("n_ssm must be at least 1: the first layer of a hybrid is an SSM")
    n_mixers = n_ssm + n_attn
    attn_at = {(2 * i + 1) * n_mixers // (2 * n_attn) for i in range(n_attn)}
    out = []
    for j in range(n_mixers):
        out.append("*" if j in attn_at else "M")
        out.append("-" * ((j + 1) * n_mlp // n_mixers - j * n_mlp // n_mixers))
    return "".join(out)


def _mamba(version: int, d_model: int, n_layer: int) -> Callable[[], ModelConfig]:
    return lambda: ModelConfig(
        d_model=d_model, vocab_size=GPT_NEOX_VOCAB, pattern="M" * n_layer, ssm=SSMConfig(version=version)
    )


def _hybrid_tiny() -> ModelConfig:
    return ModelConfig(
        d_model=64,
        vocab_size=256,
        pattern=hybrid_pattern(3, 1, 4),
        ssm=SSMConfig(version=2, d_state=16, headdim=16, ngroups=2, chunk_size=16),
        attn=AttentionConfig(num_heads=4, num_kv_heads=2),
        mlp=MLPConfig(d_intermediate=128, activation="relu2"),
    )


def _hybrid_130m() -> ModelConfig:
    # 24 layers: 10 Mamba-2, 2 attention (8% of the layers; the 8B has 4 of 56, 7%), 12 MLP
    return ModelConfig(
        d_model=768,
        vocab_size=GPT_NEOX_VOCAB,
        pattern=hybrid_pattern(10, 2, 12),
        ssm=SSMConfig(version=2),
        attn=AttentionConfig(num_heads=12, num_kv_heads=4),
        mlp=MLPConfig(d_intermediate=3072, activation="relu2"),
    )


def _hybrid_8b() -> ModelConfig:
    # Mamba-2-Hybrid 8B of Waleffe et al. (2024): 56 layers (24 Mamba-2, 4 attention, 28 MLP), GQA with
    # 8 KV groups, squared-ReLU MLPs, no position embedding, untied 256K-token vocabulary.
    return ModelConfig(
        d_model=4096,
        vocab_size=256000,
        pattern=hybrid_pattern(24, 4, 28),
        ssm=SSMConfig(version=2, d_state=128, headdim=64, ngroups=8),
        attn=AttentionConfig(num_heads=32, num_kv_heads=8, head_dim=128),
        mlp=MLPConfig(d_intermediate=16384, activation="relu2"),
        tie_embeddings=False,
    )


def _tiny(version: int) -> Callable[[], ModelConfig]:
    return lambda: ModelConfig(
        d_model=64,
        vocab_size=256,
        pattern="M" * 4,
        ssm=SSMConfig(version=version, d_state=16, headdim=16, chunk_size=16),
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "mamba1-130m": _mamba(1, 768, 24),
    "mamba1-370m": _mamba(1, 1024, 48),
    "mamba1-790m": _mamba(1, 1536, 48),
    "mamba1-1.4b": _mamba(1, 2048, 48),
    "mamba1-2.8b": _mamba(1, 2560, 64),
    "mamba2-130m": _mamba(2, 768, 24),
    "mamba2-370m": _mamba(2, 1024, 48),
    "mamba2-780m": _mamba(2, 1536, 48),
    "mamba2-1.3b": _mamba(2, 2048, 48),
    "mamba2-2.7b": _mamba(2, 2560, 64),
    "hybrid-tiny": _hybrid_tiny,
    "hybrid-130m": _hybrid_130m,
    "hybrid-8b": _hybrid_8b,
    "tiny-mamba1": _tiny(1),
    "tiny-mamba2": _tiny(2),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The config of preset `name`, with top-level fields replaced by `overrides`.

    A dict given for `ssm`, `attn` or `mlp` updates only the fields it names, e.g.
    preset("tiny-mamba2", ssm={"d_state": 8}). Defaults derived from other fields (ssm.d_state from
    ssm.version, mlp.d_intermediate from d_model) follow the overridden values.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset name {name!r}; known presets: {sorted(PRESETS)}")
    config = PRESETS[name]()
    if not overrides:
        return config
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown override keys {unknown} for preset {name!r}; known keys: {sorted(fields)}")
    d = config.to_dict()
    ssm_over, mlp_over = overrides.get("ssm"), overrides.get("mlp")
    if isinstance(ssm_over, dict) and "version" in ssm_over and "d_state" not in ssm_over:
        if config.ssm.d_state == (16 if config.ssm.version == 1 else 128):
            d["ssm"]["d_state"] = None
    if "d_model" in overrides and not (isinstance(mlp_over, dict) and "d_intermediate" in mlp_over):
        if config.mlp.d_intermediate == 4 * config.d_model:
            d["mlp"]["d_intermediate"] = None
    for key, value in overrides.items():
        if key in ("ssm", "attn", "mlp") and isinstance(value, dict):
            d[key].update(value)
        elif dataclasses.is_dataclass(value):
            d[key] = dataclasses.asdict(value)
        else:
            d[key] = value
    return ModelConfig.from_dict(d)
