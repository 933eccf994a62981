"""Triton pieces shared by the fused decoding-step kernels (`ops/mamba1_step`, `ops/mamba2_step`)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def wait_for_inputs(USE_PDL: tl.constexpr):
    """Under programmatic dependent launch (ops/_launch.py `use_pdl`), wait here for the previous
    kernel's writes, then let the next kernel launch; without PDL it is nothing.

    Before the wait a kernel may read what the previous kernel does not write: its weights, and a
    decoding state that only this kernel writes (its last writer, this kernel one token earlier, is at
    least two launches back, and a kernel starts only once the previous one has passed its own wait,
    i.e. once the one before that has finished). Everything else, and every write, comes after."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def add_norm_row(hid_ptr, res_ptr, res_out_ptr, nw_ptr, b, k, ok, d_model, eps, write_residual,
                 HAS_RES: tl.constexpr, DT: tl.constexpr):  # fmt: skip
    """RMS norm of row b of hidden + residual over the (BLOCK_K,) columns k (ok: k < d_model), rounded
    to DT as the unfused norm returns it, in float32. Where `write_residual`, also stores the sum (the
    new residual) in res_out's dtype. Every program of a kernel recomputes this from the row: it costs
    less than a kernel boundary."""
    r = tl.load(hid_ptr + b * d_model + k, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        r += tl.load(res_ptr + b * d_model + k, mask=ok, other=0.0).to(tl.float32)
    norm_w = tl.load(nw_ptr + k, mask=ok, other=0.0).to(tl.float32)
    if write_residual:
        tl.store(res_out_ptr + b * d_model + k, r.to(res_out_ptr.dtype.element_ty), mask=ok)
    rstd = 1.0 / tl.sqrt(tl.sum(r * r, 0) / d_model + eps)
    return (r * rstd * norm_w).to(DT).to(tl.float32)


@triton.jit
def conv_silu_step(cs_ptr, cw_ptr, cb_ptr, b, c, ok_c, x, d_conv, s_cs_b, s_cs_d, s_cs_w,
                   HAS_CONV_BIAS: tl.constexpr, BLOCK_W: tl.constexpr, DT: tl.constexpr):  # fmt: skip
    """One depthwise conv step with SiLU for channels c (ok_c: those that have one) and their new
    inputs x (float32): the window is the d_conv - 1 cached inputs of conv_state (batch, channels,
    d_conv - 1), then x. Shifts x into the state in place; returns silu(conv) rounded to DT, in float32."""
    offs_w = tl.arange(0, BLOCK_W)
    cs = cs_ptr + b * s_cs_b + c[:, None] * s_cs_d + offs_w[None, :] * s_cs_w
    in_state = ok_c[:, None] & (offs_w[None, :] < d_conv - 1)
    window = tl.load(cs, mask=in_state, other=0.0).to(tl.float32)
    window = tl.where(offs_w[None, :] == d_conv - 1, x[:, None], window)
    taps = tl.load(cw_ptr + c[:, None] * d_conv + offs_w[None, :],
                   mask=ok_c[:, None] & (offs_w[None, :] < d_conv), other=0.0).to(tl.float32)  # fmt: skip
    conv = tl.sum(window * taps, 1)
    if HAS_CONV_BIAS:
        conv += tl.load(cb_ptr + c, mask=ok_c, other=0.0).to(tl.float32)
    # the new state is the window shifted left by one, selected in registers: reloading the state would
    # read what another thread of this program may already have overwritten
    shift = offs_w[None, None, :] == offs_w[None, :, None] + 1
    new_state = tl.sum(tl.where(shift, window[:, None, :], 0.0), 2)
    tl.store(cs, new_state.to(cs_ptr.dtype.element_ty), mask=in_state)
    return (conv / (1.0 + tl.exp(-conv))).to(DT).to(tl.float32)
