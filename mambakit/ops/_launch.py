"""Host-side launch arithmetic shared by the Triton backends, kept cheap because it runs on every call.

`triton.next_power_of_2` is a constexpr function in recent Triton (a few us a call from Python, several
calls a launch), and `torch.cuda.get_device_properties` builds a properties object each time.
"""

from __future__ import annotations

import functools
import os

import torch


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as `triton.next_power_of_2`."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached per device)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


class CachedTuning:
    """A `triton.autotune`d kernel, launched as `kernel[grid](*args, **kwargs)`, that runs the autotuner
    once per distinct call and then the chosen config's JIT function directly.

    `Autotuner.run` rebuilds dicts of every argument (about 50 for the SSD kernels) and their dtypes on
    each launch: about 40 us of host time on the H200 machine's CPU (cProfile, 2026-12-01), as much as
    a short kernel runs. The key here is finer than the autotuner's (every positional key argument,
    every keyword argument and the dtype of every tensor argument), so a config is reused only where
    the autotuner would have chosen it too.
    """

    def __init__(self, tuned) -> None:
        self.tuned = tuned
        names = list(tuned.arg_names)
        self._key_positions = [names.index(k) for k in tuned.keys if k in names]
        self._chosen: dict = {}
        self.best_config = None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._run(grid, args, kwargs)

    def _run(self, grid, args: tuple, kwargs: dict):
        key = (
            tuple(args[i] for i in self._key_positions if i < len(args)),
            tuple(kwargs.items()),
            tuple(a.dtype for a in args if isinstance(a, torch.Tensor)),
        )
        config = self._chosen.get(key)
        if config is None:
            out = self.tuned[grid](*args, **kwargs)
            config = self._chosen[key] = self.tuned.best_config
        else:
            out = self.tuned.fn[grid](*args, **kwargs, **config.all_kwargs())
        self.best_config = config
        return out


# Programmatic dependent launch (PDL, Hopper and later): a kernel launched with it may start while the
# previous kernel on the stream drains, load what no earlier kernel writes (its weights), and then wait
# (`griddepcontrol.wait`) for the previous kernel's results. Between the small kernels of a decoding
# step that hides most of a kernel boundary. Read at every launch, so a benchmark can compare both in
# one process; MAMBAKIT_PDL=0 turns it off.
LAUNCH = {"pdl": os.environ.get("MAMBAKIT_PDL", "1") != "0"}


@functools.cache
def _supports_pdl(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def use_pdl(t: torch.Tensor) -> bool:
    """Whether a kernel on t's device launches with PDL (a CUDA device of compute capability >= 9, not
    Triton's interpreter, and LAUNCH["pdl"] on). Kernels that take it must wait (`wait_for_inputs` in
    ops/_triton_step.py) before they read or write anything an earlier kernel touches."""
    return (
        LAUNCH["pdl"] and t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1" and _supports_pdl(t.device)
    )
