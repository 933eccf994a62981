"""Triton kernels of the causal depthwise conv1d: forward, backward and the one-token update.

Layout is the public one, x (batch, seqlen, dim) with dim contiguous, so every kernel works on
(BLOCK_L, BLOCK_D) tiles: rows along the sequence, columns along channels. The `width` taps are shifted
reloads of the same tile; all but one hit cache, so the forward moves each byte of x and out once.
Positions before 0 read `initial_state` (batch, dim, width - 1); with seq_idx a tap whose source lies
in another document than its output reads zero (the state positions belong to the row's first document).
"""

import triton
import triton.language as tl


@triton.jit
def _doc_of(seq_row_ptr, stride_sl, pos, valid, doc0):
    """Document id of positions `pos` (any shape); positions < 0 are the state, i.e. the first document."""
    d = tl.load(seq_row_ptr + pos * stride_sl, mask=valid & (pos >= 0), other=0)
    return tl.where(pos >= 0, d, doc0)


@triton.jit
def _load_ext(
    x_row_ptr,
    init_row_ptr,
    pos,
    cols,
    valid,
    col_ok,
    stride_xl,
    stride_xd,
    stride_id,
    stride_ik,
    WIDTH: tl.constexpr,
    HAS_INIT: tl.constexpr,
    ACC: tl.constexpr,
):
    """Inputs at extended positions `pos` (BLOCK_L,) x cols (BLOCK_D,): x for pos >= 0, the state below.
    `valid` (BLOCK_L,) masks rows to zero."""
    m_x = valid & (pos >= 0)
    v = tl.load(
        x_row_ptr + pos[:, None] * stride_xl + cols[None, :] * stride_xd,
        mask=m_x[:, None] & col_ok[None, :],
        other=0.0,
    ).to(ACC)
    if HAS_INIT:
        m_s = valid & (pos < 0)
        v += tl.load(
            init_row_ptr + (pos + WIDTH - 1)[:, None] * stride_ik + cols[None, :] * stride_id,
            mask=m_s[:, None] & col_ok[None, :],
            other=0.0,
        ).to(ACC)
    return v


@triton.jit
def _preact(
    x_row_ptr,
    init_row_ptr,
    seq_row_ptr,
    w_ptr,
    b_ptr,
    rows,
    cols,
    row_ok,
    col_ok,
    doc_rows,
    doc0,
    stride_xl,
    stride_xd,
    stride_id,
    stride_ik,
    stride_sl,
    stride_wd,
    stride_wk,
    WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MAY_READ_STATE,
):
    """Pre-activation outputs at `rows` (BLOCK_L, BLOCK_D); rows outside [0, seqlen) come out as garbage
    the caller masks. `MAY_READ_STATE` (runtime) says whether any tap can reach a position < 0."""
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    for k in tl.static_range(WIDTH):
        src = rows - (WIDTH - 1) + k
        ok = row_ok
        if HAS_SEQ:
            ok = ok & (_doc_of(seq_row_ptr, stride_sl, src, row_ok, doc0) == doc_rows)
        w_k = tl.load(w_ptr + cols * stride_wd + k * stride_wk, mask=col_ok, other=0.0).to(ACC)
        if HAS_INIT and k < WIDTH - 1:
            if MAY_READ_STATE:
                tap = _load_ext(
                    x_row_ptr,
                    init_row_ptr,
                    src,
                    cols,
                    ok,
                    col_ok,
                    stride_xl,
                    stride_xd,
                    stride_id,
                    stride_ik,
                    WIDTH,
                    True,
                    ACC,
                )
            else:
                tap = _load_ext(
                    x_row_ptr,
                    init_row_ptr,
                    src,
                    cols,
                    ok,
                    col_ok,
                    stride_xl,
                    stride_xd,
                    stride_id,
                    stride_ik,
                    WIDTH,
                    False,
                    ACC,
                )
        else:
            tap = _load_ext(
                x_row_ptr,
                init_row_ptr,
                src,
                cols,
                ok,
                col_ok,
                stride_xl,
                stride_xd,
                stride_id,
                stride_ik,
                WIDTH,
                False,
                ACC,
            )
        acc += tap * w_k[None, :]
    return acc


