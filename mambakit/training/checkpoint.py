"""Training checkpoints: one directory per step, written whole then renamed into place, last k kept.

`<run_dir>/checkpoints/step_00000120/` holds `config.json` + `model.safetensors` (a model directory that
`mambakit.models.from_pretrained` reads, tied LM head stored once) and `trainer_state.pt` (optimizer,
scheduler, step, RNG states, data position), read back with `torch.load(weights_only=True)`. The
directory is assembled under a hidden temporary name and renamed, so a crash mid-write leaves every
earlier checkpoint intact and no half-written one under a `step_*` name. States are "full" (unsharded,
keyed by parameter name), so a checkpoint saved by N processes loads in M.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mambakit.models.checkpoint import WEIGHTS_NAME, load_safetensors
from mambakit.models.config import ModelConfig

STATE_NAME = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are never listed)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """`path` itself if it is a checkpoint directory, else the newest checkpoint of the run at `path`."""
    path = Path(path)
    if (path / STATE_NAME).is_file():
        return path
    found = list_checkpoints(path)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    model_config: ModelConfig,
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` of the run (full CPU model state, trainer state) atomically, then delete
    all but the newest `keep_last` checkpoints. Call on one process only. Returns the directory."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
        if model_config.tie_embeddings:
            tensors.pop("lm_head.weight", None)
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt", "mambakit_format": "1"})
        model_config.save(tmp)
        torch.save({"step": step, **trainer_state}, tmp / STATE_NAME)
        _fsync_dir(tmp)
        if final.exists():  # saving the same step again (a resumed run stopped where it started)
            old = root / f".old-{final.name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state with a tied head restored, trainer state) of a checkpoint directory."""
    path = Path(path)
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no {STATE_NAME})")
    config = ModelConfig.load(path)
    model_state = load_safetensors(path / WEIGHTS_NAME)
    if config.tie_embeddings:
        model_state["lm_head.weight"] = model_state["backbone.embedding.weight"]
    trainer_state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    return model_state, trainer_state


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename is what makes it atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
