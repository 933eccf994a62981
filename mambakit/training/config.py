"""Training configuration: dataclasses for each section, filled from defaults < a TOML file < flags.

Sections and their TOML tables: `[model]` (a preset name plus any `ModelConfig` field as an override,
nested tables `[model.ssm]`, `[model.attn]`, `[model.mlp]`), `[data]` (`DataConfig`), `[optim]`
(`OptimConfig`), `[train]` (`LoopConfig`) and `[distributed]` (`DistConfig`). A dotted key names one
field anywhere: `train.steps`, `model.ssm.d_state`. On the command line each field is a flag
(`--train.steps 100`, `--model.d_model 128`) and `--set KEY=VALUE` sets any key; values are read as
TOML values (`8`, `3e-4`, `true`, `[0.0, 0.1]`), falling back to a plain string. Every run writes the
resolved configuration to `<run_dir>/config.toml`, which `--config` reads back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 reads TOML only with tomli installed
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

DEFAULT_MODEL: dict[str, Any] = {
    "preset": "tiny-mamba2",
    "d_model": 128,
    "pattern": "MMMM",
    "ssm": {"d_state": 32, "headdim": 64, "chunk_size": 64},
}


@dataclass
class DataConfig:
    """path None trains on the running interpreter's standard library source (files `**/*.py`)."""

    path: str | None = None
    format: str = "auto"  # auto | text | jsonl | hf
    text_field: str = "text"
    glob: str | None = None  # files of a directory; None: "**/*.py" for the default corpus, else "**/*"
    hf_split: str = "train"
    tokenizer: str = "byte"  # "byte" or the path of a tokenizer.json
    eos_token: str | None = None
    seq_len: int = 256
    val_fraction: float = 0.05
    max_tokens: int | None = None
    cache_dir: str | None = None  # token files; None: <run_dir>/data


@dataclass
class OptimConfig:
    """AdamW with warmup + cosine decay to lr * min_lr_ratio; grad_clip 0 disables clipping."""

    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 24
    grad_clip: float = 1.0
    fused: str = "auto"  # auto (fused on CUDA) | true | false


@dataclass
class LoopConfig:
    """batch_size is global (rows per optimizer step over all processes); micro_batch_size None means
    batch_size / world_size (no accumulation). eval_every / save_every 0: only at the end."""

    steps: int = 240
    batch_size: int = 8
    micro_batch_size: int | None = None
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False
    compile: bool = False
    # the micro-step (forward, loss, backward) replayed from a CUDA graph: auto = on for one CUDA process
    # without activation checkpointing or compile (and eager, with a warning, if capture fails) | true | false
    cuda_graph: str = "auto"
    threads: int | None = None  # torch CPU threads; None: the idle cores (see trainer.cpu_threads)
    log_every: int = 10
    eval_every: int = 80
    eval_batches: int = 4
    save_every: int = 80
    keep_last: int = 2
    out: str = "runs"
    name: str | None = None  # None: "<preset>-<timestamp>"
    progress: bool = True
    sample_tokens: int = 300
    sample_prompt: str = "def "
    sample_temperature: float = 0.8
    sample_top_k: int | None = 40
    stop_after: int | None = None  # leave the loop after this step (checkpoint saved), as if interrupted


@dataclass
class DistConfig:
    """Used under torchrun: strategy ddp (DistributedDataParallel), fsdp (FSDP2 fully_shard), tp (tensor
    parallel over all processes), cp (context parallel: the sequence split over all processes) or
    fsdp_tp (tensor parallel in groups of tp_size processes, FSDP2 across the groups)."""

    strategy: str = "ddp"
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    tp_size: int = 2  # fsdp_tp: processes of one tensor-parallel group


@dataclass
class TrainConfig:
    model: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_MODEL)))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    distributed: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "optim": OptimConfig,
    "train": LoopConfig,
    "distributed": DistConfig,
}
CHOICES = {
    ("data", "format"): ("auto", "text", "jsonl", "hf"),
    ("optim", "fused"): ("auto", "true", "false"),
    ("train", "precision"): ("auto", "bf16", "fp32"),
    ("train", "cuda_graph"): ("auto", "true", "false"),
    ("distributed", "strategy"): ("ddp", "fsdp", "tp", "cp", "fsdp_tp"),
    ("distributed", "backend"): ("auto", "nccl", "gloo"),
}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}


