"""Pieces shared by the SSD Triton kernels: dt processing inside a kernel, the causal decay of a tile
of position pairs, and the block-size and tuning rules (the tile loads and stores that drop their
masks when every tile is full are in `ops/_triton_tiles.py`)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mambakit.ops._launch import CachedTuning, next_power_of_2
from mambakit.ops._triton_math import exp_ftz


@triton.jit
def process_dt(dt, bias, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, dt_min, dt_max):
    """delta = clamp(softplus?(dt + bias), dt_min, dt_max), elementwise, in dt's (float) dtype.

    Mirrors `reference.process_dt`: the clamp is applied only when a limit other than (0, inf) was
    given, so that without softplus a negative dt stays negative exactly as in the reference.
    """
    dt = dt + bias
    if SOFTPLUS:
        # softplus(v) = max(v, 0) + log(1 + exp(-|v|)); the split form never overflows exp.
        dt = tl.maximum(dt, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(dt)))
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    return dt


@triton.jit
def causal_decay(diff, keep, masked):
    """exp(diff) where `keep`, else 0, over one tile of position pairs (diff = cs_later - cs_earlier).
    `masked` false (a tile off the diagonal with full tiles and one document: every pair is kept)
    skips the select, 2 of the ~8 instructions an element, and the mask's own arithmetic."""
    if masked:
        diff = tl.where(keep, diff, float("-inf"))
    return exp_ftz(diff)


@triton.jit
def causal_keep(rows, cols, cols_in, diagonal, FULL: tl.constexpr, HAS_SEQ: tl.constexpr,
                ROWS_LATER: tl.constexpr = False):  # fmt: skip
    """(keep, masked) for `causal_decay` over the tile of positions rows x cols: keep the ordered
    pairs (col >= row, or row >= col with ROWS_LATER) whose column is in the chunk (`cols_in`; the
    caller adds the document test). With full tiles and one document only `diagonal` tiles (those
    holding unordered pairs) are masked; otherwise every tile is."""
    if ROWS_LATER:
        keep = rows[:, None] >= cols[None, :]
    else:
        keep = cols[None, :] >= rows[:, None]
    if FULL and not HAS_SEQ:
        masked = diagonal
    else:
        keep = keep & cols_in[None, :]
        masked = True
    return keep, masked


def full_tiles(seqlen: int, chunk_size: int, sub: int, headdim: int, block_p: int, dstate: int,
               block_n: int) -> bool:  # fmt: skip
    """Whether every SUB-row step of every chunk is full and the tiles cover headdim and dstate
    exactly, so that the steps need no masks (`_triton_tiles.load_tile`)."""
    return seqlen % sub == 0 and chunk_size % sub == 0 and headdim % block_p == 0 and dstate == block_n


