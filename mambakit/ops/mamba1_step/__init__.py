"""One decoding step of a whole pre-norm Mamba-1 block (residual add, RMSNorm, in_proj, conv, x_proj,
dt_proj, selective state update, gate, out_proj) as one op.

Backends: `reference.py` (the block's step composed of the reference ops, i.e. the definition),
`torch.py` (the same composition of the PyTorch backends) and `triton.py` (four fused kernels a
block, for decoding at small batch on a GPU). Each defines `mamba1_block_step_impl` with the arguments
of the entry (minus `backend`), already checked.
"""

from mambakit.ops.mamba1_step.api import mamba1_block_step

__all__ = ["mamba1_block_step"]
