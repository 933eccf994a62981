"""One decoding step of a whole pre-norm Mamba-2 block (residual add, RMSNorm, in_proj, conv, the SSD
state update, gated RMSNorm, out_proj) as one op.

Backends: `reference.py` (the block's step composed of the reference ops, i.e. the definition),
`torch.py` (the same composition of the PyTorch backends) and `triton.py` (three fused kernels a
block, for decoding at small batch on a GPU). Each defines `mamba2_block_step_impl` with the arguments
of the entry (minus `backend`), already checked.
"""

from mambakit.ops.mamba2_step.api import mamba2_block_step

__all__ = ["mamba2_block_step"]
