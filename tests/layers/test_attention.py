"""Attention layer against explicit float64 softmax attention (grouped-query heads, rotary embedding
written with complex numbers, per-document causal masks), plus its KV cache and argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.layers import Attention


def naive_attention(m: Attention, u: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    p = {k: v.detach().double() for k, v in m.state_dict().items()}
    batch, seqlen, _ = u.shape
    H, Hkv, hd, rd = m.num_heads, m.num_kv_heads, m.head_dim, m.rotary_emb_dim
    qkv = F.linear(u, p["in_proj.weight"], p.get("in_proj.bias"))
    q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
    q, k, v = (
        q.reshape(batch, seqlen, H, hd),
        k.reshape(batch, seqlen, Hkv, hd),
        v.reshape(batch, seqlen, Hkv, hd),
    )
    if seq_idx is None:
        seq_idx = torch.zeros(batch, seqlen, dtype=torch.long)
    # position within the document
    pos = torch.zeros(batch, seqlen, dtype=torch.float64)
    for b in range(batch):
        for t in range(1, seqlen):
            pos[b, t] = 0 if seq_idx[b, t] != seq_idx[b, t - 1] else pos[b, t - 1] + 1
    if rd:
        half = rd // 2
        freq = m.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / rd)
        rot = torch.polar(
            torch.ones(batch, seqlen, 1, half, dtype=torch.float64), pos[..., None, None] * freq
        )

        def rope(x):
            c = torch.complex(x[..., :half], x[..., half:rd]) * rot
            return torch.cat([c.real, c.imag, x[..., rd:]], dim=-1)

        q, k = rope(q), rope(k)
    kv_of = torch.arange(H) // (H // Hkv)
    scores = torch.einsum("blhd,bshd->bhls", q, k[:, :, kv_of]) / hd**0.5
    same_doc = seq_idx[:, :, None] == seq_idx[:, None, :]
    allowed = same_doc & (torch.arange(seqlen)[None, :, None] >= torch.arange(seqlen)[None, None, :])
    if not m.causal:
        allowed = same_doc
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.einsum("bhls,bshd->blhd", scores.softmax(-1), v[:, :, kv_of]).reshape(batch, seqlen, H * hd)
    return F.linear(out, p["out_proj.weight"], p.get("out_proj.bias"))


CASES = [
    dict(num_heads=4),
    dict(num_heads=4, num_kv_heads=2, rotary_emb_dim=4, qkv_bias=True, out_bias=True),
    dict(num_heads=8, num_kv_heads=1, head_dim=6, rotary_emb_dim=6, rope_theta=500.0),
    dict(num_heads=2, rotary_emb_dim=16, causal=False),
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("packed", [False, True])
@torch.no_grad()
def test_matches_float64_softmax_attention(kw, packed):
    torch.manual_seed(len(kw))
    m = Attention(32, **kw)
    for name, prm in m.named_parameters():
        if name.endswith("bias"):
            prm.add_(0.3 * torch.randn_like(prm))
    u = torch.randn(2, 19, 32)
    seq_idx = torch.tensor([[0] * 7 + [1] * 12, [0] * 1 + [1] * 10 + [2] * 8]) if packed else None
    out = m(u, seq_idx=seq_idx)
    ref = naive_attention(m, u.double(), seq_idx)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_kv_cache_layout_and_capacity():
    torch.manual_seed(0)
    m = Attention(32, 4, num_kv_heads=2, rotary_emb_dim=8)
    cache = m.allocate_inference_cache(3, 10, dtype=torch.bfloat16)
    assert (
        cache.k.shape == (3, 10, 2, 8) and cache.v.shape == (3, 10, 2, 8) and cache.k.dtype == torch.bfloat16
    )
    u = torch.randn(3, 6, 32)
    with torch.no_grad():
        m(u, cache=cache)
        _, k, v = m._qkv(u)
    torch.testing.assert_close(cache.v[:, :6], v.to(torch.bfloat16))
    assert cache.seqlen_offset == 6 and cache.k[:, 6:].abs().sum() == 0
    with pytest.raises(ValueError, match="max_seqlen"):
        m(torch.randn(3, 5, 32), cache=cache)
    for _ in range(4):
        m.step(torch.randn(3, 1, 32), cache)
    with pytest.raises(ValueError, match="full"):
        m.step(torch.randn(3, 1, 32), cache)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(num_heads=5), "num_heads"),
        (dict(num_heads=4, rotary_emb_dim=3), "rotary_emb_dim"),
        (dict(num_heads=4, rotary_emb_dim=10), "rotary_emb_dim"),
    ],
)
def test_bad_constructor_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        Attention(32, **kw)


def test_non_causal_refuses_a_cache():
    m = Attention(32, 4, causal=False)
    with pytest.raises(ValueError, match="causal"):
        m(torch.randn(1, 3, 32), cache=m.allocate_inference_cache(1, 4))


def test_gradcheck_float64():
    torch.manual_seed(0)
    m = Attention(8, 4, num_kv_heads=2, rotary_emb_dim=2).double()
    u = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    assert torch.autograd.gradcheck(lambda u: m(u, seq_idx=seq_idx), (u,))
