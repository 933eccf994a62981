"""mambakit.inference: decoding state (`cache.py`) and generation."""

from mambakit.inference.cache import InferenceCache, KVCache, LayerState, MambaState

__all__ = ["InferenceCache", "KVCache", "LayerState", "MambaState"]
