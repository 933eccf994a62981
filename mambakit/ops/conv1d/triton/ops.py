"""Launchers of the conv1d Triton kernels, registered as `torch.library` custom ops with autograd.

The ops are opaque to `torch.compile` (fake implementations give the shapes) and differentiable through
`register_autograd`: the backward recomputes the pre-activation instead of saving it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mambakit.ops._launch import CachedTuning, next_power_of_2, sm_count
from mambakit.ops.conv1d.triton.kernels import conv_bwd_kernel, conv_fwd_kernel, conv_update_kernel

# (BLOCK_L, BLOCK_D, num_warps) candidates for the forward on a GPU, 32-64 elements a thread (96-163
# registers on sm_90); the interpreter uses one small config (autotuning there only multiplies CPU time)
_FWD_CONFIGS = [
    triton.Config({"BLOCK_L": bl, "BLOCK_D": bd}, num_warps=w)
    for bl, bd, w in [
        (64, 128, 8),
        (64, 64, 4),
        (128, 64, 8),
        (32, 128, 4),
        (32, 256, 8),
        (128, 128, 8),
        (16, 256, 4),
    ]
]
_conv_fwd_tuned = CachedTuning(
    triton.autotune(
        _FWD_CONFIGS, key=["dim", "WIDTH", "HAS_SEQ", "HAS_INIT", "SILU", "SILU_GRAD", "HAS_BIAS", "ACC"]
    )(conv_fwd_kernel)
)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _acc_dtype(*tensors: torch.Tensor | None):
    """Accumulate in float32, or float64 when an input is float64 (for gradcheck)."""
    return tl.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else tl.float32


def _torch_dtype(acc) -> torch.dtype:
    """The torch dtype of an `_acc_dtype` result."""
    return torch.float64 if acc == tl.float64 else torch.float32


def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return (0,) * n if t is None else tuple(t.stride())


def _zero_width_state(x: torch.Tensor, width: int, initial_state: torch.Tensor | None) -> torch.Tensor:
    """Final state of an empty sequence: the initial state (zeros if none)."""
    batch, _, dim = x.shape
    if initial_state is None:
        return x.new_zeros(batch, dim, width - 1)
    return initial_state.to(x.dtype).clone()


def conv_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    initial_state: torch.Tensor | None,
    store_final: bool,
    seq_idx: torch.Tensor | None,
    silu_grad_of: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns out (batch, seqlen, dim) in x's dtype and the final state
    (batch, dim, width - 1) in x's dtype (empty (0,) when not asked for).

    With `silu_grad_of` = dout (batch, seqlen, dim), out is instead dout * silu'(pre-activation) in
    float32 (float64 for float64 inputs), the backward's first launch."""
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    acc = _acc_dtype(x, weight, initial_state)
    if silu_grad_of is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    else:
        out = torch.empty(x.shape, dtype=_torch_dtype(acc), device=x.device)
    final = x.new_empty(batch, dim, width - 1) if store_final else x.new_empty(0)
    if seqlen == 0 or batch == 0 or dim == 0:
        if store_final:
            final.copy_(_zero_width_state(x, width, initial_state))
        return out, final
    fs = final.stride() if store_final else (0, 0, 0)
    args = (
        x,
        weight,
        bias if bias is not None else x,
        initial_state if initial_state is not None else x,
        seq_idx if seq_idx is not None else x,
        out,
        final if store_final else x,
        silu_grad_of if silu_grad_of is not None else x,
        seqlen,
        dim,
        *x.stride(),
        *weight.stride(),
        *_strides(initial_state, 3),
        *_strides(seq_idx, 2),
        *out.stride(),
        *fs,
        *_strides(silu_grad_of, 3),
    )
    flags = dict(
        WIDTH=width,
        HAS_BIAS=bias is not None,
        HAS_INIT=initial_state is not None,
        HAS_SEQ=seq_idx is not None,
        SILU=silu,
        STORE_FINAL=store_final,
        SILU_GRAD=silu_grad_of is not None,
        ACC=acc,
    )
    if _interpreting():
        bl, bd = 16, 64
        grid = (triton.cdiv(seqlen, bl), triton.cdiv(dim, bd), batch)
        conv_fwd_kernel[grid](*args, **flags, BLOCK_L=bl, BLOCK_D=bd)
    else:

        def grid(meta):
            return (triton.cdiv(seqlen, meta["BLOCK_L"]), triton.cdiv(dim, meta["BLOCK_D"]), batch)

        _conv_fwd_tuned[grid](*args, **flags)
    return out, final


def _num_sms(device: torch.device) -> int:
    return sm_count(device)