def pow2_at_least(n: int, low: int = 16) -> int:
    """The block size covering n: a power of two, at least `low` (tl.dot needs 16 on every axis)."""
    return max(low, next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """Product precision of fp32 tl.dot: exact ("ieee", matching the reference to ~1e-5) unless the
    user allowed TF32 for PyTorch's own fp32 matmuls (`torch.backends.cuda.matmul.allow_tf32`), which
    then applies here too (~1e-3). bf16/fp16 operands go to tensor cores regardless of this flag."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """True where tl.dot must not see bf16 operands: Triton's CPU interpreter multiplies bf16 tiles as
    their raw uint16 bits (wrong results), so under TRITON_INTERPRET=1 bf16 tiles are upcast to fp32
    (exactly representable) before the product. Never true on a GPU."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _chunk_configs(configs, named_args, **kwargs):
    """Keep the tile configs that suit the operand width: wide (bf16/fp16 tensor-core) tiles, or small
    ones for fp32/fp64, whose exact products run on CUDA cores and need more registers and shared memory."""
    wide = named_args["x_ptr"].element_size() <= 2
    keep = [c for c in configs if (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] >= 2048) == wide]
    # Tiles taller than the chunk only compute masked rows.
    rows = pow2_at_least(named_args["chunk_size"])
    fits = [c for c in keep if c.kwargs["BLOCK_M"] <= rows and c.kwargs["BLOCK_K"] <= rows]
    keep = fits or sorted(keep, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"])[:1]
    if next_power_of_2(named_args["dstate"]) < 128:
        # Triton 3.6 on sm_90 miscompiles chunk_bwd_dC at (BLOCK_M 64, 8 warps) with dstate 32 (an
        # out-of-range shared-memory access under compute-sanitizer; `benchmarks/gpu_ssd_config_probe.py`
        # finds it): that tile is kept only at the dstate it was verified at.
        keep = [c for c in keep if not (c.kwargs["BLOCK_M"] == 64 and c.num_warps == 8)] or keep
    if named_args["tune_bucket"] == 0:  # small problem: the first (default) config, no tuning run
        return keep[:1] or configs[:1]
    return keep or configs


def tune_bucket(x: torch.Tensor) -> int:
    """Part of the tuning key: 0 for small problems (under 2**18 token-heads: one default config, no
    tuning, e.g. tests), else log2 of seqlen, so that a new length re-tunes only when it doubles."""
    batch, seqlen, nheads = x.shape[0], x.shape[1], x.shape[2]
    return 0 if batch * seqlen * nheads < 2**18 else max(seqlen, 1).bit_length()


# (BLOCK_M, BLOCK_K, num_warps, num_stages[, maxnreg]); the first of each list is the untuned default:
# fewest register spills across these kernels on sm_90. Uncapped, the 4-warp tiles take 252-255
# registers, so 2 programs share an SM; capped at 168 (a few spills, sm_90 SASS: dx 434 -> 464
# instructions a tile) 3 do, for more warps to hide the loads with (the Mamba-1 backward gained 14%)
CHUNK_TILES_WIDE = [
    (64, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 2),
    (64, 64, 4, 2, 168), (64, 64, 4, 3, 168), (64, 32, 4, 2, 168),
]  # fmt: skip
CHUNK_TILES_NARROW = [(32, 32, 4, 2), (32, 32, 4, 1), (32, 16, 4, 2)]


def _chunk_tile_list() -> list[tuple[int, ...]]:
    env = os.environ.get("MAMBAKIT_SSD_CHUNK_CONFIG")
    if env:  # one fixed "BLOCK_M,BLOCK_K,num_warps,num_stages[,maxnreg]" for every per-chunk kernel
        return [tuple(int(v) for v in env.split(","))]
    return CHUNK_TILES_WIDE + CHUNK_TILES_NARROW


def chunk_tile_max(block_q: int) -> int:
    """The largest BLOCK_M or BLOCK_K a `chunk_tuned` kernel may run with (the interpreter's one tile;
    on a GPU any config the tuner may pick, or the one fixed by `MAMBAKIT_SSD_CHUNK_CONFIG`)."""
    if interpreting():
        return min(64, block_q)
    return max(max(t[0], t[1]) for t in CHUNK_TILES_WIDE + CHUNK_TILES_NARROW + _chunk_tile_list())


def chunk_tuned(fn=None, *, reset_to_zero: tuple[str, ...] = ()):
    """triton.autotune over row/column tiles, warps and stages for the per-chunk kernels, keyed on the
    head and chunk sizes and a coarse size bucket (Triton adds the dtypes). Every config computes the
    same result; they differ only in speed, so the tuner may pick any. Under the interpreter the
    launcher passes one tile itself. `reset_to_zero` names outputs that a config fills only partly
    (partial sums laid out by BLOCK_M)."""
    if fn is None:
        return lambda f: chunk_tuned(f, reset_to_zero=reset_to_zero)
    if interpreting():
        return fn
    tiles = _chunk_tile_list()
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s, maxnreg=(cap or [None])[0])
        for m, k, w, s, *cap in tiles
    ]
    tuned = triton.autotune(
        configs=configs,
        key=["nheads", "headdim", "dstate", "chunk_size", "heads_per_group", "tune_bucket"],
        prune_configs_by={"early_config_prune": _chunk_configs},
        reset_to_zero=list(reset_to_zero),
    )(fn)
    return CachedTuning(tuned)


def chunk_tiles(block_q: int) -> dict:
    """Launch arguments for a `chunk_tuned` kernel: none on a GPU (the tuner picks), one tile under the
    interpreter."""
    if not interpreting():
        return {}
    return {"BLOCK_M": min(64, block_q), "BLOCK_K": min(64, block_q)}
