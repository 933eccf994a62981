"""Checkpoint formats beside mambakit's own: official state-spaces (`official.py`) and HF transformers
(`hf.py`), with `detect.py` telling them apart. `load_checkpoint` / `save_checkpoint` pick by name.
"""

from __future__ import annotations

import os
from pathlib import Path

from mambakit.models.formats.detect import FORMATS, detect_format
from mambakit.models.formats.hf import load_hf, save_hf
from mambakit.models.formats.official import load_official, save_official
from mambakit.models.lm import LanguageModel


def load_checkpoint(
    directory: str | os.PathLike, *, format: str | None = None, device=None, dtype=None
) -> LanguageModel:
    """A model from a checkpoint directory in any of `FORMATS` (detected when `format` is None)."""
    from mambakit.models import checkpoint

    fmt = detect_format(directory) if format is None else format
    if fmt == "mambakit":
        return checkpoint.load_own(directory, device=device, dtype=dtype)
    if fmt == "official":
        return load_official(directory, device=device, dtype=dtype)
    if fmt == "hf":
        return load_hf(directory, device=device, dtype=dtype)
    raise ValueError(f"format must be one of {FORMATS} or None, got {format!r}")


def save_checkpoint(
    model: LanguageModel, directory: str | os.PathLike, *, format: str = "mambakit", **kwargs
) -> Path:
    """Write `model` to `directory` in `format`; kwargs go to the writer (`max_shard_size` for "hf")."""
    from mambakit.models import checkpoint

    if not isinstance(model, LanguageModel):
        raise TypeError(f"model must be a LanguageModel, got {type(model).__name__}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format != "hf" and kwargs:
        raise TypeError(f"format {format!r} takes no options, got {sorted(kwargs)}")
    if format == "mambakit":
        return checkpoint.save_pretrained(model, directory)
    if format == "official":
        return save_official(model, directory)
    return save_hf(model, directory, **kwargs)


__all__ = ["FORMATS", "detect_format", "load_checkpoint", "save_checkpoint"]
