"""Triton kernels of the causal depthwise conv1d: forward, backward and the one-token update.

Layout is the public one, x (batch, seqlen, dim) with dim contiguous, so every kernel works on
(BLOCK_L, BLOCK_D) tiles: rows along the sequence, columns along channels. The `width` taps are shifted
reloads of the same tile; all but one hit cache, so the forward moves each byte of x and out once.
Positions before 0 read `initial_state` (batch, dim, width - 1); with seq_idx a tap whose source lies
in another document than its output reads zero (the state positions belong to the row's first document).

Loads are masked by position only and document masks are applied afterwards.

The backward with SiLU runs in two launches: the forward kernel turns dout into g = dout * silu'(pre)
(float32), then the backward kernel treats g as the output gradient of a conv without activation. One
launch that recomputed the pre-activation at each of the width shifted rows took ~4x the instructions.
"""

import triton
import triton.language as tl

# fmt: off


@triton.jit
def _doc_of(seq_row_ptr, stride_sl, pos, seqlen, doc0):
    """Document ids of positions `pos`; positions < 0 are the state, which belongs to the first document."""
    d = tl.load(seq_row_ptr + pos * stride_sl, mask=(pos >= 0) & (pos < seqlen), other=0)
    return tl.where(pos >= 0, d, doc0)


@triton.jit
def _load_x(x_row_ptr, init_row_ptr, pos, cols, col_ok, seqlen, stride_xl, stride_xd, stride_id, stride_ik,
            WIDTH: tl.constexpr, READ_STATE: tl.constexpr, ACC: tl.constexpr):
    """Inputs at positions `pos` (BLOCK_L,) x `cols` (BLOCK_D,): x inside [0, seqlen), the state at
    [1 - width, 0) when READ_STATE, zero elsewhere."""
    in_x = (pos >= 0) & (pos < seqlen)
    v = tl.load(x_row_ptr + pos[:, None] * stride_xl + cols[None, :] * stride_xd,
                mask=in_x[:, None] & col_ok[None, :], other=0.0).to(ACC)
    if READ_STATE:
        in_s = (pos < 0) & (pos >= 1 - WIDTH)
        v += tl.load(init_row_ptr + (pos + WIDTH - 1)[:, None] * stride_ik + cols[None, :] * stride_id,
                     mask=in_s[:, None] & col_ok[None, :], other=0.0).to(ACC)
    return v


