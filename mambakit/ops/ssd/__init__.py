"""Mamba-2 state space duality (SSD): the one public entry and its one-token step.

Backends: `reference.py` (the sequential recurrence and the quadratic "masked attention" form, which
must agree), `torch.py` (chunked block decomposition) and `triton/`. Each defines `ssd_impl` and
`ssd_state_update_impl` with the arguments below (minus `backend`), already checked.
"""

from mambakit.ops.ssd.api import cu_seqlens_to_seq_idx, ssd, ssd_state_update

__all__ = ["ssd", "ssd_state_update", "cu_seqlens_to_seq_idx"]
