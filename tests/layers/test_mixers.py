"""Every sequence mixer: a full forward equals prefill + token-by-token steps, chunked prefill, packed
documents (seq_idx / cu_seqlens) equal separate runs, gradients reach every parameter, bad inputs fail."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mambakit.layers import MLP, Attention, Mamba1, Mamba2

D_MODEL = 32
MIXERS = {
    "mamba1": lambda: Mamba1(D_MODEL, d_state=8, d_conv=4, expand=2),
    "mamba1-bias": lambda: Mamba1(D_MODEL, d_state=4, d_conv=3, expand=1, dt_rank=3, bias=True),
    "mamba2": lambda: Mamba2(D_MODEL, d_state=16, headdim=8, ngroups=2, chunk_size=8),
    "mamba2-limit": lambda: Mamba2(
        D_MODEL, d_state=8, headdim=16, chunk_size=16, dt_limit=(0.01, 0.05), norm_before_gate=True, bias=True
    ),
    "attn": lambda: Attention(D_MODEL, 4),
    "attn-gqa-rotary": lambda: Attention(D_MODEL, 4, num_kv_heads=2, rotary_emb_dim=4, qkv_bias=True),
    "attn-mqa-rotary": lambda: Attention(D_MODEL, 4, num_kv_heads=1, head_dim=16, rotary_emb_dim=16),
    "mlp-swiglu": lambda: MLP(D_MODEL, 48, "swiglu"),
    "mlp-relu2": lambda: MLP(D_MODEL, 48, "relu2", bias=True),
}
STATEFUL = [k for k in MIXERS if not k.startswith("mlp")]


def make(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    mixer = MIXERS[kind]()
    with torch.no_grad():  # non-trivial values for the parameters that init to constants
        for name, p in mixer.named_parameters():
            if name in ("D", "norm.weight") or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return mixer.eval()


def hidden(batch: int, seqlen: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, seqlen, D_MODEL)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item())


def decode(mixer, x: torch.Tensor, prefills: list[int], max_seqlen: int = 64) -> torch.Tensor:
    """Prefill x in pieces of the given lengths, then step through the rest one token at a time."""
    cache = mixer.allocate_inference_cache(x.shape[0], max_seqlen)
    outs, pos = [], 0
    for n in prefills:
        outs.append(mixer(x[:, pos : pos + n], cache=cache))
        pos += n
    for t in range(pos, x.shape[1]):
        outs.append(mixer.step(x[:, t : t + 1], cache))
    if cache is not None:
        assert cache.seqlen_offset == x.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("kind", list(MIXERS))
@pytest.mark.parametrize("prefills", [[], [1], [19]], ids=["steps-only", "prefill-1", "prefill-19"])
@torch.no_grad()
def test_steps_after_prefill_equal_forward(kind, prefills):
    mixer, x = make(kind), hidden(2, 27)
    assert_close(decode(mixer, x, prefills), mixer(x))


@pytest.mark.parametrize("kind", STATEFUL)
@torch.no_grad()
def test_chunked_prefill_equals_forward(kind):
    mixer, x = make(kind), hidden(3, 40)
    # pieces shorter than the conv width and ones crossing the scan's chunk boundaries
    assert_close(decode(mixer, x, [2, 1, 13, 20]), mixer(x))


def _segments(seq_idx_row: torch.Tensor) -> list[tuple[int, int]]:
    bounds = [0] + [i for i in range(1, len(seq_idx_row)) if seq_idx_row[i] != seq_idx_row[i - 1]]
    return list(zip(bounds, bounds[1:] + [len(seq_idx_row)]))


@pytest.mark.parametrize("kind", list(MIXERS))
@torch.no_grad()
def test_packed_seq_idx_equals_separate_runs(kind):
    mixer, x = make(kind), hidden(2, 30)
    lengths = [[2, 17, 11], [9, 1, 20]]  # a one-token document, and documents crossing chunk boundaries
    seq_idx = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor(ls)) for ls in lengths])
    out = mixer(x, seq_idx=seq_idx)
    for b in range(2):
        for s, e in _segments(seq_idx[b]):
            assert_close(out[b : b + 1, s:e], mixer(x[b : b + 1, s:e]))


@pytest.mark.parametrize("kind", list(MIXERS))
@torch.no_grad()
def test_cu_seqlens_equals_seq_idx(kind):
    mixer, x = make(kind), hidden(1, 30)
    cu_seqlens = torch.tensor([0, 5, 6, 30], dtype=torch.int32)
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 1, 24]))[None]
    out = mixer(x, cu_seqlens=cu_seqlens)
    assert_close(out, mixer(x, seq_idx=seq_idx))
    assert_close(out[:, 6:], mixer(x[:, 6:]))


@pytest.mark.parametrize("kind", STATEFUL)
@torch.no_grad()
def test_decoding_after_packed_prefill_continues_the_last_document(kind):
    mixer, x = make(kind), hidden(2, 30)
    seq_idx = torch.tensor([[0] * 10 + [1] * 12, [0] * 3 + [1] * 2 + [2] * 17])
    cache = mixer.allocate_inference_cache(2, 40)
    mixer(x[:, :22], seq_idx=seq_idx, cache=cache)
    steps = torch.cat([mixer.step(x[:, t : t + 1], cache) for t in range(22, 30)], dim=1)
    for b, start in ((0, 10), (1, 5)):
        assert_close(steps[b : b + 1], mixer(x[b : b + 1, start:30])[:, 22 - start :])


@pytest.mark.parametrize("kind", list(MIXERS))
def test_gradients_reach_every_parameter(kind):
    mixer, x = make(kind), hidden(2, 20).requires_grad_()
    seq_idx = torch.tensor([[0] * 12 + [1] * 8, [0] * 20])
    (mixer(x, seq_idx=seq_idx) * torch.randn(2, 20, D_MODEL)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in mixer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", STATEFUL)
def test_prefill_under_autograd_detaches_the_cached_state(kind):
    """Prefills may run under autograd; the state passed from one prefill to the next is detached, so
    each piece gets exactly the gradient of its own outputs."""
    mixer, x = make(kind), hidden(1, 12)
    w = torch.randn(1, 12, D_MODEL)
    early, late = x.clone().requires_grad_(), x.clone().requires_grad_()
    (mixer(early)[:, :5] * w[:, :5]).sum().backward()
    (mixer(late)[:, 5:] * w[:, 5:]).sum().backward()
    pieces = x.clone().requires_grad_()
    cache = mixer.allocate_inference_cache(1, 16)
    out = torch.cat([mixer(pieces[:, :5], cache=cache), mixer(pieces[:, 5:], cache=cache)], dim=1)
    (out * w).sum().backward()
    assert_close(pieces.grad[:, :5], early.grad[:, :5])
    assert_close(pieces.grad[:, 5:], late.grad[:, 5:])


@pytest.mark.parametrize("kind", list(MIXERS))
def test_bad_inputs_name_the_argument(kind):
    mixer = make(kind)
    with pytest.raises(ValueError, match="hidden_states"):
        mixer(torch.randn(2, 5, D_MODEL + 1))
    with pytest.raises(ValueError, match="hidden_states"):
        mixer(torch.randn(2, D_MODEL))
    with pytest.raises(TypeError, match="hidden_states"):
        mixer(torch.ones(2, 5, D_MODEL, dtype=torch.long))
    cache = mixer.allocate_inference_cache(2, 8)
    with pytest.raises(ValueError, match="hidden_states"):
        mixer.step(torch.randn(2, 2, D_MODEL), cache)
    if cache is not None:
        with pytest.raises(ValueError, match="cache"):
            mixer.step(torch.randn(3, 1, D_MODEL), cache)
        with pytest.raises(ValueError, match="cache"):
            mixer(torch.randn(3, 4, D_MODEL), cache=cache)
    with pytest.raises(ValueError, match="cu_seqlens"):
        mixer(torch.randn(1, 6, D_MODEL), cu_seqlens=torch.tensor([0, 2, 5]))


@pytest.mark.parametrize("kind", ["mamba2", "mamba2-limit"])
def test_mamba2_cu_seqlens_with_cache_is_refused(kind):
    mixer = make(kind)
    cache = mixer.allocate_inference_cache(1, 8)
    with pytest.raises(ValueError, match="cu_seqlens"):
        mixer(torch.randn(1, 6, D_MODEL), cu_seqlens=torch.tensor([0, 2, 6]), cache=cache)


@given(
    kind=st.sampled_from(["mamba1", "mamba2", "attn"]),
    width=st.sampled_from([2, 4]),
    groups_heads=st.sampled_from([(1, 2), (2, 4), (4, 4)]),
    chunk_size=st.sampled_from([1, 3, 8]),
    batch=st.integers(1, 3),
    pieces=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    n_steps=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=25)
@torch.no_grad()
def test_random_shapes_decode_like_forward(
    kind, width, groups_heads, chunk_size, batch, pieces, n_steps, seed
):
    """Fresh random layer shapes and prompt splits: prefills + steps equal one forward."""
    torch.manual_seed(seed)
    ngroups, nheads = groups_heads
    if kind == "mamba1":
        mixer = Mamba1(16, d_state=4, d_conv=width, expand=2)
    elif kind == "mamba2":
        mixer = Mamba2(
            16, d_state=4, d_conv=width, headdim=32 // nheads, ngroups=ngroups, chunk_size=chunk_size
        )
    else:
        mixer = Attention(16, nheads, num_kv_heads=ngroups, rotary_emb_dim=16 // nheads if width == 4 else 2)
    x = torch.randn(batch, sum(pieces) + n_steps, 16)
    cache = mixer.allocate_inference_cache(batch, x.shape[1])
    outs, pos = [], 0
    for n in pieces:
        outs.append(mixer(x[:, pos : pos + n], cache=cache))
        pos += n
    outs += [mixer.step(x[:, t : t + 1], cache) for t in range(pos, x.shape[1])]
    full = mixer(x)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4 * full.abs().max().item())
