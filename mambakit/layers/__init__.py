"""mambakit.layers: nn.Modules built from ops: the sequence mixers, norms and the residual block."""

from mambakit.layers.attention import Attention
from mambakit.layers.block import Block
from mambakit.layers.mamba1 import Mamba1
from mambakit.layers.mamba2 import Mamba2
from mambakit.layers.mlp import MLP
from mambakit.layers.norm import GatedRMSNorm, RMSNorm

__all__ = ["Attention", "Block", "GatedRMSNorm", "MLP", "Mamba1", "Mamba2", "RMSNorm"]