@triton.jit
def conv_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    init_ptr,
    seq_ptr,
    out_ptr,
    final_ptr,
    seqlen,
    dim,
    stride_xb,
    stride_xl,
    stride_xd,
    stride_wd,
    stride_wk,
    stride_ib,
    stride_id,
    stride_ik,
    stride_sb,
    stride_sl,
    stride_ob,
    stride_ol,
    stride_od,
    stride_fb,
    stride_fd,
    stride_fk,
    WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    SILU: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen
    col_ok = cols < dim
    x_row_ptr = x_ptr + b * stride_xb
    init_row_ptr = init_ptr + b * stride_ib
    seq_row_ptr = seq_ptr + b * stride_sb
    doc0 = 0
    doc_rows = rows * 0
    if HAS_SEQ:
        doc0 = tl.load(seq_row_ptr)
        doc_rows = tl.load(seq_row_ptr + rows * stride_sl, mask=row_ok, other=0)

    acc = _preact(
        x_row_ptr,
        init_row_ptr,
        seq_row_ptr,
        w_ptr,
        b_ptr,
        rows,
        cols,
        row_ok,
        col_ok,
        doc_rows,
        doc0,
        stride_xl,
        stride_xd,
        stride_id,
        stride_ik,
        stride_sl,
        stride_wd,
        stride_wk,
        WIDTH,
        HAS_BIAS,
        HAS_INIT,
        HAS_SEQ,
        ACC,
        BLOCK_L,
        BLOCK_D,
        pid_l * BLOCK_L < WIDTH - 1,
    )
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(
        out_ptr + b * stride_ob + rows[:, None] * stride_ol + cols[None, :] * stride_od,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )

    if STORE_FINAL:
        # the block holding the last row writes the state: the last width-1 inputs, zero where they
        # belong to an earlier document than the last one
        if (pid_l + 1) * BLOCK_L >= seqlen:
            doc_last = doc0
            if HAS_SEQ:
                doc_last = tl.load(seq_row_ptr + (seqlen - 1) * stride_sl)
            for j in tl.static_range(WIDTH - 1):
                # the position as a vector over channels keeps every mask below a plain (BLOCK_D,) tensor
                pos = seqlen - (WIDTH - 1) + j + cols * 0
                ok = col_ok
                if HAS_SEQ:
                    ok = ok & (_doc_of(seq_row_ptr, stride_sl, pos, col_ok, doc0) == doc_last)
                v = tl.load(x_row_ptr + pos * stride_xl + cols * stride_xd, mask=ok & (pos >= 0), other=0.0)
                if HAS_INIT:
                    v += tl.load(
                        init_row_ptr + (pos + WIDTH - 1) * stride_ik + cols * stride_id,
                        mask=ok & (pos < 0),
                        other=0.0,
                    )
                tl.store(
                    final_ptr + b * stride_fb + cols * stride_fd + j * stride_fk,
                    v.to(final_ptr.dtype.element_ty),
                    mask=col_ok,
                )


