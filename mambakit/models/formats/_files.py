"""File helpers shared by the checkpoint formats: read config.json, .bin and (sharded) safetensors
weights with errors that name the file, check a file's keys and shapes before anything is assigned,
and write weights atomically.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from mambakit.models.checkpoint import load_safetensors
from mambakit.models.lm import LanguageModel

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from `path`; a missing file or invalid JSON is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(d).__name__}")
    return d


def load_bin(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a PyTorch .bin file, read with weights_only=True (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read weights file {path}: {e} (truncated or not a PyTorch file?)") from e
    if not isinstance(sd, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()
    ):
        raise ValueError(f"weights file {path} does not hold a dict of named tensors")
    return sd


def load_sharded(index_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a sharded safetensors checkpoint: `index_path` maps each key to its shard file.

    Every shard must exist and hold exactly the keys the index assigns to it."""
    index_path = Path(index_path)
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path} has no 'weight_map' of key -> shard file name")
    by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        if Path(shard).name != shard:
            raise ValueError(f"{index_path} names shard {shard!r} outside its directory")
        by_shard.setdefault(shard, set()).add(key)
    tensors: dict[str, torch.Tensor] = {}
    for shard, keys in sorted(by_shard.items()):
        path = index_path.parent / shard
        part = load_safetensors(path)
        missing, unexpected = sorted(keys - set(part)), sorted(set(part) - keys)
        if missing or unexpected:
            raise ValueError(
                f"shard {path} does not match {index_path.name}: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        tensors.update(part)
    return tensors


def naming_source(source: str, build):
    """`build()`, with a ValueError or TypeError that does not name `source` (say from ModelConfig's
    own checks) raised again as a ValueError that does."""
    try:
        return build()
    except (ValueError, TypeError) as e:
        if source in str(e):
            raise
        raise ValueError(f"{source}: {e}") from e


def check_tensors(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, torch.Tensor],
    source: str,
    optional: Iterable[str] = (),
) -> None:
    """Raise ValueError naming `source` unless `found` has exactly the keys of `expected` (keys in
    `optional` may be absent or present) with the expected shapes. Nothing is assigned here, so a
    failed check leaves nothing half-loaded."""
    optional = set(optional)
    missing = sorted(set(expected) - set(found) - optional)
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match its config: missing keys {missing}, unexpected keys {unexpected}"
        )
    bad = [
        f"{k}: expected {tuple(shape)}, found {tuple(found[k].shape)}"
        for k, shape in expected.items()
        if k in found and tuple(found[k].shape) != tuple(shape)
    ]
    if bad:
        raise ValueError(f"{source} has tensors of the wrong shape: {bad}")
    not_float = sorted(k for k in found if not found[k].is_floating_point())
    if not_float:
        raise ValueError(f"{source} has non-floating-point tensors: {not_float}")


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """The mambakit state dict shapes of `config` (a meta-device model: no memory, no init work).
    A tied head is left out."""
    with torch.device("meta"):
        model = LanguageModel(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def cpu_state_dict(model: LanguageModel) -> dict[str, torch.Tensor]:
    """The model's tensors, detached, on the CPU, contiguous (a tied head left out)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write `tensors` to `path` through a temporary file and a rename (metadata format=pt, which
    transformers requires)."""
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def save_bin_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """torch.save `tensors` to `path` through a temporary file and a rename."""
    _atomic(Path(path), lambda tmp: torch.save(tensors, tmp))


def write_json_atomic(d: dict, path: str | os.PathLike) -> None:
    from mambakit.models.config import write_atomic

    write_atomic(path, json.dumps(d, indent=2, sort_keys=True).encode() + b"\n")
