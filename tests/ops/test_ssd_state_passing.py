"""The SSD kernels' sequential pass over chunks (`state_passing`) against a plain loop, forward and
reverse, with document boundaries and state sizes that split into several partial blocks."""

from __future__ import annotations

import pytest
import torch

from mambakit.ops.ssd.triton.state_passing import passing_blocks, state_passing

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def loop_reference(terms, cs, seq_idx, chunk_size, init, reverse, states):
    """out[c] = s; s = decay_c * s + terms[c], chunks in order or reversed; shares decay_c <out[c], S_c>."""
    batch, nchunks, nheads = terms.shape[:3]
    seqlen = cs.shape[-1]
    s = torch.zeros_like(terms[:, 0]) if init is None else init.clone()
    out = torch.empty_like(terms)
    shares = torch.zeros(batch, nheads, nchunks, dtype=terms.dtype, device=terms.device)
    order = range(nchunks - 1, -1, -1) if reverse else range(nchunks)
    for c in order:
        start, last = c * chunk_size, min((c + 1) * chunk_size, seqlen) - 1
        decay = cs[:, :, last].exp()  # (batch, nheads)
        if seq_idx is not None:
            same = seq_idx[:, last] == seq_idx[:, max(start - 1, 0)]
            decay = torch.where(same[:, None], decay, torch.zeros_like(decay))
        out[:, c] = s
        if states is not None:
            shares[:, :, c] = decay * (s * states[:, c]).sum((-1, -2))
        s = decay[..., None, None] * s + terms[:, c]
    return out, s, shares


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_seq", [False, True])
@pytest.mark.parametrize("with_init", [False, True])
def test_state_passing_matches_loop(reverse, with_seq, with_init):
    gen = torch.Generator().manual_seed(int(reverse) + 2 * int(with_seq) + 4 * int(with_init))
    batch, nheads, headdim, dstate, chunk, seqlen = 2, 3, 12, 25, 8, 37  # 300 state entries: 3 blocks
    nchunks = -(-seqlen // chunk)
    assert passing_blocks(batch, nheads, headdim * dstate) < headdim * dstate  # several blocks, one partial

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(DEV)

    terms = rnd(batch, nchunks, nheads, headdim, dstate)
    # in-chunk cumulative log-decays: negative, decreasing within each chunk
    cs = -(rnd(batch, nheads, seqlen).abs() * 0.1).view(batch, nheads, seqlen)
    cs = torch.cat([c.cumsum(-1) for c in cs.split(chunk, dim=-1)], dim=-1)
    seq_idx = None
    if with_seq:  # boundaries inside a chunk, at a chunk start (8, 24) and none in the second row
        row = torch.tensor([0] * 5 + [1] * 3 + [2] * 16 + [3] * 13)
        seq_idx = torch.stack([row, torch.zeros(seqlen, dtype=torch.int64)]).to(DEV)
    init = rnd(batch, nheads, headdim, dstate) if with_init else None
    states = rnd(batch, nchunks, nheads, headdim, dstate) if reverse else None

    want_out, want_last, want_share = loop_reference(terms, cs, seq_idx, chunk, init, reverse, states)
    buf = terms.clone()
    last = torch.empty(batch, nheads, headdim, dstate, device=DEV)
    share = state_passing(buf, cs, seq_idx, chunk, init, last, reverse=reverse, states=states)
    torch.testing.assert_close(buf, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, want_last, rtol=1e-5, atol=1e-5)
    if reverse:
        assert share.shape[:3] == (batch, nheads, nchunks) and share.shape[3] > 1
        torch.testing.assert_close(share.sum(-1), want_share, rtol=1e-5, atol=1e-4)
    else:
        assert share is None
