"""Host-side launch helpers: `next_power_of_2` against Triton's, `sm_count`'s cache, and `CachedTuning`
(one autotuner run per distinct call, then the chosen config directly), run through Triton's
interpreter on a CPU."""

from __future__ import annotations

import types

import torch
import triton
import triton.language as tl

from mambakit.ops import _launch
from mambakit.ops._launch import CachedTuning, next_power_of_2

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_next_power_of_2_matches_triton():
    for n in list(range(0, 2100)) + [2**20 - 1, 2**20, 2**20 + 1, 3 * 2**30]:
        assert next_power_of_2(n) == triton.next_power_of_2(max(n, 1)), n


def test_sm_count_is_read_once_per_device(monkeypatch):
    calls = []

    def props(device):
        calls.append(device)
        return types.SimpleNamespace(multi_processor_count=7)

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    _launch.sm_count.cache_clear()
    try:
        dev = torch.device("meta")  # any device: the lookup is what is cached
        assert _launch.sm_count(dev) == 7 and _launch.sm_count(dev) == 7
        assert calls == [dev]
    finally:
        _launch.sm_count.cache_clear()


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, factor, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    if SCALE:
        x = x * factor
    tl.store(y_ptr + offs, x + BLOCK, mask=mask)  # + BLOCK: the output shows which config ran


def _prune(configs, named_args, **kwargs):
    # one config per dtype, so that no benchmarking run is needed (none can run under the interpreter)
    want = 16 if named_args["x_ptr"].dtype == torch.float32 else 32
    return [c for c in configs if c.kwargs["BLOCK"] == want]


def _tuned():
    configs = [triton.Config({"BLOCK": b}, num_warps=1) for b in (16, 32)]
    return triton.autotune(configs, key=["n"], prune_configs_by={"early_config_prune": _prune})(_scale_kernel)


def test_cached_tuning_runs_the_autotuner_once_per_key(monkeypatch):
    tuned = _tuned()
    kernel = CachedTuning(tuned)
    runs = []
    real_run = tuned.run

    def counting_run(*args, **kwargs):
        runs.append(args[2])  # n
        return real_run(*args, **kwargs)

    monkeypatch.setattr(tuned, "run", counting_run)

    def launch(x, scale=True, factor=2.0):
        y = torch.empty_like(x)
        n = x.numel()
        kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, n, factor, SCALE=scale)
        return y

    x32 = torch.randn(50, device=DEV)
    for _ in range(3):
        torch.testing.assert_close(launch(x32), x32 * 2.0 + 16)
    assert runs == [50] and kernel.best_config.kwargs["BLOCK"] == 16
    # a new dtype, a new key value or a new keyword argument is a new call: the autotuner decides
    x64 = x32.double()
    torch.testing.assert_close(launch(x64), x64 * 2.0 + 32)
    assert kernel.best_config.kwargs["BLOCK"] == 32
    x33 = torch.randn(33, device=DEV)
    torch.testing.assert_close(launch(x33), x33 * 2.0 + 16)
    torch.testing.assert_close(launch(x33, scale=False), x33 + 16)
    assert runs == [50, 50, 33, 33]
    # a non-key scalar argument that changes does not re-tune, and reaches the kernel
    torch.testing.assert_close(launch(x33, factor=-3.0), x33 * -3.0 + 16)
    assert runs == [50, 50, 33, 33]


def test_use_pdl_only_on_hopper_cuda_outside_the_interpreter(monkeypatch):
    """Programmatic dependent launch: never for CPU tensors or under TRITON_INTERPRET=1, and only with
    LAUNCH["pdl"] on and a device of compute capability >= 9 (the capability read once a device)."""
    cpu = torch.zeros(1)
    assert not _launch.use_pdl(cpu)

    class FakeCuda:
        is_cuda = True
        device = torch.device("cuda", 0)

    capability = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capability.append(d) or (9, 0))
    monkeypatch.setattr(_launch, "_supports_pdl", _launch.functools.cache(_launch._supports_pdl.__wrapped__))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setitem(_launch.LAUNCH, "pdl", True)
    assert _launch.use_pdl(FakeCuda()) and _launch.use_pdl(FakeCuda()) and len(capability) == 1
    monkeypatch.setitem(_launch.LAUNCH, "pdl", False)
    assert not _launch.use_pdl(FakeCuda())
    monkeypatch.setitem(_launch.LAUNCH, "pdl", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _launch.use_pdl(FakeCuda())
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: (8, 0))
    monkeypatch.setattr(_launch, "_supports_pdl", _launch.functools.cache(_launch._supports_pdl.__wrapped__))
    assert not _launch.use_pdl(FakeCuda())