def _bwd_config() -> tuple[int, int, int, int]:
    """(BLOCK_L, BLOCK_D, num_warps, programs per SM) of the backward kernel on a GPU;
    `MAMBAKIT_CONV_BWD_CONFIG="bl,bd,warps,per_sm"` overrides it (benchmarks/gpu_conv_norm.py
    --bwd-configs)."""
    env = os.environ.get("MAMBAKIT_CONV_BWD_CONFIG")
    if env:
        vals = [int(v) for v in env.split(",")]
        if len(vals) != 4 or min(vals) < 1 or any(v & (v - 1) for v in vals[:3]):
            raise ValueError(
                f"MAMBAKIT_CONV_BWD_CONFIG must be 'block_l,block_d,warps,per_sm' (the first three powers "
                f"of two), got {env!r}"
            )
        return vals[0], vals[1], vals[2], vals[3]
    return 16, 128, 4, 16


def conv_bwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    silu: bool,
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    dout: torch.Tensor,
    dfinal: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward. Returns dx, dweight, dbias (None without bias) and dinitial_state (None
    without initial_state), each in its input's dtype."""
    batch, seqlen, dim = x.shape
    width = weight.shape[1]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dinit = None if initial_state is None else initial_state.new_zeros(initial_state.shape)
    if seqlen == 0 or batch == 0 or dim == 0:
        if dinit is not None and dfinal is not None:
            dinit += dfinal.to(dinit.dtype)
        dw = weight.new_zeros(weight.shape)
        return dx, dw, None if bias is None else bias.new_zeros(bias.shape), dinit
    if silu:
        # g = dout * silu'(pre-activation), then the backward of a conv without activation (see kernels.py)
        dout, _ = conv_fwd(x, weight, bias, False, initial_state, False, seq_idx, silu_grad_of=dout)
    acc_tl = _acc_dtype(x, weight, initial_state)
    acc = _torch_dtype(acc_tl)
    ext_start = -(width - 1) if initial_state is not None else 0
    if _interpreting():
        # small row blocks and two chunks: tests at tiny sizes still cross chunk and loop boundaries
        block_l, block_d, warps = 16, 64, 4
        n_blocks = triton.cdiv(seqlen - ext_start, block_l)
        n_chunks = min(n_blocks, 2)
    else:
        block_l, block_d, warps, per_sm = _bwd_config()
        n_blocks = triton.cdiv(seqlen - ext_start, block_l)
        # enough programs to fill the GPU several times over; each keeps its dweight partial in registers
        n_chunks = min(n_blocks, max(1, (per_sm * _num_sms(x.device)) // (triton.cdiv(dim, block_d) * batch)))
    d_blocks = triton.cdiv(dim, block_d)
    iters = triton.cdiv(n_blocks, n_chunks)
    n_chunks = triton.cdiv(n_blocks, iters)
    block_w = next_power_of_2(width)
    dw_part = torch.empty(batch * n_chunks, block_w, dim, dtype=acc, device=x.device)
    db_part = torch.empty(batch * n_chunks, dim, dtype=acc, device=x.device) if bias is not None else dw_part
    grid = (n_chunks, d_blocks, batch)
    conv_bwd_kernel[grid](
        x,
        weight,
        bias if bias is not None else x,
        initial_state if initial_state is not None else x,
        seq_idx if seq_idx is not None else x,
        dout,
        dfinal if dfinal is not None else x,
        dx,
        dinit if dinit is not None else x,
        dw_part,
        db_part,
        seqlen,
        dim,
        ext_start,
        iters,
        *x.stride(),
        *weight.stride(),
        *_strides(initial_state, 3),
        *_strides(seq_idx, 2),
        *dout.stride(),
        *_strides(dfinal, 3),
        *dx.stride(),
        *_strides(dinit, 3),
        WIDTH=width,
        BLOCK_W=block_w,
        HAS_BIAS=bias is not None,
        HAS_INIT=initial_state is not None,
        HAS_SEQ=seq_idx is not None,
        HAS_DFINAL=dfinal is not None,
        ACC=acc_tl,
        BLOCK_L=block_l,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    dw = dw_part[:, :width].sum(0).t().to(weight.dtype).contiguous()
    db = None if bias is None else db_part.sum(0).to(bias.dtype)
    return dx, dw, db, dinit


def conv_update(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool
) -> torch.Tensor:
    """Launch the one-token step; conv_state is updated in place."""
    batch, dim = x.shape
    width = weight.shape[1]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if batch == 0 or dim == 0:
        return out
    block_d = 32 if _interpreting() else min(256, next_power_of_2(dim))
    grid = (batch, triton.cdiv(dim, block_d))
    conv_update_kernel[grid](
        x,
        conv_state,
        weight,
        bias if bias is not None else x,
        out,
        dim,
        *x.stride(),
        *conv_state.stride(),
        *weight.stride(),
        *out.stride(),
        WIDTH=width,
        HAS_BIAS=bias is not None,
        SILU=silu,
        ACC=_acc_dtype(x, weight, conv_state),
        BLOCK_D=block_d,
    )
    return out
