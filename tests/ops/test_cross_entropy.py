"""Tests of linear_cross_entropy: the chunked backends (torch, and triton through the interpreter) against
the full-logits reference (and both against F.cross_entropy on the full logits), loss and gradients of
hidden and weight, over shapes where the number of tokens is not a multiple of the chunk, smaller than
one chunk, a padded vocabulary (also a weight with fewer rows than the matmul's 8-aligned columns),
ignored targets (a whole chunk of them), fp32 and bf16 autocast; float64 gradcheck; argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from mambakit.ops import linear_cross_entropy
from mambakit.ops.cross_entropy import default_chunk_size

IGNORE = -100
CHUNKED = pytest.mark.parametrize("backend", ["torch", "triton"])

# (tokens, d_model, padded vocab, vocab, chunk)
SHAPES = [
    (37, 16, 40, 33, 8),  # tokens not a multiple of the chunk, padded vocab
    (5, 8, 24, 24, 16),  # fewer tokens than one chunk
    (64, 12, 72, 65, 16),  # a multiple of the chunk
    (1, 4, 3, 3, 1),  # one token, one-token chunks
    (50, 24, 136, 130, 7),  # odd chunk
]


def rand(shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(dtype)


def make(n, d, padded, vocab, seed=0, ignore_every=5, ignored_span=None):
    """hidden (n, d), weight (padded, d), targets (n,) with every `ignore_every`-th target and the
    rows of `ignored_span` (start, stop) ignored."""
    hidden = rand((n, d), seed)
    weight = rand((padded, d), seed + 1, scale=d**-0.5 * 2)
    g = torch.Generator().manual_seed(seed + 2)
    targets = torch.randint(0, vocab, (n,), generator=g)
    if ignore_every:
        targets[ignore_every - 1 :: ignore_every] = IGNORE
    if ignored_span is not None:
        targets[slice(*ignored_span)] = IGNORE
    return hidden, weight, targets


def full_logits_loss(hidden, weight, targets, vocab, reduction="mean"):
    """What the trainer computed before: F.cross_entropy on the whole float32 logits."""
    logits = F.linear(hidden, weight)[..., :vocab].float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction=reduction)


def loss_and_grads(fn, hidden, weight, targets, grad_seed=7, autocast=False):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(h, w, targets)
    gy = rand(loss.shape, grad_seed) if loss.ndim else torch.tensor(1.7)
    gh, gw = torch.autograd.grad(loss, (h, w), gy)
    return loss.detach(), gh, gw


def assert_close(got, want, rtol, name):
    """Relative to the largest entry of `want` (gradients have entries near 0)."""
    assert got.shape == want.shape and got.dtype == want.dtype, name
    scale = want.abs().max().clamp(min=1e-30)
    err = float((got.double() - want.double()).abs().max() / scale) if want.numel() else 0.0
    assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"


@CHUNKED
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_matches_reference_fp32(shape, reduction, backend):
    n, d, padded, vocab, chunk = shape
    inputs = make(n, d, padded, vocab, seed=n, ignored_span=(0, chunk) if n > chunk else None)

    def chunked(h, w, t):
        return linear_cross_entropy(
            h, w, t, vocab_size=vocab, reduction=reduction, chunk_size=chunk, backend=backend
        )

    def ref(h, w, t):
        return linear_cross_entropy(h, w, t, vocab_size=vocab, reduction=reduction, backend="reference")

    def textbook(h, w, t):
        return full_logits_loss(h, w, t, vocab, reduction)

    got, want, torch_ce = (loss_and_grads(f, *inputs) for f in (chunked, ref, textbook))
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, want):
        assert_close(a, b, 1e-5, f"chunked {name}")
    for name, a, b in zip(("loss", "d hidden", "d weight"), want, torch_ce):
        assert_close(a, b, 1e-5, f"reference vs F.cross_entropy {name}")
    assert (got[2][vocab:] == 0).all(), "padded rows of the weight must get zero gradient"


@CHUNKED
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_chunked_matches_reference_bf16_autocast(shape, backend):
    n, d, padded, vocab, chunk = shape
    inputs = make(n, d, padded, vocab, seed=n + 1)

    def chunked(h, w, t):
        return linear_cross_entropy(h, w, t, vocab_size=vocab, chunk_size=chunk, backend=backend)

    def ref(h, w, t):
        return full_logits_loss(h, w, t, vocab)

    got = loss_and_grads(chunked, *inputs, autocast=True)
    want = loss_and_grads(ref, *inputs, autocast=True)
    assert got[0].dtype == torch.float32  # the loss is float32 under autocast, like the upcast logits'
    assert got[1].dtype == got[2].dtype == torch.float32  # gradients in the parameters' dtype
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, want):
        assert_close(a, b, 1e-2, f"bf16 {name}")


@CHUNKED
def test_bf16_inputs_without_autocast(backend):
    """A model held in bfloat16: matmuls in bfloat16, softmax in float32, gradients in bfloat16."""
    hidden, weight, targets = make(40, 16, 40, 36, seed=3)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    got = loss_and_grads(
        lambda h, w, t: linear_cross_entropy(h, w, t, vocab_size=36, chunk_size=16, backend=backend),
        hb,
        wb,
        targets,
    )
    want = loss_and_grads(lambda h, w, t: full_logits_loss(h, w, t, 36), hb, wb, targets)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, want):
        assert_close(a.float(), b.float(), 1e-2, f"bf16 weights {name}")


def test_leading_dims_and_default_chunk():
    hidden, weight, targets = make(24, 8, 20, 20, seed=4)
    h3, t3 = hidden.reshape(2, 12, 8), targets.reshape(2, 12)
    flat = linear_cross_entropy(hidden, weight, targets)
    assert torch.allclose(linear_cross_entropy(h3, weight, t3), flat)
    per_token = linear_cross_entropy(h3, weight, t3, reduction="none")
    assert per_token.shape == (2, 12)
    assert torch.allclose(
        per_token.flatten(), linear_cross_entropy(hidden, weight, targets, reduction="none")
    )
    assert default_chunk_size(50280) == 2048 and default_chunk_size(257) == 2**18
    assert default_chunk_size(10**9) == 256


@CHUNKED
def test_all_ignored_like_f_cross_entropy(backend):
    """All targets ignored: mean is NaN (0 / 0) and gradients are zero, as F.cross_entropy gives."""
    hidden, weight, _ = make(10, 8, 12, 12, seed=5)
    targets = torch.full((10,), IGNORE)
    got = loss_and_grads(
        lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=4, backend=backend), hidden, weight, targets
    )
    want = loss_and_grads(lambda h, w, t: full_logits_loss(h, w, t, 12), hidden, weight, targets)
    assert got[0].isnan() and want[0].isnan()
    assert (got[1] == 0).all() and (got[2] == 0).all() and (want[1] == 0).all()
    total = linear_cross_entropy(hidden, weight, targets, reduction="sum", backend=backend)
    assert total == 0


@CHUNKED
def test_grad_of_one_input_only(backend):
    hidden, weight, targets = make(9, 4, 6, 6, seed=6)
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, targets, chunk_size=4, backend=backend).backward()
    w = weight.clone().requires_grad_()
    linear_cross_entropy(hidden, w, targets, chunk_size=4, backend=backend).backward()
    _, gh, gw = loss_and_grads(lambda a, b, t: full_logits_loss(a, b, t, 6), hidden, weight, targets)
    assert_close(h.grad, gh / 1.7, 1e-5, "d hidden alone")
    assert_close(w.grad, gw / 1.7, 1e-5, "d weight alone")


def test_no_grad_forward():
    hidden, weight, targets = make(9, 4, 6, 5, seed=8)
    with torch.no_grad():
        got = linear_cross_entropy(hidden.requires_grad_(), weight, targets, vocab_size=5, chunk_size=2)
    assert got.grad_fn is None
    assert torch.allclose(got, full_logits_loss(hidden, weight, targets, 5).detach())


@CHUNKED
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(reduction, backend):
    hidden, weight, targets = make(7, 3, 6, 5, seed=9, ignore_every=3)
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()

    def fn(h, w):
        return linear_cross_entropy(
            h, w, targets, vocab_size=5, reduction=reduction, chunk_size=3, backend=backend
        )

    assert torch.autograd.gradcheck(fn, (h, w))


@CHUNKED
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 12),
    vocab=st.integers(1, 30),
    pad=st.integers(0, 6),
    chunk=st.integers(1, 48),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(n, d, vocab, pad, chunk, seed, backend):
    hidden, weight, targets = make(n, d, vocab + pad, vocab, seed=seed, ignore_every=4)
    got = loss_and_grads(
        lambda h, w, t: linear_cross_entropy(
            h, w, t, vocab_size=vocab, reduction="sum", chunk_size=chunk, backend=backend
        ),
        hidden,
        weight,
        targets,
    )
    want = loss_and_grads(lambda h, w, t: full_logits_loss(h, w, t, vocab, "sum"), hidden, weight, targets)
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, want):
        assert_close(a, b, 1e-5, name)


def test_env_backend(monkeypatch):
    """MAMBAKIT_BACKEND reaches the op; "auto" on CPU tensors is the chunked torch backend."""
    import mambakit.ops.cross_entropy.reference as ref
    import mambakit.ops.cross_entropy.torch as tor
    import mambakit.ops.cross_entropy.triton as tri

    calls = []
    for name, mod in (("reference", ref), ("torch", tor), ("triton", tri)):
        real = mod.linear_cross_entropy_impl
        monkeypatch.setattr(
            mod, "linear_cross_entropy_impl", lambda *a, n=name, f=real: calls.append(n) or f(*a)
        )
    hidden, weight, targets = make(4, 3, 5, 5)
    for env in ("auto", "reference", "triton"):
        monkeypatch.setenv("MAMBAKIT_BACKEND", env)
        linear_cross_entropy(hidden, weight, targets)
    linear_cross_entropy(hidden, weight, targets, backend="torch")
    assert calls == ["torch", "reference", "triton", "torch"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"hidden": [1.0]}, TypeError, "hidden must be a torch.Tensor"),
        ({"hidden": torch.randn(4)}, ValueError, r"hidden must have shape \(N, d_model\)"),
        ({"hidden": torch.ones(4, 3, dtype=torch.long)}, TypeError, "hidden must have dtype"),
        ({"weight": torch.randn(5, 2)}, ValueError, r"weight must have shape \(\*, 3\)"),
        ({"weight": torch.randn(5, 3).double()}, TypeError, "hidden .* and weight .* same dtype"),
        ({"targets": torch.zeros(3, dtype=torch.long)}, ValueError, r"targets must have shape \(4\)"),
        ({"targets": torch.zeros(4)}, TypeError, "targets must have dtype"),
        (
            {"targets": torch.tensor([0, 1, 5, 2])},
            ValueError,
            r"targets must lie in \[0, vocab_size=5\).*got 5",
        ),
        ({"targets": torch.tensor([0, -1, 1, 2])}, ValueError, "targets must lie in"),
        ({"vocab_size": 6}, ValueError, r"vocab_size must be an int in \[1, weight.shape\[0\]=5\]"),
        ({"vocab_size": 0}, ValueError, "vocab_size must be"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
        ({"reduction": "avg"}, ValueError, "reduction must be one of"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ({"backend": "cuda"}, ValueError, "argument backend='cuda'"),
    ],
)
def test_argument_errors(kwargs, error, match):
    args = {
        "hidden": torch.randn(4, 3),
        "weight": torch.randn(5, 3),
        "targets": torch.tensor([0, 1, IGNORE, 4]),
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        linear_cross_entropy(**args)


def test_target_beyond_vocab_size_is_an_error():
    """A target that is a padded row of the weight is not a class."""
    with pytest.raises(ValueError, match=r"vocab_size=3"):
        linear_cross_entropy(torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0, 3]), vocab_size=3)


class _LargestResult(TorchDispatchMode):
    """Records the element count of the largest tensor any op returns (no memory measurement: shapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_more_than_one_chunk_of_logits():
    """Forward and backward of the chunked backend create no tensor larger than one chunk's logits (or
    the weight), and save nothing of (tokens, vocab) size for the backward; the reference does both."""
    n, d, vocab, chunk = 96, 4, 200, 16
    hidden, weight, targets = make(n, d, vocab, vocab, seed=11)
    for backend, want_small in (("torch", True), ("reference", False)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        saved: list[int] = []

        def pack(t: torch.Tensor, saved=saved) -> torch.Tensor:
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with _LargestResult() as mode:
                linear_cross_entropy(h, w, targets, chunk_size=chunk, backend=backend).backward()
        bound = max(chunk * vocab, vocab * d)
        assert (mode.largest <= bound) == want_small, (backend, mode.largest, bound)
        assert (max(saved) < n * vocab) == want_small, (backend, max(saved))


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [50277, 50288])
def test_triton_at_model_size_gpu(vocab):
    """The triton backend against the full-logits reference at the 130M head's size, bf16 autocast:
    two chunks of 2048 tokens, a vocabulary that is not a multiple of 8 and one that is."""
    dev = torch.device("cuda")
    n, d, padded = 4096, 768, 50288
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(n, d, device=dev, generator=g)
    weight = 0.02 * torch.randn(padded, d, device=dev, generator=g)
    targets = torch.randint(0, vocab, (n,), device=dev, generator=g)
    targets[::7] = IGNORE

    def run(backend):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = linear_cross_entropy(h, w, targets, vocab_size=vocab, chunk_size=2048, backend=backend)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    got, same_matmuls, want = run("triton"), run("torch"), run("reference")
    for name, a, b, c in zip(("loss", "d hidden", "d weight"), got, same_matmuls, want):
        assert a.isfinite().all(), name
        # against the torch backend (the same bf16 matmuls): only the softmax's rounding differs
        assert_close(a, b, 1e-2, f"triton vs torch {name}")
        # against the reference, whose unaligned (N, 50277) matmuls accumulate in another order: the
        # bf16 d hidden differs by up to 1.2e-2 of its largest entry there (measured on an H200)
        assert_close(a, c, 2e-2, f"triton vs reference {name}")
    assert (got[2][vocab:] == 0).all()
