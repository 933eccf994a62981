"""Per-thread scratch buffers for the CPU backends' large temporaries.

Tensors of a few MB and more come straight from the OS, and every page of a fresh one faults on
first touch. On the 2-core CPU VM the benchmarks run on, those faults cost about as much as the
arithmetic of the chunked scans (the SSD forward ran ~2x faster with glibc told never to return
memory to the OS). Reusing one buffer per slot and thread removes that cost. Rules for callers: use
it only for temporaries that are dead when the op returns (never returned, never saved for
backward); a buffer above `MAX_BYTES` is not kept. Buffers are uninitialized. The memory stays
held by the thread (at most MAX_BYTES per slot, dtype and inference mode; the SSD uses five slots)
until `release()` or the thread's end.
"""

from __future__ import annotations

import math
import threading

import torch

_LOCAL = threading.local()
# each kept buffer is at most this large; a bigger request gets a fresh tensor
MAX_BYTES = 64 << 20


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized tensor of `shape`, reused across calls on CPU for the same `slot`."""
    numel = math.prod(shape)
    if device.type != "cpu" or numel * dtype.itemsize > MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    # inference tensors may only be written under inference_mode, ordinary ones anywhere: keep both
    key = (slot, dtype, torch.is_inference_mode_enabled())
    bufs = _LOCAL.__dict__.setdefault("bufs", {})
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def release() -> None:
    """Drop this thread's scratch buffers (their memory goes back to the allocator)."""
    _LOCAL.__dict__.pop("bufs", None)
