"""Eager calls of the Triton backends' custom ops without the dispatcher.

A `torch.library.custom_op` with `register_autograd` runs, in eager mode: the dispatcher, its autograd
kernel, a generated `torch.autograd.Function` (torch/_library/autograd.py) that redispatches below
autograd, and finally the Python implementation. For the SSD forward that was 18 us of host time a
call without grad and 80 us with grad on the development CPU (2026-12-01), next to kernels that run
for 10-200 us: at short sequences eager models were host-bound (docs/benchmarks.md, the SSD forward at
seqlen 2048).

`EagerOp` takes the same pieces (the implementation, setup_context, backward) and, outside
torch.compile, calls the implementation directly or through one `autograd.Function` of its own, with
the generated Function's semantics (grad mode and `requires_grad` decide, as in `autograd_impl`).
While anything traces (torch.compile, AOT autograd, fake tensors, a dispatch mode), it calls the
custom op, which the tracer sees as one opaque node.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


class EagerOp:
    """Call as the custom op would be called: `EagerOp(op, impl, setup_context, backward)(*args)`.

    op: the registered custom op (used under torch.compile); impl: the function it wraps; setup_context
    and backward: what `op.register_autograd` was given (None for an op without autograd, such as a
    backward op or an in-place state update). no_grad_impl: what to call instead of impl when nothing
    will differentiate (same arguments and results, may skip work kept only for the backward).
    """

    def __init__(
        self,
        op: Callable,
        impl: Callable,
        setup_context: Callable | None = None,
        backward: Callable | None = None,
        no_grad_impl: Callable | None = None,
    ) -> None:
        self.op, self.impl = op, impl
        self.no_grad_impl = no_grad_impl or impl
        self.function = None
        if backward is not None:

            def forward(ctx, *args):
                out = impl(*args)
                setup_context(ctx, args, out)
                return out

            self.function = type(
                f"Eager_{impl.__name__}",
                (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)},
            )

    def __call__(self, *args):
        if _tracing(args):
            return self.op(*args)
        if self.function is not None and torch.is_grad_enabled():
            if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
                return self.function.apply(*args)
        return self.no_grad_impl(*args)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _tracing(args: tuple) -> bool:
    """True where the custom op must be called: under torch.compile, inside a dispatch mode (fake
    tensors, FLOP counters, AOT tracing), or with tensor subclasses (fake, functional), all of which
    must see the op itself rather than its Triton launches."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return True
    return any(isinstance(a, torch.Tensor) and type(a) not in _PLAIN for a in args)
