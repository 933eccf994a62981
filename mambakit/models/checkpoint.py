"""mambakit's own checkpoint format: a directory with config.json and model.safetensors.

Other formats (official state-spaces, HF transformers) live in their own modules beside this one and
reuse `build_from_state_dict` after renaming their keys.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mambakit.models.config import CONFIG_NAME, ModelConfig
from mambakit.models.lm import LanguageModel

WEIGHTS_NAME = "model.safetensors"
# parameter attributes set by the layers (optimizer groups, init) that a loaded model must keep
_PARAM_MARKS = ("_no_weight_decay", "_no_reinit")


def save_pretrained(model: LanguageModel, directory: str | os.PathLike) -> Path:
    """Write `directory/config.json` and `directory/model.safetensors`, each to a temporary file then
    renamed into place, so a crash never leaves a half-written file under the final name. A tied
    LM head is stored once (as the embedding). Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{WEIGHTS_NAME}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "mambakit_format": "1"})
        os.replace(tmp, directory / WEIGHTS_NAME)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    model.config.save(directory)
    return directory


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file on the CPU; a missing, truncated or corrupt file raises an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    try:
        return load_file(path, device="cpu")
    except Exception as e:
        raise ValueError(
            f"cannot read weights file {path}: {e} (truncated or not a safetensors file?)"
        ) from e


def build_from_state_dict(
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    *,
    source: str = "state dict",
    device=None,
    dtype=None,
) -> LanguageModel:
    """A model of `config` holding exactly the tensors of `state_dict` (mambakit key names).

    The model is built on the meta device (no init work, no memory) and the tensors are assigned.
    Missing or unexpected keys and shape mismatches raise ValueError naming `source`.
    """
    with torch.device("meta"):
        model = LanguageModel(config)
    marks = {
        name: {m: getattr(p, m) for m in _PARAM_MARKS if hasattr(p, m)}
        for name, p in model.named_parameters()
    }
    expected = set(model.state_dict())
    if config.tie_embeddings:
        expected.discard("lm_head.weight")
    state_dict = dict(state_dict)
    if config.tie_embeddings:
        state_dict.pop("lm_head.weight", None)
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the config: missing keys {missing}, unexpected keys {unexpected}"
        )
    want = model.state_dict()
    bad = [
        f"{k}: {tuple(v.shape)} != {tuple(want[k].shape)}"
        for k, v in state_dict.items()
        if v.shape != want[k].shape
    ]
    if bad:
        raise ValueError(f"{source} has tensors of the wrong shape (file != config): {bad}")
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    # assign=True installs new Parameter objects: put the layers' marks back
    for name, p in model.named_parameters():
        for m, v in marks.get(name, {}).items():
            setattr(p, m, v)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def from_pretrained(directory: str | os.PathLike, *, device=None, dtype=None) -> LanguageModel:
    """Load a checkpoint directory: mambakit's own (config.json + model.safetensors), official
    state-spaces or HF transformers, told apart by config.json (`mambakit.models.formats`)."""
    from mambakit.models.formats import load_checkpoint

    return load_checkpoint(directory, device=device, dtype=dtype)


def load_own(directory: str | os.PathLike, *, device=None, dtype=None) -> LanguageModel:
    """Load a model written by `save_pretrained` (config.json + model.safetensors in `directory`)."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a mambakit checkpoint directory")
    config = ModelConfig.load(directory)
    path = directory / WEIGHTS_NAME
    return build_from_state_dict(config, load_safetensors(path), source=str(path), device=device, dtype=dtype)