@triton.jit
def conv_bwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    init_ptr,
    seq_ptr,
    dout_ptr,
    dfinal_ptr,
    dx_ptr,
    dinit_ptr,
    dw_part_ptr,
    db_part_ptr,
    seqlen,
    dim,
    ext_start,
    iters,
    stride_xb,
    stride_xl,
    stride_xd,
    stride_wd,
    stride_wk,
    stride_ib,
    stride_id,
    stride_ik,
    stride_sb,
    stride_sl,
    stride_gb,
    stride_gl,
    stride_gd,
    stride_fb,
    stride_fd,
    stride_fk,
    stride_dxb,
    stride_dxl,
    stride_dxd,
    stride_dib,
    stride_did,
    stride_dik,
    WIDTH: tl.constexpr,
    BLOCK_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    SILU: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Each program owns `iters` consecutive row blocks of one (batch, channel block), over the extended
    positions s in [ext_start, seqlen) (ext_start = 1 - width when the state needs a gradient).

    For input position s and shift m = width-1-k, output r = s + m reads x_s through tap k:
        dx_s   += w_k * dy_r            dw_k += dy_r * x_s           (when s, r share a document)
    where dy = dout * silu'(pre-activation), recomputed here. Gradients of positions s < 0 go to the
    state; dfinal adds to the inputs that make up the final state. dweight and dbias leave as one
    partial sum per program, summed by the caller (deterministic, no atomics).
    """
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2)
    part = (b * tl.num_programs(0) + pid_c).to(tl.int64)
    b = b.to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    kidx = tl.arange(0, BLOCK_W)
    x_row_ptr = x_ptr + b * stride_xb
    init_row_ptr = init_ptr + b * stride_ib
    seq_row_ptr = seq_ptr + b * stride_sb
    doc0 = 0
    doc_last = 0
    if HAS_SEQ:
        doc0 = tl.load(seq_row_ptr)
        doc_last = tl.load(seq_row_ptr + (seqlen - 1) * stride_sl)
    dw_acc = tl.zeros((BLOCK_W, BLOCK_D), dtype=ACC)
    db_acc = tl.zeros((BLOCK_D,), dtype=ACC)

    for it in range(iters):
        s = ext_start + (pid_c * iters + it) * BLOCK_L + tl.arange(0, BLOCK_L)
        s_ok = s < seqlen
        doc_s = s * 0
        if HAS_SEQ:
            doc_s = _doc_of(seq_row_ptr, stride_sl, s, s_ok, doc0)
        first_row = ext_start + (pid_c * iters + it) * BLOCK_L
        x_s = _load_ext(
            x_row_ptr,
            init_row_ptr,
            s,
            cols,
            s_ok,
            col_ok,
            stride_xl,
            stride_xd,
            stride_id,
            stride_ik,
            WIDTH,
            HAS_INIT,
            ACC,
        )
        dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=ACC)
        for m in tl.static_range(WIDTH):
            k = WIDTH - 1 - m
            r = s + m
            r_ok = s_ok & (r >= 0) & (r < seqlen)
            doc_r = doc_s
            if HAS_SEQ:
                doc_r = _doc_of(seq_row_ptr, stride_sl, r, r_ok, doc0)
                r_ok = r_ok & (doc_r == doc_s)
            dy = tl.load(
                dout_ptr + b * stride_gb + r[:, None] * stride_gl + cols[None, :] * stride_gd,
                mask=r_ok[:, None] & col_ok[None, :],
                other=0.0,
            ).to(ACC)
            if SILU:
                pre = _preact(
                    x_row_ptr,
                    init_row_ptr,
                    seq_row_ptr,
                    w_ptr,
                    b_ptr,
                    r,
                    cols,
                    r_ok,
                    col_ok,
                    doc_r,
                    doc0,
                    stride_xl,
                    stride_xd,
                    stride_id,
                    stride_ik,
                    stride_sl,
                    stride_wd,
                    stride_wk,
                    WIDTH,
                    HAS_BIAS,
                    HAS_INIT,
                    HAS_SEQ,
                    ACC,
                    BLOCK_L,
                    BLOCK_D,
                    first_row + m < WIDTH - 1,
                )
                sig = 1.0 / (1.0 + tl.exp(-pre))
                dy = dy * sig * (1.0 + pre * (1.0 - sig))
            w_k = tl.load(w_ptr + cols * stride_wd + k * stride_wk, mask=col_ok, other=0.0).to(ACC)
            dx += dy * w_k[None, :]
            dw_k = tl.sum(dy * x_s, axis=0)
            dw_acc += tl.where(kidx[:, None] == k, dw_k[None, :], 0.0)
            if m == 0:
                db_acc += tl.sum(dy, axis=0)
        if HAS_DFINAL:
            j = s - (seqlen - (WIDTH - 1))
            f_ok = s_ok & (j >= 0)
            if HAS_SEQ:
                f_ok = f_ok & (doc_s == doc_last)
            dx += tl.load(
                dfinal_ptr + b * stride_fb + cols[None, :] * stride_fd + j[:, None] * stride_fk,
                mask=f_ok[:, None] & col_ok[None, :],
                other=0.0,
            ).to(ACC)
        tl.store(
            dx_ptr + b * stride_dxb + s[:, None] * stride_dxl + cols[None, :] * stride_dxd,
            dx.to(dx_ptr.dtype.element_ty),
            mask=(s_ok & (s >= 0))[:, None] & col_ok[None, :],
        )
        if HAS_INIT:
            tl.store(
                dinit_ptr
                + b * stride_dib
                + cols[None, :] * stride_did
                + (s + WIDTH - 1)[:, None] * stride_dik,
                dx.to(dinit_ptr.dtype.element_ty),
                mask=(s < 0)[:, None] & col_ok[None, :],
            )

    tl.store(
        dw_part_ptr + part * BLOCK_W * dim + kidx[:, None] * dim + cols[None, :],
        dw_acc,
        mask=(kidx[:, None] < WIDTH) & col_ok[None, :],
    )
    if HAS_BIAS:
        tl.store(db_part_ptr + part * dim + cols, db_acc, mask=col_ok)


@triton.jit
def conv_update_kernel(
    x_ptr,
    state_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    dim,
    stride_xb,
    stride_xd,
    stride_sb,
    stride_sd,
    stride_sk,
    stride_wd,
    stride_wk,
    stride_ob,
    stride_od,
    WIDTH: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_D: tl.constexpr,
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
