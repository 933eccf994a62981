"""Chunked SSD in plain PyTorch (Mamba-2 paper, section 6): matmuls inside chunks, a short scan across.

The sequence is cut into chunks of `chunk_size` positions. Inside a chunk the map is the quadratic
(masked attention) form; across chunks only the (headdim, dstate) state is carried, by a scan over
chunks. Four steps, in the order of the paper's "minimal SSD":
  1. diagonal blocks: y_t += sum_{s<=t in chunk} (C_t . B_s) exp(acs_t - acs_s) delta_s x_s
  2. chunk states: what each chunk alone adds to the state at its end
  3. inter-chunk scan: state entering chunk c = decay(c-1) * state entering c-1 + chunk state (c-1)
  4. off-diagonal blocks: y_t += exp(acs_t) C_t . (state entering t's chunk)
where acs is the running sum of delta*A inside the chunk. Autograd is PyTorch's. Inputs are upcast to
float32 (float64 stays float64); y is returned in x's dtype.

seq_idx: positions of different documents are masked inside a chunk, and the carried state is
dropped where the document changes. cu_seqlens: each sequence is laid out from a chunk boundary and
padded to whole chunks, so no chunk spans two sequences; each sequence's first chunk starts from its
own initial state and its last chunk's end state is its final state. That costs up to chunk_size - 1
padded positions per sequence (cheap for long sequences, wasteful for many very short ones).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mambakit.ops._scratch import scratch
from mambakit.ops.ssd import reference
from mambakit.ops.ssd.reference import compute_dtype, gate, process_dt, skip

__all__ = ["ssd_impl", "ssd_state_update_impl"]

# exp(v) = exp2(v * log2(e))
_LOG2E = 1.0 / math.log(2.0)
# On CPU, chunks longer than this are cut to it (the result does not depend on chunk_size beyond
# rounding). At the mamba2-130m layer shape (1, L, 24, 64, 128), fp32, one thread, CPU ms (min of 4),
# with the exp2 decays: forward L=1024: chunk 256 -> 53, 128 -> 37, 64 -> 30, 32 -> 33;
# forward+backward L=256: 256 -> 41, 128 -> 26, 64 -> 29, 32 -> 34. The (Q, Q) blocks cost O(L * Q)
# work and memory traffic, while the presets' 256 is tuned for GPU tiles.
CPU_MAX_CHUNK = 64
# Forward-only decays exp2(d) take d >= this (float32): a decay below 2**-100 is kept at 2**-100, so no
# product with it lands among the subnormals, on which CPUs slow down many times. At the 130M layer
# shape with delta ~ 0.7 (a trained model's larger steps), an SSD call took 41 ms against 9 ms with
# the CPU flushing subnormals (2 threads), most of it in the chunk-state and diagonal products. The
# change is below 2**-100 absolutely, far under float32 rounding of outputs of order 1e-7 and up.
EXP2_FLOOR = -100.0


def _floor_exponent(d: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """A forward-only decay exponent d (base 2) clamped at EXP2_FLOOR; float64, whose subnormals start
    at 2**-1022, is returned as it is. in_place clamps d itself (a fresh tensor of the caller's)."""
    if d.dtype == torch.float64:
        return d
    return d.clamp_min_(EXP2_FLOOR) if in_place else torch.clamp_min(d, EXP2_FLOOR)


def _exp2_decay(d: torch.Tensor, grad: bool) -> torch.Tensor:
    """exp2(d) of a decay exponent d <= 0, floored (`_floor_exponent`) when nothing differentiates;
    autograd keeps the exact value."""
    return torch.exp2(d if grad else _floor_exponent(d))


def _chunk_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk: int,
    h0: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    chunk_init: tuple[torch.Tensor, list[int]] | None,
    save_after: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The four steps on a sequence whose length is a multiple of `chunk`.

    x (b, L, h, p); delta (b, L, h) (zero on padding); A (h,); B, C (b, L, g, n); h0 (b, h, p, n);
    seq_idx (b, L); chunk_init = (states (k, h, p, n), first) where first[c] = k makes chunk c
    start from states[k] (first[c] = -1: carry on). Returns y (b, L, h, p) before the D skip and
    the states after the chunks listed in `save_after`, stacked (b, len(save_after), h, p, n).
    """
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    c, Q, r = L // chunk, chunk, h // g
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, delta, A, B, C, h0))
    # time-major layouts (b, c, Q, ...) as the inputs come, so the big matmuls need no copies.
    # acs is kept in base 2 (delta * A * log2(e)) so that every decay is an exp2: PyTorch's CPU exp2
    # is several times faster than exp on float32 (same values up to rounding).
    acs = (delta * (A * _LOG2E)).view(b, c, Q, h).cumsum(2)  # (b, c, Q, h)
    acs_hq = acs.transpose(2, 3)  # (b, c, h, Q)
    # forward only, the large temporaries live in per-thread scratch (no page faults: ops/_scratch.py)
    if grad:
        xdt = (x * delta[..., None]).view(b, c, Q, h, p)
    else:
        xdt = torch.mul(x, delta[..., None], out=scratch("ssd_xdt", (b, L, h, p), x.dtype, x.device)).view(
            b, c, Q, h, p
        )
    Bg = B.view(b, c, Q, g, n).transpose(2, 3)  # (b, c, g, Q, n)
    Cg = C.view(b, c, Q, g, n).transpose(2, 3)
    if seq_idx is not None:
        doc = seq_idx.view(b, c, Q)
        # the document of the state entering each chunk: that of the previous chunk's last position
        doc_in = torch.cat([doc[:, :1, 0], doc[:, :-1, -1]], dim=1)  # (b, c)

    # 1. diagonal blocks; the mask goes in before exp so that s > t never yields exp(+large)
    mask = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    if seq_idx is not None:
        mask = (mask & (doc[..., :, None] == doc[..., None, :]))[:, :, None]  # (b, c, 1, Q, Q)
    # in place on the fresh difference tensor: (b, c, h, Q, Q) is the largest tensor here
    diff_out = None if grad else scratch("ssd_decay", (b, c, h, Q, Q), x.dtype, x.device)
    decay_ts = torch.sub(acs_hq[..., :, None], acs_hq[..., None, :], out=diff_out)
    if grad or seq_idx is not None:
        decay_ts = decay_ts.masked_fill_(~mask, -math.inf).exp2_()
    else:  # same values: exp2 first, then zero s > t (a possible inf there is overwritten); 2x faster
        # floored (see EXP2_FLOOR); s > t (positive) is zeroed by the tril anyway
        decay_ts = _floor_exponent(decay_ts, in_place=True).exp2_().tril_()
    CB = Cg @ Bg.transpose(-1, -2)  # (b, c, g, Q, Q), shared by the heads of a group
    if grad:  # exp2's backward needs its output
        scores = decay_ts.view(b, c, g, r, Q, Q) * CB[:, :, :, None]
    else:
        scores = decay_ts.view(b, c, g, r, Q, Q).mul_(CB[:, :, :, None])
    scores = scores.view(b, c, h, Q, Q)
    y_diag_out = None if grad else scratch("ssd_y_diag", (b, c, h, Q, p), x.dtype, x.device)
    y_diag = torch.matmul(scores, xdt.transpose(2, 3), out=y_diag_out)  # (b, c, h, Q, p)

    # 2. each chunk's own contribution to the state at its end
    decay_to_end = _exp2_decay(acs[:, :, -1:] - acs, grad)  # (b, c, Q, h)
    if seq_idx is not None:
        decay_to_end = decay_to_end * (doc == doc[..., -1:]).to(x.dtype)[..., None]
    # forward only: xdt is not read again, so it is weighted in place (one fresh 4 * L * h * p byte
    # tensor less: on CPU fresh large tensors cost page faults comparable to the arithmetic)
    xw = xdt.mul_(decay_to_end[..., None]) if not grad else xdt * decay_to_end[..., None]
    xw = xw.view(b, c, Q, g, r * p).permute(0, 1, 3, 4, 2)  # (b, c, g, rp, Q)
    states_out = None if grad else scratch("ssd_states", (b, c, g, r * p, n), x.dtype, x.device)
    states = torch.matmul(xw, Bg, out=states_out).view(b, c, h, p, n)

    # 3. scan over chunks: O(c) small elementwise ops
    chunk_decay = _exp2_decay(acs[:, :, -1], grad)  # (b, c, h)
    if seq_idx is not None:
        chunk_decay = chunk_decay * (doc[..., -1] == doc_in).to(x.dtype)[..., None]
    state = h0 if h0 is not None else x.new_zeros(b, h, p, n)
    decay_in = _exp2_decay(acs, grad)  # (b, c, Q, h)
    if seq_idx is not None:
        decay_in = decay_in * (doc == doc_in[..., None]).to(x.dtype)[..., None]

    def read_out(Cc: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
        """Cc (b, k, g, Q, n), entering states ent (b, k, h, p, n) -> (b, k, Q, h, p)."""
        k = Cc.shape[1]
        dst = None if grad else scratch("ssd_read_out", (b, k, g, Q, r * p), x.dtype, x.device)
        out = torch.matmul(Cc, ent.reshape(b, k, g, r * p, n).transpose(-1, -2), out=dst)  # (b, k, g, Q, rp)
        return out.view(b, k, g, Q, r, p).transpose(2, 3).reshape(b, k, Q, h, p)

    if not grad and chunk_init is None:
        # Forward only: the state after each chunk overwrites `states` in place and the readout of
        # chunks 1.. reads it shifted by one, so the (b, c, h, p, n) stack of entering states (a fresh
        # 12.6 MB per mamba2-130m layer at seqlen 1024) is never built.
        h_first = state
        for ci in range(c):
            state = states[:, ci].addcmul_(chunk_decay[:, ci, :, None, None], state)
        # 4. (as below) off-diagonal blocks: chunk 0 reads h0, chunk ci >= 1 the state after ci - 1
        y = torch.empty(b, c, Q, h, p, dtype=x.dtype, device=x.device)
        y_diag_t = y_diag.transpose(2, 3)
        y_first = read_out(Cg[:, :1], h_first[:, None])
        torch.addcmul(y_diag_t[:, :1], y_first, decay_in[:, :1, ..., None], out=y[:, :1])
        if c > 1:
            y_rest = read_out(Cg[:, 1:], states[:, :-1])
            torch.addcmul(y_diag_t[:, 1:], y_rest, decay_in[:, 1:, ..., None], out=y[:, 1:])
        return y.reshape(b, L, h, p), states[:, save_after]

    entering, saved, save = [], [], set(save_after)
    for ci in range(c):
        if chunk_init is not None and chunk_init[1][ci] >= 0:
            state = chunk_init[0][chunk_init[1][ci]][None]
        entering.append(state)
        state = torch.addcmul(states[:, ci], chunk_decay[:, ci, :, None, None], state)
        if ci in save:
            saved.append(state)
    entering = torch.stack(entering, dim=1)  # (b, c, h, p, n)

    # 4. off-diagonal blocks: the entering state read out by C, decayed to each position
    y = torch.addcmul(y_diag.transpose(2, 3), read_out(Cg, entering), decay_in[..., None])
    return y.reshape(b, L, h, p), torch.stack(saved, dim=1)


def _pad_time(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad axis 1 (time) by `pad` positions at the end."""
    return F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad)) if pad else t


