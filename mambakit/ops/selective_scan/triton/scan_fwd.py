"""Triton forward kernel of the Mamba-1 selective scan: discretization, scan, C contraction, D skip and z gate
fused in one pass over the sequence, with the recurrent state in fp32 registers.

Prediction (anchor: batch 4, dim 4096, dstate 16, ngroups 1, bf16 x/dt/B/C/z, fp32 A/D/dt_bias, L = 8192):
    reads  x, dt, z: 3 * 4*8192*4096 * 2 B = 805.3 MB;  B, C: 2 * 4*8192*16 * 2 B = 2.1 MB;  A, D, dt_bias ~0
    writes y: 4*8192*4096 * 2 B = 268.4 MB
    total ~1.076 GB  ->  floor 0.36 ms at 3.0 TB/s.
    The scan itself is (batch*L*dim*dstate) = 2.1 G state updates, each one exp plus ~6 flops, plus the
    log-depth tile scan: the kernel is compute bound well above the memory floor. Target <= 1.4 ms forward,
    <= 8 ms forward+backward at L = 8192 (official CUDA selective_scan_fn: 2.73 / 13.2 ms).

Layout of the work: one program per (batch, group, block of BLOCK_D channels of that group), so a program
reads a single group's B and C. It walks the sequence in tiles of BLOCK_L steps; inside a tile the linear
recurrence h_t = a_t h_{t-1} + b_t is solved by `tl.associative_scan` over a (BLOCK_L, BLOCK_D, BLOCK_N)
tile with the (decay, value) combine, and the state is carried from tile to tile. Steps past the end of the
sequence get a = 1, b = 0 so the carried state is the state at the last real step. When batch x channel
blocks would leave the GPU idle (small batch, long sequence), the sequence is also split into chunks scanned
in parallel: chunk end states and decays from zero state, a short combine, then a rescan writing y.

Tuning without code changes (the benchmark's sweep prints the best): MAMBAKIT_SCAN_CONFIG and
MAMBAKIT_SCAN_BWD_CONFIG = "BLOCK_L,BLOCK_D,num_warps"; MAMBAKIT_SCAN_SEQ_CHUNKS = number of sequence chunks.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from mambakit.ops._launch import next_power_of_2, sm_count
from mambakit.ops._triton_math import exp_ftz
from mambakit.ops.selective_scan.triton.chunk_combine import combine_chunks
from mambakit.ops.selective_scan.triton.seq_fwd import _softplus, selective_scan_fwd_seq_kernel


@triton.jit
def _linear_combine(a1, b1, a2, b2):
    # (a1, b1) is the earlier segment: applying it then (a2, b2) gives h -> a2 (a1 h + b1) + b2.
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _load_delta(
    dt_ptr, dt_bias, mask_ld, DT_SOFTPLUS: tl.constexpr, HAS_DT_BIAS: tl.constexpr, ACC: tl.constexpr
):
    """delta for a (BLOCK_L, BLOCK_D) tile; zero outside the sequence/channel range (no decay, no input)."""
    dt = tl.load(dt_ptr, mask=mask_ld, other=0.0).to(ACC)
    if HAS_DT_BIAS:
        dt = dt + dt_bias[None, :]
    if DT_SOFTPLUS:
        dt = _softplus(dt)
    return tl.where(mask_ld, dt, 0.0)


@triton.jit
def _selective_scan_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, h0_ptr, seq_idx_ptr,
    y_ptr, hT_ptr, P_ptr,
    seqlen, dim, dstate, dim_per_group, ngroups, nchunks, chunk_len,
    s_x_b, s_x_l, s_dt_b, s_dt_l, s_B_b, s_B_l, s_B_g, s_C_b, s_C_l, s_C_g,
    s_z_b, s_z_l, s_y_b, s_y_l, s_si_b, s_si_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, DT_SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
    WRITE_Y: tl.constexpr, WRITE_DECAY: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_bg = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2)
    # 64-bit offsets: batch * seqlen * dim passes 2**31 at long sequences.
    b = (pid_bg // ngroups).to(tl.int64)
    g = pid_bg % ngroups
    offs_dg = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_dg < dim_per_group
    offs_d = g * dim_per_group + offs_dg
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]
    rows = tl.arange(0, BLOCK_L)

    # Padded (d, n) get A = 0 (decay 1) and B = C = 0, so they never touch real outputs.
    A = tl.load(A_ptr + offs_d[:, None] * dstate + offs_n[None, :], mask=mask_dn, other=0.0).to(ACC)
    dt_bias = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_DT_BIAS:
        dt_bias = tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    Dv = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(ACC)
    # Start/end states and decay products are (batch, nchunks, dim, dstate); one chunk: the whole sequence.
    state_offs = ((b * nchunks + pid_c) * dim + offs_d[:, None]) * dstate + offs_n[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + state_offs, mask=mask_dn, other=0.0).to(ACC)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    decay = tl.full((BLOCK_D, BLOCK_N), 1.0, dtype=ACC)
    l_begin = pid_c * chunk_len
    l_end = tl.minimum(l_begin + chunk_len, seqlen)

    for i in range(0, chunk_len // BLOCK_L):
        offs_l = (l_begin + i * BLOCK_L + rows).to(tl.int64)
        mask_l = offs_l < l_end
        mask_ld = mask_l[:, None] & mask_d[None, :]
        mask_ln = mask_l[:, None] & mask_n[None, :]
        delta = _load_delta(
            dt_ptr + b * s_dt_b + offs_l[:, None] * s_dt_l + offs_d[None, :],
            dt_bias, mask_ld, DT_SOFTPLUS, HAS_DT_BIAS, ACC,
        )  # fmt: skip
        x = tl.load(x_ptr + b * s_x_b + offs_l[:, None] * s_x_l + offs_d[None, :], mask=mask_ld, other=0.0)
        x = x.to(ACC)
        Bt = tl.load(
            B_ptr + b * s_B_b + offs_l[:, None] * s_B_l + g * s_B_g + offs_n[None, :], mask=mask_ln, other=0.0
        )
        Bt = Bt.to(ACC)

        dA = exp_ftz(delta[:, :, None] * A[None, :, :])  # (L, D, N)
        if HAS_SEQ_IDX:
            si_ptr = seq_idx_ptr + b * s_si_b
            cur = tl.load(si_ptr + offs_l * s_si_l, mask=mask_l, other=0)
            prev = tl.load(si_ptr + (offs_l - 1) * s_si_l, mask=mask_l & (offs_l > 0), other=0)
            reset = mask_l & (offs_l > 0) & (cur != prev)
            # A new document starts: the previous state is taken as zero, i.e. its decay is zero.
            dA = tl.where(reset[:, None, None], 0.0, dA)
        dBx = (delta * x)[:, :, None] * Bt[:, None, :]
        acum, bcum = tl.associative_scan((dA, dBx), 0, _linear_combine)
        hs = bcum + acum * h[None, :, :]  # states h_t of the tile, (L, D, N)

        if WRITE_Y:
            Ct = tl.load(
                C_ptr + b * s_C_b + offs_l[:, None] * s_C_l + g * s_C_g + offs_n[None, :],
                mask=mask_ln,
                other=0.0,
            ).to(ACC)
            y = tl.sum(hs * Ct[:, None, :], axis=2)
            if HAS_D:
                y += Dv[None, :] * x
            if HAS_Z:
                z = tl.load(
                    z_ptr + b * s_z_b + offs_l[:, None] * s_z_l + offs_d[None, :], mask=mask_ld, other=0.0
                )
                z = z.to(ACC)
                y *= z / (1.0 + tl.exp(-z))
            tl.store(
                y_ptr + b * s_y_b + offs_l[:, None] * s_y_l + offs_d[None, :],
                y.to(y_ptr.dtype.element_ty),
                mask=mask_ld,
            )
        last = (rows == BLOCK_L - 1)[:, None, None]
        # The last row of the tile is the carried state (padded steps only carry it along).
        h = tl.sum(tl.where(last, hs, 0.0), axis=0)
        if WRITE_DECAY:
            decay *= tl.sum(tl.where(last, acum, 0.0), axis=0)

    tl.store(hT_ptr + state_offs, h.to(hT_ptr.dtype.element_ty), mask=mask_dn)
    if WRITE_DECAY:
        tl.store(P_ptr + state_offs, decay.to(P_ptr.dtype.element_ty), mask=mask_dn)


def _acc_dtype(x: torch.Tensor):
    # float64 inputs (gradcheck) scan in float64; everything else accumulates in float32.
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _last_dim_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    # Kernels take the leading strides as arguments (x and z are often views of one in_proj output) but
    # assume unit stride on the last axis.
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


def default_config(dim_per_group: int, dstate: int) -> tuple[int, int, int]:
    """(BLOCK_L, BLOCK_D, num_warps) for the scan kernels."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 16, 16, 1
    env = os.environ.get("MAMBAKIT_SCAN_CONFIG")
    if env:
        bl, bd, nw = (int(v) for v in env.split(","))
        return bl, bd, nw
    block_n = next_power_of_2(dstate)
    # Keep a (BLOCK_L, BLOCK_D, BLOCK_N) fp32 tile near 32 values per thread and per live tensor.
    block_d = max(1, min(32, 4096 // (16 * block_n), next_power_of_2(dim_per_group)))
    return 16, block_d, 4


def _seq_chunk_override_or_sms(
    x: torch.Tensor, env_name: str = "MAMBAKIT_SCAN_SEQ_CHUNKS"
) -> tuple[int | None, int]:
    """(chunks fixed by the env_name variable or 1 off the GPU, else None; the device's SM count)."""
    env = os.environ.get(env_name)
    if env:
        return max(1, int(env)), 0
    if x.device.type != "cuda":
        return 1, 0
    return None, sm_count(x.device)


def default_seq_chunks(x: torch.Tensor, programs: int, seqlen: int, block_l: int) -> int:
    """Split the sequence into chunks scanned in parallel only when batch x channel blocks leave the GPU
    idle (small batch, long sequence): the split costs a second scan of the sequence."""
    fixed, sms = _seq_chunk_override_or_sms(x)
    if fixed is not None:
        return fixed
    target = 4 * sms
    if programs >= target // 2:
        return 1
    return max(1, min(target // programs, seqlen // (64 * block_l)))


def default_seq_chunks_seq(x: torch.Tensor, warps: int, seqlen: int) -> int:
    """Sequence chunks for the step-loop kernel: one thread per channel leaves an H200 mostly idle at
    batch 4 x dim 4096 (4 warps per multiprocessor; each warp's steps wait on their loads), so the
    sequence is split until about 32 warps per multiprocessor are resident, keeping chunks of at least
    128 steps. Measured at the anchor, L = 8192: 1 chunk 4.8 ms, 2 chunks 4.3, 8 chunks 2.6, 16 chunks 2.6."""
    fixed, sms = _seq_chunk_override_or_sms(x)
    if fixed is not None:
        return fixed
    return max(1, min(round(32 * sms / max(warps, 1)), seqlen // 128))


def selective_scan_fwd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    initial_state: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    config: tuple[int, int, int] | None = None,
    seq_chunks: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Shapes as in `mambakit.ops.selective_scan`; inputs already checked.

    Returns y (batch, seqlen, dim) in x's dtype and the final state (batch, dim, dstate) in float32
    (float64 for float64 inputs).
    """
    x, dt, B, C, z = (_last_dim_contiguous(t) for t in (x, dt, B, C, z))
    batch, seqlen, dim = x.shape
    dstate = A.shape[1]
    ngroups = B.shape[2]
    dim_per_group = dim // ngroups
    acc = _acc_dtype(x)
    state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    y = torch.empty((batch, seqlen, dim), dtype=x.dtype, device=x.device)
    if seqlen == 0:
        h = h0.to(state_dtype) if h0 is not None else torch.zeros(batch, dim, dstate, device=x.device)
        return y, h.to(state_dtype)
    block_l, block_d, num_warps = config or default_config(dim_per_group, dstate)
    block_d = min(block_d, next_power_of_2(dim_per_group))
    programs = batch * ngroups * triton.cdiv(dim_per_group, block_d)
    if kernel_choice() == "seq":
        if os.environ.get("MAMBAKIT_SCAN_BC_FP32", "0") == "1" and B.dtype != torch.float32:
            # Every thread of the step loop reads all of B_t and C_t: converted once here, not per thread.
            B, C = B.float(), C.float()
        seq_bd, seq_nw, _ = seq_config(dim_per_group)
        warps = batch * ngroups * triton.cdiv(dim_per_group, seq_bd) * seq_nw
        nchunks = seq_chunks or default_seq_chunks_seq(x, warps, seqlen)
    else:
        nchunks = seq_chunks or default_seq_chunks(x, programs, seqlen, block_l)
    chunk_len = triton.cdiv(triton.cdiv(seqlen, nchunks), block_l) * block_l
    nchunks = triton.cdiv(seqlen, chunk_len)
    launch = functools.partial(
        _launch, x, dt, A, B, C, D, z, dt_bias, seq_idx, y, dt_softplus, acc, nchunks, chunk_len,
        block_l, block_d, num_warps,
    )  # fmt: skip
    seq = kernel_choice() == "seq"
    if nchunks == 1:
        if not seq:
            hT = torch.empty((batch, dim, dstate), dtype=state_dtype, device=x.device)
            launch(h0, hT, None, write_y=True)
            return y, hT
        hT = torch.empty((batch, 1, dstate, dim), dtype=state_dtype, device=x.device)
        launch(_channel_major(h0), hT, None, write_y=True)
        return y, hT[:, 0].transpose(1, 2).contiguous()
    # Pass 1: every chunk from a zero state gives its end state and its total decay; a short sequential
    # combine over chunks gives every chunk's true start state; pass 2 rescans each chunk writing y.
    starts = chunk_start_states(
        x, dt, A, B, dt_bias, dt_softplus, h0, seq_idx, chunk_len, (block_l, block_d, num_warps),
        channel_major=seq,
    )  # fmt: skip
    ends = torch.empty_like(starts)
    launch(starts, ends, None, write_y=True)
    final = ends[:, -1]
    return y, (final.transpose(1, 2) if seq else final).contiguous()


def _channel_major(state: torch.Tensor | None) -> torch.Tensor | None:
    """A (batch, dim, dstate) state as the step-loop kernel stores states: (batch, dstate, dim)
    contiguous (see `seq_fwd.py`: channels contiguous, so that the state's layout in registers keeps
    each channel's dstate values in one thread)."""
    return None if state is None else state.transpose(-1, -2).contiguous()


def chunk_start_states(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    h0: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    chunk_len: int,
    config: tuple[int, int, int],
    channel_major: bool = False,
    seq_block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The state before each chunk of `chunk_len` steps (a multiple of BLOCK_L), (batch, nchunks, dim,
    dstate) contiguous, or with `channel_major` (batch, nchunks, dstate, dim) contiguous, as the
    step-loop forward reads it: each chunk scanned from zero state gives its end state and total decay in
    parallel, then one kernel walks the (few) chunks in order (`chunk_combine.combine_chunks`).
    seq_block: the step loop's (BLOCK_D, num_warps), as in `_launch`."""
    batch, seqlen, dim = x.shape
    dstate = A.shape[1]
    nchunks = triton.cdiv(seqlen, chunk_len)
    state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    block_l, block_d, num_warps = config
    block_d = min(block_d, next_power_of_2(dim // B.shape[2]))
    seq = kernel_choice() == "seq"
    shape = (batch, nchunks, dstate, dim) if seq else (batch, nchunks, dim, dstate)
    ends = torch.empty(shape, dtype=state_dtype, device=x.device)
    decays = torch.empty_like(ends)
    # The last chunk's end state and decay would feed no other chunk: its programs are not launched.
    _launch(
        x, dt, A, B, B, None, None, dt_bias, seq_idx, x, dt_softplus, _acc_dtype(x), nchunks, chunk_len,
        block_l, block_d, num_warps, None, ends, decays, write_y=False, grid_chunks=nchunks - 1,
        seq_block=seq_block,
    )  # fmt: skip
    starts = combine_chunks(ends, decays, _channel_major(h0) if seq else h0, reverse=False)
    if seq and not channel_major:
        return starts.transpose(-1, -2).contiguous()
    return starts


def kernel_choice() -> str:
    """The forward kernel: "seq" (step loop, `seq_fwd.py`) or "tile" (tile scan, this file); env overrides."""
    return os.environ.get("MAMBAKIT_SCAN_KERNEL", "seq")


def seq_config(dim_per_group: int) -> tuple[int, int, int]:
    """(BLOCK_D, num_warps, num_stages) of the step-loop kernel; MAMBAKIT_SCAN_SEQ_CONFIG overrides."""
    env = os.environ.get("MAMBAKIT_SCAN_SEQ_CONFIG")
    if env:
        bd, nw, ns = (int(v) for v in env.split(","))
        return bd, nw, ns
    if os.environ.get("TRITON_INTERPRET") == "1":
        return 16, 1, 1
    # Four channels a thread on one warp (see seq_fwd.py): each thread's channels share its loads and
    # conversions of B_t and C_t. Fastest at the anchor on an H200 among (32..256 channels, 1..4 warps),
    # side by side in one run (2026-12-01, benchmarks/gpu_scan_variants.py): 128 channels / 1 warp
    # 0.54 / 1.99 ms at L = 2048 / 8192, 64 / 1 0.61 / 2.28, 32 / 1 0.67 / 2.56, 256 / 2 0.55 / 2.06,
    # 128 / 4 1.15 / 4.49 (the previous kernel's best, 64 / 1: 0.59 / 2.23). Fewer where the group is
    # narrower.
    return max(32, min(128, next_power_of_2(dim_per_group))), 1, 1


def _launch(
    x, dt, A, B, C, D, z, dt_bias, seq_idx, y, dt_softplus, acc, nchunks, chunk_len,
    block_l, block_d, num_warps, h0, hT, decays, write_y, ckpt=None, grid_chunks=None, seq_block=None,
):  # fmt: skip
    """One launch of the forward kernel over `nchunks` chunks of `chunk_len` steps (the first
    `grid_chunks` of them, default all). ckpt (step loop only): (buffer, seg, nseg) to store the state at
    every segment start instead of the end state (see `seq_fwd.selective_scan_fwd_seq_kernel`).
    seq_block: (BLOCK_D, num_warps) of the step loop instead of `seq_config`'s."""
    batch, seqlen, dim = x.shape
    dstate = A.shape[1]
    ngroups = B.shape[2]
    dim_per_group = dim // ngroups
    seq = kernel_choice() == "seq" or ckpt is not None
    stages = 1
    if seq:
        block_d, num_warps, stages = seq_config(dim_per_group)
        if seq_block is not None:
            block_d, num_warps = seq_block
        A = A.t().contiguous()  # (dstate, dim), channels contiguous like the states (see _channel_major)
    grid = (batch * ngroups, triton.cdiv(dim_per_group, block_d), grid_chunks or nchunks)
    si = seq_idx if seq_idx is not None else x  # a placeholder pointer; never read without HAS_SEQ_IDX
    args = (
        x, dt, A, B, C, D if D is not None else x, z if z is not None else x,
        dt_bias if dt_bias is not None else x, h0 if h0 is not None else hT, si,
        y, hT, decays if decays is not None else hT,
        *((ckpt[0] if ckpt is not None else hT,) if seq else ()),
        seqlen, dim, dstate, dim_per_group, ngroups, nchunks, chunk_len,
        *((ckpt[2] if ckpt is not None else 0,) if seq else ()),
        x.stride(0), x.stride(1), dt.stride(0), dt.stride(1),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
        y.stride(0), y.stride(1),
        si.stride(0) if seq_idx is not None else 0, si.stride(1) if seq_idx is not None else 0,
    )  # fmt: skip
    flags = dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, HAS_H0=h0 is not None,
        HAS_SEQ_IDX=seq_idx is not None, DT_SOFTPLUS=bool(dt_softplus), ACC=acc,
        WRITE_Y=write_y, WRITE_DECAY=decays is not None,
        BLOCK_D=block_d, BLOCK_N=next_power_of_2(dstate), num_warps=num_warps,
    )  # fmt: skip
    if seq:
        even = dict(EVEN_D=dim_per_group % block_d == 0, EVEN_N=next_power_of_2(dstate) == dstate)
        ckpt_seg = ckpt[1] if ckpt is not None else 0
        selective_scan_fwd_seq_kernel[grid](*args, **flags, **even, NUM_STAGES=stages, CKPT_SEG=ckpt_seg)
    else:
        _selective_scan_fwd_kernel[grid](*args, **flags, BLOCK_L=block_l)
