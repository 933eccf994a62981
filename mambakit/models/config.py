"""Model configuration: one `ModelConfig` dataclass (with SSM, attention and MLP parts), saved as config.json.

The layer stack is a pattern string, one character a layer: 'M' an SSM layer (Mamba-1 or Mamba-2 by
`ssm.version`), '*' an attention layer, '-' an MLP layer. A pure Mamba model is "M" * n_layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAYER_CHARS = {"M": "SSM", "*": "attention", "-": "MLP"}
CONFIG_NAME = "config.json"


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _pair(name: str, value: object) -> tuple[float, float]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}")
    return float(value[0]), float(value[1])


@dataclass
class SSMConfig:
    """The 'M' layers. d_state None means 16 for Mamba-1 and 128 for Mamba-2. headdim, ngroups,
    chunk_size, dt_limit, A_init_range and norm_before_gate apply to Mamba-2 only; dt_rank to Mamba-1."""

    version: int = 2
    d_state: int | None = None
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, math.inf)
    A_init_range: tuple[float, float] = (1.0, 16.0)
    conv_bias: bool = True
    bias: bool = False
    norm_before_gate: bool = False

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise ValueError(f"ssm.version must be 1 or 2, got {self.version!r}")
        if self.d_state is None:
            self.d_state = 16 if self.version == 1 else 128
        for name in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
            _positive_int(f"ssm.{name}", getattr(self, name))
        if self.dt_rank != "auto":
            _positive_int("ssm.dt_rank", self.dt_rank)
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(
                f"ssm.dt_min, ssm.dt_max must satisfy 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}"
            )
        # JSON has no infinity: config.json stores it as the string "inf"
        lo, hi = _pair("ssm.dt_limit", self.dt_limit)
        if not 0.0 <= lo < hi:
            raise ValueError(f"ssm.dt_limit must satisfy 0 <= low < high, got {self.dt_limit!r}")
        self.dt_limit = (lo, hi)
        lo, hi = _pair("ssm.A_init_range", self.A_init_range)
        if not 0.0 < lo <= hi:
            raise ValueError(f"ssm.A_init_range must satisfy 0 < low <= high, got {self.A_init_range!r}")
        self.A_init_range = (lo, hi)

    def check_model(self, d_model: int) -> None:
        """Checks that need d_model (Mamba-2 heads and groups)."""
        if self.version != 2:
            return
        d_inner = self.expand * d_model
        if d_inner % self.headdim != 0:
            raise ValueError(f"ssm.headdim={self.headdim} must divide d_inner = expand * d_model = {d_inner}")
        nheads = d_inner // self.headdim
        if nheads % self.ngroups != 0:
            raise ValueError(f"ssm.ngroups={self.ngroups} must divide nheads = d_inner / headdim = {nheads}")


@dataclass
class AttentionConfig:
    """The '*' layers: grouped-query attention. num_kv_heads None = num_heads; head_dim None =
    d_model // num_heads; rotary on the first rotary_emb_dim features of each head (0 = none)."""

    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    rotary_emb_dim: int = 0
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    out_bias: bool = False

    def check_model(self, d_model: int) -> None:
        if self.num_heads is None:
            raise ValueError("pattern has attention layers ('*'): set attn.num_heads")
        _positive_int("attn.num_heads", self.num_heads)
        if self.num_kv_heads is not None:
            _positive_int("attn.num_kv_heads", self.num_kv_heads)
            if self.num_heads % self.num_kv_heads != 0:
                raise ValueError(
                    f"attn.num_kv_heads={self.num_kv_heads} must divide attn.num_heads={self.num_heads}"
                )
        if self.head_dim is None:
            if d_model % self.num_heads != 0:
                raise ValueError(
                    f"attn.num_heads={self.num_heads} must divide d_model={d_model} (or set head_dim)"
                )
            head_dim = d_model // self.num_heads
        else:
            _positive_int("attn.head_dim", self.head_dim)
            head_dim = self.head_dim
        if self.rotary_emb_dim < 0 or self.rotary_emb_dim % 2 or self.rotary_emb_dim > head_dim:
            raise ValueError(f"attn.rotary_emb_dim={self.rotary_emb_dim} must be even and in [0, {head_dim}]")


@dataclass
class MLPConfig:
    """The '-' layers. d_intermediate None = 4 * d_model. activation 'swiglu' or 'relu2'."""

    d_intermediate: int | None = None
    activation: str = "swiglu"
    bias: bool = False

    def __post_init__(self) -> None:
        if self.activation not in ("swiglu", "relu2"):
            raise ValueError(f"mlp.activation must be 'swiglu' or 'relu2', got {self.activation!r}")
        if self.d_intermediate is not None:
            _positive_int("mlp.d_intermediate", self.d_intermediate)


@dataclass
class ModelConfig:
    """A language model: embedding, `pattern` layers of pre-norm residual blocks, final norm, LM head."""

    d_model: int
    vocab_size: int
    pattern: str
    ssm: SSMConfig = field(default_factory=SSMConfig)
    attn: AttentionConfig = field(default_factory=AttentionConfig)
    mlp: MLPConfig = field(default_factory=MLPConfig)
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    pad_vocab_size_multiple: int = 16
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True

    def __post_init__(self) -> None:
        _positive_int("d_model", self.d_model)
        _positive_int("vocab_size", self.vocab_size)
        _positive_int("pad_vocab_size_multiple", self.pad_vocab_size_multiple)
        for name, cls in (("ssm", SSMConfig), ("attn", AttentionConfig), ("mlp", MLPConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, _from_dict(cls, getattr(self, name), name))
            if not isinstance(getattr(self, name), cls):
                raise TypeError(
                    f"{name} must be a {cls.__name__} or a dict, got {type(getattr(self, name)).__name__}"
                )
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(
                f"pattern must be a non-empty string (one character a layer), got {self.pattern!r}"
            )
        for i, ch in enumerate(self.pattern):
            if ch not in LAYER_CHARS:
                raise ValueError(
                    f"pattern has unknown layer character {ch!r} at position {i}; "
                    "use 'M' (SSM), '*' (attention) or '-' (MLP)"
                )
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")
        if not self.initializer_range > 0:
            raise ValueError(f"initializer_range must be positive, got {self.initializer_range!r}")
        if "M" in self.pattern:
            self.ssm.check_model(self.d_model)
        if "*" in self.pattern:
            self.attn.check_model(self.d_model)
        if self.mlp.d_intermediate is None:
            self.mlp.d_intermediate = 4 * self.d_model

    @property
    def n_layer(self) -> int:
        return len(self.pattern)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (infinite dt_limit written as "inf")."""
        d = dataclasses.asdict(self)
        d["ssm"]["dt_limit"] = [_json_float(v) for v in self.ssm.dt_limit]
        d["ssm"]["A_init_range"] = list(self.ssm.A_init_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of to_dict; unknown keys raise ValueError naming them."""
        return _from_dict(cls, d, "config")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `directory/config.json` atomically; returns its path."""
        path = Path(directory) / CONFIG_NAME
        write_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True).encode() + b"\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ModelConfig:
        path = Path(directory) / CONFIG_NAME
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)


def _json_float(v: float) -> float | str:
    return "inf" if math.isinf(v) and v > 0 else v


def _from_dict(cls, d: object, where: str):
    if not isinstance(d, dict):
        raise TypeError(f"{where} must be a dict, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; known keys: {sorted(names)}")
    return cls(**d)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path` (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