def _scan_rows(x, delta, A, B, C, chunk, h0, seq_idx):
    """Batched rows (with optional seq_idx): pad to whole chunks, scan, crop."""
    b, L, h, p = x.shape
    if L == 0:  # nothing to scan: the state passes through unchanged
        return x.new_zeros(x.shape), h0 if h0 is not None else x.new_zeros(b, h, p, B.shape[-1])
    chunk = min(chunk, L)  # one chunk either way; do not pad a short sequence up to chunk_size
    pad = -L % chunk
    if pad and seq_idx is not None:
        # padding continues the last document, so the final state is that of the last real position
        seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1)
    x, delta, B, C = (_pad_time(t, pad) for t in (x, delta, B, C))
    y, final = _chunk_scan(x, delta, A, B, C, chunk, h0, seq_idx, None, [x.shape[1] // chunk - 1])
    return y[:, :L], final[:, 0]


def _scan_varlen(x, delta, A, B, C, chunk, h0, cu_seqlens):
    """One row of packed sequences: lay each out from a chunk boundary, scan, gather back."""
    L, nheads, headdim = x.shape[1:]
    dev = x.device
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    chunk = min(chunk, int(lengths.max()))
    nchunks = (lengths + chunk - 1) // chunk
    first_chunk = nchunks.cumsum(0) - nchunks
    total = int(nchunks.sum())
    # chunk index -> the sequence that starts there (or -1); each sequence's last chunk
    starts_in_chunk = [-1] * total
    for k, c0 in enumerate(first_chunk.tolist()):
        starts_in_chunk[c0] = k
    last_chunk = (first_chunk + nchunks - 1).tolist()
    # where each packed position goes in the padded layout
    seq_of = torch.repeat_interleave(torch.arange(len(lengths), device=dev), lengths, output_size=L)
    dst = torch.arange(L, device=dev) + (first_chunk * chunk - starts)[seq_of]

    def spread(t: torch.Tensor) -> torch.Tensor:
        return t.new_zeros(1, total * chunk, *t.shape[2:]).index_copy(1, dst, t)

    if h0 is None:
        h0 = x.new_zeros(len(lengths), nheads, headdim, B.shape[-1])
    xp, deltap, Bp, Cp = spread(x), spread(delta), spread(B), spread(C)
    y, finals = _chunk_scan(xp, deltap, A, Bp, Cp, chunk, None, None, (h0, starts_in_chunk), last_chunk)
    return y[:, dst], finals[0]


def ssd_state_update_impl(
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
    """One step of the recurrence; writes the new state into `state` (batch, nheads, headdim, dstate).

    x, z (batch, nheads, headdim); dt (batch, nheads); B, C (batch, ngroups, dstate).
    Returns y (batch, nheads, headdim) in x's dtype. The reference's step with fewer, in-place ops:
    the state is viewed as (batch, ngroups, heads_per_group * headdim, dstate) so that each group's
    B and C broadcast over its heads (no `repeat_interleave` copies, no einsum permutes), decayed and
    fed in place, and read out by one batched matmul.
    """
    dtype = compute_dtype(x)
    if (
        state.dtype not in (dtype, torch.float16, torch.bfloat16)
        or not state.is_contiguous()
        or (
            torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (state, x, dt, A, B, C, D, z, dt_bias))
        )
    ):  # in-place updates would overwrite what autograd saves; float64 mixed with float32 is rare
        return reference.ssd_state_update_impl(
            state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, A_is_log
        )
    batch, nheads, headdim, dstate = state.shape
    ngroups = B.shape[1]
    if A_is_log:
        A = -torch.exp(A.to(dtype))
    delta = process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)  # (batch, nheads)
    xs = x.to(dtype)
    h = state if state.dtype == dtype else state.to(dtype)  # half-precision states step in float32
    h.mul_(torch.exp(delta * A.to(dtype))[:, :, None, None])
    hg = h.view(batch, ngroups, -1, dstate)  # (batch, ngroups, heads_per_group * headdim, dstate)
    hg.addcmul_((xs * delta[..., None]).view(batch, ngroups, -1, 1), B.to(dtype)[:, :, None, :])
    y = torch.matmul(hg, C.to(dtype)[:, :, :, None]).view(batch, nheads, headdim)
    if h is not state:
        state.copy_(h)
    if D is not None:
        D = D.to(dtype)
        y = y.addcmul_(xs, D[:, None] if D.ndim == 1 else D)
    return gate(y, z).to(x.dtype)


def ssd_impl(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    initial_state: torch.Tensor | None,
    return_final_state: bool,
    seq_idx: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backend entry (see `mambakit.ops.ssd.ssd` for shapes and math)."""
    dtype = compute_dtype(x)
    if x.device.type == "cpu":
        chunk_size = min(chunk_size, CPU_MAX_CHUNK)
    # padding is applied to delta after processing, so padded steps have delta = 0: no decay, no input
    delta = process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
    xs, As, Bs, Cs = x.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype)
    h0 = None if initial_state is None else initial_state.to(dtype)
    if cu_seqlens is None:
        y, final = _scan_rows(xs, delta, As, Bs, Cs, chunk_size, h0, seq_idx)
    else:
        y, final = _scan_varlen(xs, delta, As, Bs, Cs, chunk_size, h0, cu_seqlens)
    recording = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias, initial_state)
    )
    if D is not None and not recording:  # forward only: the D skip in place on the fresh y
        Ds = D.to(dtype)
        y = y.addcmul_(xs, Ds[:, None] if Ds.ndim == 1 else Ds)
        y = gate(y, z).to(x.dtype)
    else:
        y = gate(skip(y, xs, D), z).to(x.dtype)
    return y, (final if return_final_state else None)
