"""Argument checks for the public op entries: every message names the argument and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    t: object,
    shape: Sequence[int | None],
    *,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that `t` is a tensor of exactly `shape` (None = any size on that axis), a dtype in
    `dtypes` and on `device`. Returns `t` so a check can sit in an expression."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    # plain loops and one read of each property: these checks run on every call of every op
    dims = t.shape
    ok = len(dims) == len(shape)
    if ok:
        for s, d in zip(shape, dims):
            if s is not None and s != d:
                ok = False
                break
    if not ok:
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(dims)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None:
        where = t.device
        if where != device:
            raise ValueError(f"{name} is on {where} but the other inputs are on {device}")
    return t


def check_any_rank(name: str, t: object, *, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    """A floating tensor of rank >= 1 whose last axis is the feature axis: `(..., dim)`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return check_tensor(name, t, (None,) * max(t.ndim, 1), dtypes=dtypes)


def check_optional(name: str, t: object, shape: Sequence[int | None], **kw) -> torch.Tensor | None:
    """`check_tensor` for an argument that may be None."""
    return None if t is None else check_tensor(name, t, shape, **kw)


def values_unreadable(t: torch.Tensor) -> bool:
    """True where a check of `t`'s values cannot run: reading them is a device sync, which a CUDA graph
    capture forbids and torch.compile cannot guard on. Eager calls (including a model's first run and
    the warm-up runs before a capture) still check."""
    return torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_seq_idx(seq_idx: torch.Tensor | None, batch: int, seqlen: int, device: torch.device) -> None:
    """seq_idx: (batch, seqlen) integer document ids, non-decreasing along the sequence."""
    if seq_idx is None:
        return
    check_tensor("seq_idx", seq_idx, (batch, seqlen), dtypes=(torch.int32, torch.int64), device=device)
    if seqlen > 1 and not values_unreadable(seq_idx) and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ValueError("seq_idx must be non-decreasing along the sequence (one id per packed document)")


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_positive_float(name: str, value: object) -> float:
    """A real number > 0 (int or float, not bool); returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive float, got {value!r}")
    return float(value)


def check_divides(name: str, value: int, of_name: str, of_value: int) -> None:
    if value <= 0 or of_value % value != 0:
        raise ValueError(f"{name}={value} must be positive and divide {of_name}={of_value}")
