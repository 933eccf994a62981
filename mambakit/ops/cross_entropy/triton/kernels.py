"""Triton kernels of the chunked linear cross-entropy's elementwise part, over one chunk's logits
(c, cols) in the matmul dtype (columns from vocab_size on are padding): one read for the row
statistics, one read and one write for the softmax gradient, instead of several float32 passes."""

import triton
import triton.language as tl

# fmt: off


@triton.jit
def row_stats_kernel(
    logits_ptr, safe_ptr, lse_ptr, target_ptr,
    vocab_size, stride_r,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row: lse = logsumexp(logits[:vocab_size]) by a per-lane running max and sum
    (combined once at the end), and the target logit."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_r
    offs = tl.arange(0, BLOCK_V)
    # a finite start keeps exp(m_old - m_new) defined for lanes that only see masked columns
    m = tl.full((BLOCK_V,), -3.0e38, dtype=ACC)
    s = tl.zeros((BLOCK_V,), dtype=ACC)
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = tl.log(tl.sum(s * tl.exp(m - m_row), axis=0)) + m_row
    tl.store(lse_ptr + row, lse)
    target = tl.load(safe_ptr + row)
    tl.store(target_ptr + row, tl.load(row_ptr + target).to(ACC))


@triton.jit
def softmax_grad_kernel(
    logits_ptr, out_ptr, lse_ptr, safe_ptr, scale_ptr,
    vocab_size, cols_total, stride_r, stride_o,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Program (row, column block): out = (exp(logits - lse) - [col == target]) * row scale, 0 in the
    padding columns, in out's dtype (out may be logits itself: each element is read before written)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = cols < vocab_size
    x = tl.load(logits_ptr + row * stride_r + cols, mask=in_vocab, other=0.0).to(ACC)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)
    target = tl.load(safe_ptr + row)
    p = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
    g = tl.where(in_vocab, p * scale, 0.0)
    tl.store(out_ptr + row * stride_o + cols, g.to(out_ptr.dtype.element_ty), mask=cols < cols_total)
