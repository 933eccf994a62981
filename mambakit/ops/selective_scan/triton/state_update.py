"""Triton kernel for one decoding step of the Mamba-1 scan: updates the (batch, dim, dstate) state in place.

One program per (batch, group, block of channels): it reads the block's state once, applies
h = exp(delta A) h + delta B x, writes it back and emits y = C h + D x (gated by silu(z)).
With HAS_DT_PROJ the program also forms its channels' dt from the low-rank dt (Mamba-1's dt_proj:
dt[d] = sum_r W[d, r] dt_low[r]), a (BLOCK_D, dt_rank) tile, instead of a separate GEMV kernel.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from mambakit.ops._launch import next_power_of_2
from mambakit.ops.selective_scan.triton.scan_fwd import _softplus


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, W_ptr, y_ptr,
    dim, dstate, dim_per_group, ngroups, dt_rank,
    s_h_b, s_h_d, s_h_n, s_x_b, s_x_d, s_dt_b, s_dt_d, s_A_d, s_A_n, s_B_b, s_B_g, s_B_n, s_C_b, s_C_g, s_C_n,
    s_z_b, s_z_d, s_y_b, s_W_d, s_W_r,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
    A_IS_LOG: tl.constexpr, HAS_DT_PROJ: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid_bg = tl.program_id(0)
    pid_d = tl.program_id(1)
    # 64-bit offsets: batch * seqlen * dim passes 2**31 at long sequences.
    b = (pid_bg // ngroups).to(tl.int64)
    g = pid_bg % ngroups
    offs_dg = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_dg < dim_per_group
    offs_d = g * dim_per_group + offs_dg
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]

    h_ptrs = state_ptr + b * s_h_b + offs_d[:, None] * s_h_d + offs_n[None, :] * s_h_n
    h = tl.load(h_ptrs, mask=mask_dn, other=0.0).to(ACC)
    x = tl.load(x_ptr + b * s_x_b + offs_d * s_x_d, mask=mask_d, other=0.0).to(ACC)
    if HAS_DT_PROJ:
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < dt_rank
        dt_low = tl.load(dt_ptr + b * s_dt_b + offs_r * s_dt_d, mask=mask_r, other=0.0).to(ACC)
        W = tl.load(
            W_ptr + offs_d[:, None] * s_W_d + offs_r[None, :] * s_W_r,
            mask=mask_d[:, None] & mask_r[None, :],
            other=0.0,
        ).to(ACC)
        delta = tl.sum(W * dt_low[None, :], axis=1)
    else:
        delta = tl.load(dt_ptr + b * s_dt_b + offs_d * s_dt_d, mask=mask_d, other=0.0).to(ACC)
    if HAS_DT_BIAS:
        delta += tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    if DT_SOFTPLUS:
        delta = _softplus(delta)
    A = tl.load(A_ptr + offs_d[:, None] * s_A_d + offs_n[None, :] * s_A_n, mask=mask_dn, other=0.0).to(ACC)
    if A_IS_LOG:
        A = -tl.exp(A)
    Bv = tl.load(B_ptr + b * s_B_b + g * s_B_g + offs_n * s_B_n, mask=mask_n, other=0.0).to(ACC)
    Cv = tl.load(C_ptr + b * s_C_b + g * s_C_g + offs_n * s_C_n, mask=mask_n, other=0.0).to(ACC)

    h = tl.exp(delta[:, None] * A) * h + (delta * x)[:, None] * Bv[None, :]
    tl.store(h_ptrs, h.to(state_ptr.dtype.element_ty), mask=mask_dn)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC) * x
    if HAS_Z:
        z = tl.load(z_ptr + b * s_z_b + offs_d * s_z_d, mask=mask_d, other=0.0).to(ACC)
        y *= z / (1.0 + tl.exp(-z))
    tl.store(y_ptr + b * s_y_b + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


def _state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],  # noqa: UP045
    z: Optional[torch.Tensor],  # noqa: UP045
    dt_bias: Optional[torch.Tensor],  # noqa: UP045
    dt_softplus: bool,
    A_is_log: bool = False,
    dt_proj_weight: Optional[torch.Tensor] = None,  # noqa: UP045
) -> torch.Tensor:
    batch, dim, dstate = state.shape
    ngroups = B.shape[1]
    dim_per_group = dim // ngroups
    acc = tl.float64 if torch.float64 in (state.dtype, x.dtype) else tl.float32
    y = torch.empty((batch, dim), dtype=x.dtype, device=x.device)
    block_n = next_power_of_2(dstate)
    W = dt_proj_weight
    dt_rank = 0 if W is None else W.shape[1]
    block_r = next_power_of_2(max(dt_rank, 1))
    # a program holds a (BLOCK_D, dstate) state tile and, with dt_proj, a (BLOCK_D, dt_rank) weight tile
    block_d = min(next_power_of_2(dim_per_group), max(1, 4096 // max(block_n, block_r)), 64)
    grid = (batch * ngroups, triton.cdiv(dim_per_group, block_d))
    zz = z if z is not None else x
    Wp = W if W is not None else x
    _state_update_kernel[grid](
        state, x, dt, A, B, C, D if D is not None else x, zz, dt_bias if dt_bias is not None else x, Wp, y,
        dim, dstate, dim_per_group, ngroups, dt_rank,
        state.stride(0), state.stride(1), state.stride(2), x.stride(0), x.stride(1),
        dt.stride(0), dt.stride(1), A.stride(0), A.stride(1), B.stride(0), B.stride(1), B.stride(2),
        C.stride(0), C.stride(1), C.stride(2), zz.stride(0), zz.stride(1), y.stride(0),
        Wp.stride(0), Wp.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None,
        DT_SOFTPLUS=bool(dt_softplus), A_IS_LOG=bool(A_is_log), HAS_DT_PROJ=W is not None,
        ACC=acc, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_R=block_r,
        num_warps=4,
    )  # fmt: skip
    return y


# A custom op that declares its in-place write, so torch.compile (and CUDA graph capture through it) treat
# the state update as one opaque, mutating node.
_state_update_op = torch.library.custom_op("mambakit::selective_state_update", mutates_args=("state",))(
    _state_update
)


@_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, A_is_log=False, dt_proj_weight=None):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def selective_state_update_impl(
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
    A_is_log: bool = False,
    dt_proj_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton backend of `mambakit.ops.selective_state_update` (arguments already checked).

    state (batch, dim, dstate) is updated in place (any strides); returns y (batch, dim) in x's dtype.
    """
    return _state_update_op(
        state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), bool(A_is_log), dt_proj_weight
    )
