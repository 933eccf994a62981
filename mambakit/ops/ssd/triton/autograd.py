"""Autograd and torch.compile wiring of the SSD Triton kernels.

Two `torch.library.custom_op`s, `mambakit::ssd_fwd` and `mambakit::ssd_bwd`, with fake (meta)
implementations, so that torch.compile traces a model through them without looking inside, and
`register_autograd` tying the backward to the forward; eager calls skip the dispatcher (`EagerOp`), and
forwards that nothing will differentiate do not keep the chunk states.
`ssd_triton` is the backend entry: it brings
the arguments into the kernels' form (B, C, z in x's dtype, D as (nheads, headdim)) with ordinary
differentiable PyTorch ops, so that their gradients flow back to the original dtypes and shapes.

cu_seqlens: without initial or final states it is exactly seq_idx and takes the fused path. With
per-sequence states, each sequence runs through the kernels on its own (a Python loop over
sequences: correct, but one launch set per sequence; this path is meant for prefill of a few prompts).
"""

from __future__ import annotations

import math

import torch

from mambakit.ops._eager import EagerOp
from mambakit.ops.ssd.triton.backward import ssd_backward
from mambakit.ops.ssd.triton.forward import acc_dtype, ssd_forward

Tensor = torch.Tensor


def _contiguous_like(t: Tensor) -> Tensor:
    """The fakes' results: contiguous whatever the input's layout, as the real ops return them."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _ssd_fwd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    initial_state: Tensor | None,
    seq_idx: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns y, y before the gate (empty (0,) without z), final state, chunk states, delta, cs."""
    return _forward(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_state, seq_idx, True
    )


def _ssd_fwd_no_grad(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_state,
                     seq_idx):  # fmt: skip
    """`_ssd_fwd` for a forward nothing will differentiate: the sequential path need not store the
    chunk states (the states returned are then empty)."""
    return _forward(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_state, seq_idx, False
    )


def _forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_state, seq_idx,
             keep_states):  # fmt: skip
    y, y_pre, final, states, delta, cs = ssd_forward(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, (dt_min, dt_max), initial_state, seq_idx,
        keep_states=keep_states,
    )  # fmt: skip
    # the fake declares contiguous results: every real one is made so (a no-op where it already is)
    outs = (y, (x.new_empty(0) if y_pre is None else y_pre), final, states, delta, cs)
    return tuple(t.contiguous() for t in outs)


ssd_fwd_op = torch.library.custom_op("mambakit::ssd_fwd", _ssd_fwd, mutates_args=())


@ssd_fwd_op.register_fake
def _(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_state, seq_idx):
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[3]
    nchunks = math.ceil(seqlen / chunk_size)
    acc = acc_dtype(x)
    return (
        _contiguous_like(x),
        _contiguous_like(x) if z is not None else x.new_empty(0),
        x.new_empty(batch, nheads, headdim, dstate, dtype=acc),
        x.new_empty(batch, nchunks, nheads, headdim, dstate, dtype=acc),
        x.new_empty(batch, nheads, seqlen, dtype=acc),
        x.new_empty(batch, nheads, seqlen, dtype=acc),
    )


