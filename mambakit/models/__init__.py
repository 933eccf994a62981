"""mambakit.models: configuration, presets, the language model and its checkpoint formats."""

from mambakit.models.checkpoint import from_pretrained, save_pretrained
from mambakit.models.config import AttentionConfig, MLPConfig, ModelConfig, SSMConfig
from mambakit.models.lm import LanguageModel
from mambakit.models.presets import PRESETS, hybrid_pattern, preset

__all__ = [
    "AttentionConfig",
    "LanguageModel",
    "MLPConfig",
    "ModelConfig",
    "PRESETS",
    "SSMConfig",
    "from_pretrained",
    "hybrid_pattern",
    "preset",
    "save_pretrained",
]
