"""The decoding state classes, under the name generation code uses; they are defined in
`mambakit/layers/state.py`, beside the layers that fill them."""

from mambakit.layers.state import InferenceCache, KVCache, LayerState, MambaState

__all__ = ["InferenceCache", "KVCache", "LayerState", "MambaState"]