def _ssd_bwd(
    dy: Tensor,
    dfinal: Tensor | None,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    has_initial_state: bool,
    seq_idx: Tensor | None,
    y_pre: Tensor,
    final: Tensor,
    states: Tensor,
    delta: Tensor,
    cs: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x, dt, A, B, C, D, z, dt_bias, initial_state (empty (0,) for absent inputs)."""
    grads = ssd_backward(
        dy, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, (dt_min, dt_max),
        has_initial_state, seq_idx, y_pre, final, states, delta, cs,
    )  # fmt: skip
    # contiguous, as the fake declares: ddt comes out of the glue as a transposed (batch, nheads,
    # seqlen) buffer, which torch.compile's stride assertions rejected on the H100
    return tuple(x.new_empty(0) if g is None else g.contiguous() for g in grads)


ssd_bwd_op = torch.library.custom_op("mambakit::ssd_bwd", _ssd_bwd, mutates_args=())
ssd_bwd = EagerOp(ssd_bwd_op, _ssd_bwd)


@ssd_bwd_op.register_fake
def _(dy, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max,
      has_initial_state, seq_idx, y_pre, final, states, delta, cs):  # fmt: skip
    def like(t):
        return x.new_empty(0) if t is None else _contiguous_like(t)

    return (
        like(x), like(dt), like(A), like(B), like(C), like(D), like(z), like(dt_bias),
        like(final) if has_initial_state else x.new_empty(0),
    )  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_state, seq_idx = inputs
    y, y_pre, final, states, delta, cs = output
    # y before the gate is needed only for dz; the kernels recompute everything else
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, seq_idx, y_pre, final, states, delta, cs)
    ctx.args = (chunk_size, dt_softplus, dt_min, dt_max, initial_state is not None)


def _backward(ctx, dy, _dy_pre, dfinal, _dstates, _ddelta, _dcs):
    x, dt, A, B, C, D, z, dt_bias, seq_idx, y_pre, final, states, delta, cs = ctx.saved_tensors
    chunk_size, dt_softplus, dt_min, dt_max, has_h0 = ctx.args
    if dy is None:
        dy = torch.zeros_like(x)
    dx, ddt, dA, dB, dC, dD, dz, dbias, dh0 = ssd_bwd(
        dy, dfinal, x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_min, dt_max,
        has_h0, seq_idx, y_pre, final, states, delta, cs,
    )  # fmt: skip
    return (
        dx, ddt, dA, dB, dC, None,
        None if D is None else dD, None if z is None else dz, None if dt_bias is None else dbias,
        None, None, None, dh0 if has_h0 else None, None,
    )  # fmt: skip


ssd_fwd_op.register_autograd(_backward, setup_context=_setup_context)

ssd_fwd = EagerOp(ssd_fwd_op, _ssd_fwd, _setup_context, _backward, no_grad_impl=_ssd_fwd_no_grad)


# The kernels hold a whole chunk's operand tiles on chip; beyond 256 positions they would not fit in
# shared memory. The result does not depend on the chunk size (beyond rounding), so larger requests
# run with 256-position chunks.
MAX_CHUNK = 256


def _run(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_state, seq_idx):
    chunk_size = min(chunk_size, MAX_CHUNK)
    dtype = x.dtype
    B, C = B.to(dtype), C.to(dtype)
    z = None if z is None else z.to(dtype)
    if D is not None:
        D = (D[:, None] if D.ndim == 1 else D).expand(x.shape[2], x.shape[3]).to(acc_dtype(x)).contiguous()
    if initial_state is not None:
        initial_state = initial_state.to(acc_dtype(x))  # the state is kept in float32 (float64)
    y, _, final, *_ = ssd_fwd(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, float(dt_limit[0]), float(dt_limit[1]),
        initial_state, seq_idx,
    )  # fmt: skip
    return y, final


def ssd_triton(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    initial_state: Tensor | None,
    return_final_state: bool,
    seq_idx: Tensor | None,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Backend entry (see `mambakit.ops.ssd.ssd`): y (batch, seqlen, nheads, headdim) and the
    final state (or None)."""
    batch, seqlen, nheads, headdim = x.shape
    nchunks = -(-seqlen // min(chunk_size, MAX_CHUNK))
    if max(x.numel(), batch * nchunks * nheads * headdim * B.shape[-1]) >= 2**31:
        raise ValueError(
            f"x of shape {tuple(x.shape)} (with its chunk states) has 2**31 or more elements, beyond the "
            "Triton kernels' 32-bit offsets; split the batch or use backend='torch'"
        )
    if cu_seqlens is not None and initial_state is None and not return_final_state:
        from mambakit.ops.ssd import cu_seqlens_to_seq_idx

        seq_idx, cu_seqlens = cu_seqlens_to_seq_idx(cu_seqlens, x.shape[1]), None
    if cu_seqlens is None:
        y, final = _run(
            x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_state, seq_idx
        )
        return y, (final if return_final_state else None)
    ys, finals = [], []
    bounds = cu_seqlens.tolist()
    for k, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = slice(start, end)
        yk, fk = _run(
            x[:, part], dt[:, part], A, B[:, part], C[:, part], chunk_size, D,
            None if z is None else z[:, part], dt_bias, dt_softplus, dt_limit,
            None if initial_state is None else initial_state[k : k + 1], None,
        )  # fmt: skip
        ys.append(yk)
        finals.append(fk)
    return torch.cat(ys, dim=1), (torch.cat(finals, dim=0) if return_final_state else None)