def parse_value(text: str) -> Any:
    """A command-line value read as a TOML value (`8`, `1e-3`, `true`, `[1, 2]`, `"x"`), else the string."""
    if tomllib is None:
        try:
            return json.loads(text)
        except ValueError:
            return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(key: str, value: Any, annotation: str) -> Any:
    allowed = [_TYPES[t.strip()] for t in annotation.split("|")]
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, (int, float)) and float in allowed:
        return float(value)
    elif isinstance(value, str) and str in allowed:
        return value
    if isinstance(value, str) and value == "none" and type(None) in allowed:
        return None
    raise TypeError(f"{key} must be {annotation.replace('|', 'or')}, got {value!r}")


def _build_section(name: str, values: dict[str, Any]) -> Any:
    cls = SECTIONS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"[{name}] has unknown keys {unknown}; known keys: {sorted(fields)}")
    kwargs = {}
    for k, v in values.items():
        key = f"{name}.{k}"
        if isinstance(v, bool) and (name, k) in CHOICES:  # `fused = true` in TOML or on the command line
            v = str(v).lower()
        v = _coerce(key, v, str(fields[k].type))
        if (name, k) in CHOICES and v not in CHOICES[(name, k)]:
            raise ValueError(f"{key} must be one of {CHOICES[(name, k)]}, got {v!r}")
        kwargs[k] = v
    return cls(**kwargs)


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """tree["a"]["b"]["c"] = value for key "a.b.c", creating tables on the way."""
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"config key {key!r} must be SECTION.FIELD, e.g. train.steps or model.d_model")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ValueError(f"config key {key!r}: {p!r} is a value, not a table")
        node = child
    node[parts[-1]] = value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    if tomllib is None:  # pragma: no cover
        raise RuntimeError("reading TOML on Python 3.10 needs `pip install tomli`")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {path} is not valid TOML: {e}") from None


def load_config(
    path: str | Path | None = None, overrides: list[tuple[str, Any]] | dict[str, Any] | None = None
) -> TrainConfig:
    """Defaults, then the TOML file at `path`, then `overrides` ((dotted key, value) pairs, values
    already parsed or strings to parse with `parse_value`). Unknown keys and wrong types raise errors
    that name the key."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_toml(path)
    items = overrides.items() if isinstance(overrides, dict) else (overrides or [])
    for key, value in items:
        set_dotted(tree, key, parse_value(value) if isinstance(value, str) else value)
    return from_tree(tree)


def from_tree(tree: dict[str, Any]) -> TrainConfig:
    unknown = sorted(set(tree) - set(SECTIONS) - {"model"})
    if unknown:
        raise ValueError(f"config has unknown sections {unknown}; known: {['model', *SECTIONS]}")
    model = tree.get("model", {})
    if not isinstance(model, dict):
        raise TypeError(f"model must be a table, got {model!r}")
    # a table that names its preset starts from that preset; otherwise from the default model
    model = dict(model) if "preset" in model else _merge(json.loads(json.dumps(DEFAULT_MODEL)), model)
    sections = {}
    for name in SECTIONS:
        values = tree.get(name, {})
        if not isinstance(values, dict):
            raise TypeError(f"{name} must be a table, got {values!r}")
        sections[name] = _build_section(name, values)
    return TrainConfig(model=model, **sections)


def _toml_value(key: str, v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(key, x) for x in v) + "]"
    raise TypeError(f"cannot write {key} = {v!r} as TOML")


def dump_toml(tree: dict[str, Any], prefix: str = "") -> str:
    """TOML text for nested dicts of scalars and lists; None values are left out (they mean 'default')."""
    lines, tables = [], []
    for k, v in tree.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif v is not None:
            lines.append(f"{k} = {_toml_value(prefix + k, v)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in tables:
        out += f"\n[{prefix}{k}]\n" + dump_toml(v, f"{prefix}{k}.")
    return out