@triton.jit
def _preact(x_row_ptr, init_row_ptr, seq_row_ptr, w_ptr, b_ptr, base, cols, col_ok, seqlen, doc_rows, doc0,
            stride_xl, stride_xd, stride_id, stride_ik, stride_sl, stride_wd, stride_wk,
            WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr,
            READ_STATE: tl.constexpr, ACC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pre-activation at rows `base` (BLOCK_L, BLOCK_D): bias + sum_k w_k * x[row - (width-1) + k],
    taps from other documents zeroed. Rows outside [0, seqlen) give values the caller masks."""
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    for k in tl.static_range(WIDTH):
        src = base + (k - (WIDTH - 1))
        tap = _load_x(x_row_ptr, init_row_ptr, src, cols, col_ok, seqlen, stride_xl, stride_xd, stride_id,
                      stride_ik, WIDTH, READ_STATE, ACC)
        if HAS_SEQ:
            same = _doc_of(seq_row_ptr, stride_sl, src, seqlen, doc0) == doc_rows
            tap = tl.where(same[:, None], tap, 0.0)
        w_k = tl.load(w_ptr + cols * stride_wd + k * stride_wk, mask=col_ok, other=0.0).to(ACC)
        acc += tap * w_k[None, :]
    return acc


@triton.jit
def conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, out_ptr, final_ptr, dout_ptr,
    seqlen, dim,
    stride_xb, stride_xl, stride_xd, stride_wd, stride_wk, stride_ib, stride_id, stride_ik,
    stride_sb, stride_sl, stride_ob, stride_ol, stride_od, stride_fb, stride_fd, stride_fk,
    stride_gb, stride_gl, stride_gd,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
    SILU: tl.constexpr, STORE_FINAL: tl.constexpr, SILU_GRAD: tl.constexpr, ACC: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = act(pre-activation); with SILU_GRAD instead out = dout * silu'(pre-activation), the
    gradient at the conv's output that the backward then treats as a conv without activation."""
    pid_l = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen
    col_ok = cols < dim
    x_row_ptr = x_ptr + b * stride_xb
    init_row_ptr = init_ptr + b * stride_ib
    seq_row_ptr = seq_ptr + b * stride_sb
    doc0 = 0
    doc_rows = rows
    if HAS_SEQ:
        doc0 = tl.load(seq_row_ptr)
        doc_rows = tl.load(seq_row_ptr + rows * stride_sl, mask=row_ok, other=0)

    # only the first row block can reach the state: the others run without those loads
    reads_state = False
    if HAS_INIT:
        reads_state = pid_l * BLOCK_L < WIDTH - 1
    if reads_state:
        acc = _preact(
            x_row_ptr, init_row_ptr, seq_row_ptr, w_ptr, b_ptr, rows, cols, col_ok, seqlen, doc_rows, doc0,
            stride_xl, stride_xd, stride_id, stride_ik, stride_sl, stride_wd, stride_wk,
            WIDTH, HAS_BIAS, HAS_SEQ, True, ACC, BLOCK_L, BLOCK_D)
    else:
        acc = _preact(
            x_row_ptr, init_row_ptr, seq_row_ptr, w_ptr, b_ptr, rows, cols, col_ok, seqlen, doc_rows, doc0,
            stride_xl, stride_xd, stride_id, stride_ik, stride_sl, stride_wd, stride_wk,
            WIDTH, HAS_BIAS, HAS_SEQ, False, ACC, BLOCK_L, BLOCK_D)
    if SILU_GRAD:
        dy = tl.load(dout_ptr + b * stride_gb + rows[:, None] * stride_gl + cols[None, :] * stride_gd,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
        sig = 1.0 / (1.0 + tl.exp(-acc))
        acc = dy * sig * (1.0 + acc * (1.0 - sig))
    elif SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(out_ptr + b * stride_ob + rows[:, None] * stride_ol + cols[None, :] * stride_od,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    if STORE_FINAL:
        # the block holding the last row writes the state: the last width-1 inputs, zero where they
        # belong to an earlier document than the last one
        if (pid_l + 1) * BLOCK_L >= seqlen:
            doc_last = doc0
            if HAS_SEQ:
                doc_last = tl.load(seq_row_ptr + (seqlen - 1) * stride_sl)
            for j in tl.static_range(WIDTH - 1):
                # the position as a vector over channels keeps every mask a plain (BLOCK_D,) tensor
                pos = seqlen - (WIDTH - 1) + j + cols * 0
                ok = col_ok
                if HAS_SEQ:
                    ok = ok & (_doc_of(seq_row_ptr, stride_sl, pos, seqlen, doc0) == doc_last)
                v = tl.load(x_row_ptr + pos * stride_xl + cols * stride_xd, mask=ok & (pos >= 0), other=0.0)
                if HAS_INIT:
                    v += tl.load(init_row_ptr + (pos + WIDTH - 1) * stride_ik + cols * stride_id,
                                 mask=ok & (pos < 0), other=0.0)
                tl.store(final_ptr + b * stride_fb + cols * stride_fd + j * stride_fk,
                         v.to(final_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _bwd_block(
    x_row_ptr, init_row_ptr, seq_row_ptr, w_ptr, b_ptr, dout_row_ptr, dfinal_row_ptr, dx_row_ptr,
    dinit_row_ptr, s, cols, col_ok, seqlen, doc0, doc_last, dw, db, dw0, dw1, dw2, dw3, db_t,
    stride_xl, stride_xd, stride_id, stride_ik, stride_sl, stride_wd, stride_wk, stride_gl, stride_gd,
    stride_fd, stride_fk, stride_dxl, stride_dxd, stride_did, stride_dik,
    WIDTH: tl.constexpr, BLOCK_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_DFINAL: tl.constexpr, READ_STATE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradients for input positions `s` (BLOCK_L,): stores dx (and dstate for s < 0) and adds this
    block's dweight and dbias contributions to the accumulators it returns.

    Width <= 4: the products stay elementwise in the (BLOCK_L, BLOCK_D) tiles dw0..dw3 (tap k) and
    db_t, summed over rows once per program by the caller: a sum over rows crosses warps (shared
    memory and barriers), and doing it at every row block made the backward ~25x slower than the
    forward. Wider kernels sum each block into dw (BLOCK_W, BLOCK_D) and db (BLOCK_D,) directly."""
    s_ok = s < seqlen
    doc_s = s
    if HAS_SEQ:
        doc_s = _doc_of(seq_row_ptr, stride_sl, s, seqlen, doc0)
    x_s = _load_x(x_row_ptr, init_row_ptr, s, cols, col_ok, seqlen, stride_xl, stride_xd, stride_id,
                  stride_ik, WIDTH, READ_STATE, ACC)
    kidx = tl.arange(0, BLOCK_W)
    dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC)
    for m in tl.static_range(WIDTH):
        # output r = s + m reads input s through tap k = width-1-m
        k = WIDTH - 1 - m
        r = s + m
        r_ok = s_ok & (r >= 0) & (r < seqlen)
        doc_r = r
        if HAS_SEQ:
            doc_r = _doc_of(seq_row_ptr, stride_sl, r, seqlen, doc0)
            r_ok = r_ok & (doc_r == doc_s)
        dy = tl.load(dout_row_ptr + r[:, None] * stride_gl + cols[None, :] * stride_gd,
                     mask=r_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
        w_k = tl.load(w_ptr + cols * stride_wd + k * stride_wk, mask=col_ok, other=0.0).to(ACC)
        dx += dy * w_k[None, :]
        if WIDTH <= 4:
            if k == 0:
                dw0 += dy * x_s
            if k == 1:
                dw1 += dy * x_s
            if k == 2:
                dw2 += dy * x_s
            if k == 3:
                dw3 += dy * x_s
            if m == 0:
                db_t += dy
        else:
            dw += tl.where(kidx[:, None] == k, tl.sum(dy * x_s, axis=0)[None, :], 0.0)
            if m == 0:
                db += tl.sum(dy, axis=0)
    if HAS_DFINAL:
        # the final state is the last width-1 inputs (those of the last document)
        j = s - (seqlen - (WIDTH - 1))
        f_ok = s_ok & (j >= 0)
        if HAS_SEQ:
            f_ok = f_ok & (doc_s == doc_last)
        dx += tl.load(dfinal_row_ptr + cols[None, :] * stride_fd + j[:, None] * stride_fk,
                      mask=f_ok[:, None] & col_ok[None, :], other=0.0).to(ACC)
    tl.store(dx_row_ptr + s[:, None] * stride_dxl + cols[None, :] * stride_dxd,
             dx.to(dx_row_ptr.dtype.element_ty), mask=(s_ok & (s >= 0))[:, None] & col_ok[None, :])
    if READ_STATE:
        in_state = (s < 0) & (s >= 1 - WIDTH)
        tl.store(dinit_row_ptr + (s + WIDTH - 1)[:, None] * stride_dik + cols[None, :] * stride_did,
                 dx.to(dinit_row_ptr.dtype.element_ty), mask=in_state[:, None] & col_ok[None, :])
    return dw, db, dw0, dw1, dw2, dw3, db_t


@triton.jit
def conv_bwd_kernel(
    x_ptr, w_ptr, b_ptr, init_ptr, seq_ptr, dout_ptr, dfinal_ptr,
    dx_ptr, dinit_ptr, dw_part_ptr, db_part_ptr,
    seqlen, dim, ext_start, iters,
    stride_xb, stride_xl, stride_xd, stride_wd, stride_wk, stride_ib, stride_id, stride_ik,
    stride_sb, stride_sl, stride_gb, stride_gl, stride_gd, stride_fb, stride_fd, stride_fk,
    stride_dxb, stride_dxl, stride_dxd, stride_dib, stride_did, stride_dik,
    WIDTH: tl.constexpr, BLOCK_W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_DFINAL: tl.constexpr, ACC: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The backward of a conv without activation (with SiLU, dout is already g, see the module
    docstring). Each program owns `iters` consecutive row blocks of one (batch, channel block), over the input
    positions s in [ext_start, seqlen) (ext_start = 1 - width when the state needs a gradient).

    For input s and output r = s + m (tap k = width-1-m), when s and r share a document:
        dx_s += w_k * dy_r        dw_k += dy_r * x_s
    dweight and dbias leave as one partial sum per program,
    summed by the caller (deterministic, no atomics).
    """
    pid_c = tl.program_id(0)
    b = tl.program_id(2)
    part = (b * tl.num_programs(0) + pid_c).to(tl.int64)
    b = b.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    kidx = tl.arange(0, BLOCK_W)
    x_row_ptr = x_ptr + b * stride_xb
    init_row_ptr = init_ptr + b * stride_ib
    seq_row_ptr = seq_ptr + b * stride_sb
    dout_row_ptr = dout_ptr + b * stride_gb
    dfinal_row_ptr = dfinal_ptr + b * stride_fb
    dx_row_ptr = dx_ptr + b * stride_dxb
    dinit_row_ptr = dinit_ptr + b * stride_dib
    doc0 = 0
    doc_last = 0
    if HAS_SEQ:
        doc0 = tl.load(seq_row_ptr)
        doc_last = tl.load(seq_row_ptr + (seqlen - 1) * stride_sl)
    dw_acc = tl.zeros((BLOCK_W, BLOCK_D), dtype=ACC)
    db_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    # elementwise partials of width <= 4 (see _bwd_block); unused ones are dead code
    dw0 = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC)
    dw1 = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC)
    dw2 = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC)
    dw3 = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC)
    db_t = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC)

    for it in range(iters):
        first = ext_start + (pid_c * iters + it) * BLOCK_L
        s = first + tl.arange(0, BLOCK_L)
        # only blocks that start below position width-1 touch the state: the rest run without it
        reads_state = False
        if HAS_INIT:
            reads_state = first < WIDTH - 1
        if reads_state:
            dw_acc, db_acc, dw0, dw1, dw2, dw3, db_t = _bwd_block(
                x_row_ptr, init_row_ptr, seq_row_ptr, w_ptr, b_ptr, dout_row_ptr, dfinal_row_ptr, dx_row_ptr,
                dinit_row_ptr, s, cols, col_ok, seqlen, doc0, doc_last, dw_acc, db_acc, dw0, dw1, dw2, dw3,
                db_t, stride_xl, stride_xd, stride_id, stride_ik, stride_sl, stride_wd, stride_wk, stride_gl,
                stride_gd, stride_fd, stride_fk, stride_dxl, stride_dxd, stride_did, stride_dik,
                WIDTH, BLOCK_W, HAS_BIAS, HAS_INIT, HAS_SEQ, HAS_DFINAL, True, ACC, BLOCK_L, BLOCK_D)
        else:
            dw_acc, db_acc, dw0, dw1, dw2, dw3, db_t = _bwd_block(
                x_row_ptr, init_row_ptr, seq_row_ptr, w_ptr, b_ptr, dout_row_ptr, dfinal_row_ptr, dx_row_ptr,
                dinit_row_ptr, s, cols, col_ok, seqlen, doc0, doc_last, dw_acc, db_acc, dw0, dw1, dw2, dw3,
                db_t, stride_xl, stride_xd, stride_id, stride_ik, stride_sl, stride_wd, stride_wk, stride_gl,
                stride_gd, stride_fd, stride_fk, stride_dxl, stride_dxd, stride_did, stride_dik,
                WIDTH, BLOCK_W, HAS_BIAS, HAS_INIT, HAS_SEQ, HAS_DFINAL, False, ACC, BLOCK_L, BLOCK_D)

    if WIDTH <= 4:
        dw_acc = tl.where(kidx[:, None] == 0, tl.sum(dw0, axis=0)[None, :], 0.0)
        if WIDTH > 1:
            dw_acc += tl.where(kidx[:, None] == 1, tl.sum(dw1, axis=0)[None, :], 0.0)
        if WIDTH > 2:
            dw_acc += tl.where(kidx[:, None] == 2, tl.sum(dw2, axis=0)[None, :], 0.0)
        if WIDTH > 3:
            dw_acc += tl.where(kidx[:, None] == 3, tl.sum(dw3, axis=0)[None, :], 0.0)
        db_acc = tl.sum(db_t, axis=0)
    tl.store(dw_part_ptr + part * BLOCK_W * dim + kidx[:, None] * dim + cols[None, :], dw_acc,
             mask=(kidx[:, None] < WIDTH) & col_ok[None, :])
    if HAS_BIAS:
        tl.store(db_part_ptr + part * dim + cols, db_acc, mask=col_ok)


@triton.jit
def conv_update_kernel(
    x_ptr, state_ptr, w_ptr, b_ptr, out_ptr,
    dim,
    stride_xb, stride_xd, stride_sb, stride_sd, stride_sk, stride_wd, stride_wk, stride_ob, stride_od,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One token: window = [state (width-1 columns), x]; out = act(bias + window . w); state <- window[1:]."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    s_ptr = state_ptr + b * stride_sb + cols * stride_sd
    x_new = tl.load(x_ptr + b * stride_xb + cols * stride_xd, mask=col_ok, other=0.0).to(ACC)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    for k in tl.static_range(WIDTH):
        if k < WIDTH - 1:
            v = tl.load(s_ptr + k * stride_sk, mask=col_ok, other=0.0).to(ACC)
        else:
            v = x_new
        acc += v * tl.load(w_ptr + cols * stride_wd + k * stride_wk, mask=col_ok, other=0.0).to(ACC)
        if k > 0:
            # every program reads its own columns before writing them, so the shift is race-free
            tl.store(s_ptr + (k - 1) * stride_sk, v.to(state_ptr.dtype.element_ty), mask=col_ok)
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(out_ptr + b * stride_ob + cols * stride_od, acc.to(out_ptr.dtype.element_ty), mask=col_ok)
