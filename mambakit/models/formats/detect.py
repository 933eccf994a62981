"""Which checkpoint format a directory holds, read from its config.json.

- "mambakit": mambakit's own config (it has a `pattern`).
- "hf": an HF transformers config (it has a `model_type`: "mamba" or "mamba2").
- "official": a state-spaces mamba_ssm config (`d_model` and `n_layer`, no `pattern`).
"""

from __future__ import annotations

import os
from pathlib import Path

from mambakit.models.config import CONFIG_NAME
from mambakit.models.formats._files import read_json
from mambakit.models.formats.hf import MODEL_TYPES, is_hf_config
from mambakit.models.formats.official import is_official_config

FORMATS = ("mambakit", "official", "hf")


def detect_format(directory: str | os.PathLike) -> str:
    """ "mambakit", "official" or "hf" for the checkpoint in `directory`; errors name config.json."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a checkpoint directory")
    d = read_json(path)
    if "pattern" in d:
        return "mambakit"
    if is_hf_config(d):
        if d["model_type"] not in MODEL_TYPES:
            raise ValueError(
                f"{path}: model_type {d['model_type']!r} is not supported (only {sorted(MODEL_TYPES)})"
            )
        return "hf"
    if is_official_config(d):
        return "official"
    raise ValueError(
        f"{path} is neither a mambakit config (no 'pattern'), an HF config (no 'model_type') nor an "
        "official state-spaces config (no 'd_model' and 'n_layer')"
    )
