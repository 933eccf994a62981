"""`EagerOp`: a custom op's pieces called without the dispatcher in eager mode give the custom op's
values, gradients and grad-mode behaviour; anything that traces still gets the custom op."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from mambakit.ops._eager import EagerOp

CALLS: list[str] = []


def _impl(x: torch.Tensor, w: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    CALLS.append("impl")
    return x * w * k, (x + w).sum(0)


_op = torch.library.custom_op("mambakit_test::scale_eager", _impl, mutates_args=())


@_op.register_fake
def _(x, w, k):
    return torch.empty_like(x), x.new_empty(x.shape[1:])


def _setup_context(ctx, inputs, output):
    x, w, k = inputs
    ctx.save_for_backward(x, w)
    ctx.k = k


def _backward(ctx, dy, ds):
    CALLS.append("backward")
    x, w = ctx.saved_tensors
    return dy * w * ctx.k + ds, dy * x * ctx.k + ds, None


_op.register_autograd(_backward, setup_context=_setup_context)
_eager = EagerOp(_op, _impl, _setup_context, _backward)


def _impl_no_grad(x, w, k):
    CALLS.append("no_grad_impl")
    return x * w * k, (x + w).sum(0)


_eager_no_grad = EagerOp(_op, _impl, _setup_context, _backward, no_grad_impl=_impl_no_grad)


@pytest.mark.parametrize("needs_grad", [False, True])
def test_eager_op_matches_the_custom_op(needs_grad):
    """Same values and gradients as the custom op; the autograd path only when something needs a
    gradient."""
    torch.manual_seed(0)
    x, w = torch.randn(3, 4, requires_grad=needs_grad), torch.randn(3, 4, requires_grad=needs_grad)
    CALLS.clear()
    outs = [f(x, w, 1.5) for f in (_op, _eager)]
    assert CALLS == ["impl", "impl"]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert a.requires_grad == b.requires_grad == needs_grad
    if needs_grad:
        grads = [torch.autograd.grad(o[0].sum() + 2 * o[1].sum(), (x, w)) for o in outs]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert CALLS.count("backward") == 2
    with torch.no_grad():
        CALLS.clear()
        y, _ = _eager(x, w, 1.5)
        assert CALLS == ["impl"] and not y.requires_grad


def test_tracing_gets_the_custom_op():
    """Fake tensors (as AOT autograd and torch.compile use) reach the op's fake, never the
    implementation, which would launch kernels on tensors without data."""
    CALLS.clear()
    with FakeTensorMode():
        x, w = torch.randn(3, 4), torch.randn(3, 4)
        y, s = _eager(x, w, 2.0)
    assert isinstance(y, FakeTensor) and s.shape == (4,)
    assert CALLS == []

    def f(x, w):
        y, s = _eager(x, w, 2.0)
        return y.sum() + s.sum()

    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(3, 4)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    (gx,) = torch.autograd.grad(compiled(x, w), x)
    torch.testing.assert_close(gx, 2.0 * w + 1)


def test_no_grad_impl_only_where_nothing_differentiates():
    """The no-grad implementation runs when nothing needs a gradient, never under tracing, and never
    when an input requires grad."""
    x, w = torch.randn(3, 4), torch.randn(3, 4)
    CALLS.clear()
    _eager_no_grad(x, w, 2.0)
    with torch.no_grad():
        _eager_no_grad(x.requires_grad_(True), w, 2.0)
    assert CALLS == ["no_grad_impl", "no_grad_impl"]
    CALLS.clear()
    y, _ = _eager_no_grad(x, w, 2.0)
    assert CALLS == ["impl"] and y.requires_grad
    CALLS.clear()
    with torch.no_grad(), FakeTensorMode():
        y, _ = _eager_no_grad(torch.randn(3, 4), torch.randn(3, 4), 2.0)
    assert isinstance(y, FakeTensor) and CALLS == []
