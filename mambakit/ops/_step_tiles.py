"""Tile sizes of the fused decoding-step kernels (`ops/mamba1_step`, `ops/mamba2_step`).

Their GEMV-like programs hold a (rows, K) tile with K the whole input row, so that all of a program's
loads are in flight at once: at decoding sizes the wait on a load, not bandwidth, is the cost.
"""

from __future__ import annotations

from mambakit.ops._launch import next_power_of_2


def tile_rows(n_rows: int, block_k: int, elems: int) -> int:
    """Rows of a (rows, block_k) tile of about `elems` elements: a power of two, at most n_rows' one."""
    return max(1, min(next_power_of_2(n_rows), elems // block_k))


def tile_warps(tile_elems: int, per_thread: int) -> int:
    """Warps for a tile of `tile_elems` elements at `per_thread` elements a thread: 1, 2, 4 or 8."""
    return next_power_of_2(int(min(8, max(1, tile_elems // (32 * per_thread)))))
