"""Cross-entropy of a linear LM head: loss from hidden states and the head's weight, never the full logits.

Backends: `reference.py` (the full (tokens, vocab) logits, then the textbook formula) and `torch.py`
(token chunks, an autograd.Function that recomputes each chunk's logits in the backward). Each defines
`linear_cross_entropy_impl` with the arguments of the entry (minus `backend`), already checked.
"""

from mambakit.ops.cross_entropy.api import default_chunk_size, linear_cross_entropy

__all__ = ["linear_cross_entropy", "default_chunk_size"]
