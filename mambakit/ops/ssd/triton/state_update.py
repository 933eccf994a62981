"""One decoding step of SSD (Mamba-2) in one kernel, updating the recurrent state in place.

Grid: (headdim blocks, batch, nheads). Each program reads its (BLOCK_P, dstate) slice of the state
once, writes it back once and produces BLOCK_P outputs:
    delta = clamp(softplus?(dt + dt_bias));  h = exp(delta A) h + delta x B^T;  y = h C + D x;  y *= silu(z)
dstate is covered by one block (up to 256), so every state element is touched exactly once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mambakit.ops.ssd.triton._common import pow2_at_least, process_dt


@triton.jit
def ssd_state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    headdim, dstate, heads_per_group, dt_min, dt_max,
    sst_b, sst_h, sst_p, sst_n,
    sx_b, sx_h, sx_p,
    sdt_b, sdt_h,
    sB_b, sB_g, sB_n,
    sC_b, sC_g, sC_n,
    sD_h, sD_p,
    sz_b, sz_h, sz_p,
    sy_b, sy_h, sy_p,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_LIMIT: tl.constexpr, A_IS_LOG: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pb = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    g = h // heads_per_group
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    pmask = offs_p < headdim
    nmask = offs_n < dstate
    st_ptrs = state_ptr + b * sst_b + h * sst_h + offs_p[:, None] * sst_p + offs_n[None, :] * sst_n
    st_mask = pmask[:, None] & nmask[None, :]

    dt = tl.load(dt_ptr + b * sdt_b + h * sdt_h).to(ACC)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + h).to(ACC)
    delta = process_dt(dt, bias, SOFTPLUS, HAS_LIMIT, dt_min, dt_max)
    A = tl.load(A_ptr + h).to(ACC)
    if A_IS_LOG:
        A = -tl.exp(A)
    decay = tl.exp(delta * A)

    x = tl.load(x_ptr + b * sx_b + h * sx_h + offs_p * sx_p, mask=pmask, other=0.0).to(ACC)
    Bv = tl.load(B_ptr + b * sB_b + g * sB_g + offs_n * sB_n, mask=nmask, other=0.0).to(ACC)
    Cv = tl.load(C_ptr + b * sC_b + g * sC_g + offs_n * sC_n, mask=nmask, other=0.0).to(ACC)
    s = tl.load(st_ptrs, mask=st_mask, other=0.0).to(ACC)
    s = decay * s + (delta * x)[:, None] * Bv[None, :]
    tl.store(st_ptrs, s.to(state_ptr.dtype.element_ty), mask=st_mask)
    y = tl.sum(s * Cv[None, :], 1)
    if HAS_D:
        y += x * tl.load(D_ptr + h * sD_h + offs_p * sD_p, mask=pmask, other=0.0).to(ACC)
    if HAS_Z:
        zv = tl.load(z_ptr + b * sz_b + h * sz_h + offs_p * sz_p, mask=pmask, other=0.0).to(ACC)
        y = y * zv * tl.sigmoid(zv)
    tl.store(y_ptr + b * sy_b + h * sy_h + offs_p * sy_p, y.to(y_ptr.dtype.element_ty), mask=pmask)


@torch.library.custom_op("mambakit::ssd_state_update", mutates_args=("state",), device_types=None)
def ssd_state_update_op(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    A_is_log: bool = False,
) -> torch.Tensor:
    """The kernel launch as a custom op that mutates `state`, so torch.compile (and CUDA graphs of a
    compiled decoding step) see one opaque, correctly ordered in-place op."""
    batch, nheads, headdim, dstate = state.shape
    ngroups = B.shape[1]
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    block_n = pow2_at_least(dstate, 16)
    # about 16 state elements per thread (4 warps): enough to hide latency, few enough registers
    block_p = max(1, min(pow2_at_least(headdim, 1), 2048 // block_n))
    sD = (0, 0) if D is None else ((D.stride(0), 0) if D.ndim == 1 else D.stride())
    grid = (triton.cdiv(headdim, block_p), batch, nheads)
    ssd_state_update_kernel[grid](
        state, x, dt, A, B, C, D, z, dt_bias, y,
        headdim, dstate, nheads // ngroups, dt_min, min(dt_max, 3.0e38),
        *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *sD,
        *((0, 0, 0) if z is None else z.stride()), *y.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        HAS_LIMIT=(dt_min, dt_max) != (0.0, math.inf), A_IS_LOG=A_is_log, BLOCK_P=block_p, BLOCK_N=block_n,
        # float64 states run in float64; float32 and half-precision states in float32 (rounded on store)
        ACC=tl.float64 if state.dtype == torch.float64 else tl.float32,
        num_warps=4,
    )  # fmt: skip
    return y


@ssd_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max, A_is_log=False):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)  # contiguous, as the real op's


def ssd_state_update_triton(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    A_is_log: bool = False,
) -> torch.Tensor:
    """state (batch, nheads, headdim, dstate), updated in place; x, z (batch, nheads, headdim);
    dt (batch, nheads); B, C (batch, ngroups, dstate). Returns y (batch, nheads, headdim), x's dtype."""
    return ssd_state_update_op(
        state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, float(dt_limit[0]), float(dt_limit[1]),
        bool(A_is_log),
    )  # fmt: skip
