"""Tests of backend selection (`ops/_backend.py`) and the argument checks (`ops/_checks.py`)."""

from __future__ import annotations

import pytest
import torch

from mambakit.ops import _backend, causal_conv1d
from mambakit.ops._backend import resolve_backend
from mambakit.ops._checks import (
    check_any_rank,
    check_divides,
    check_optional,
    check_positive_int,
    check_seq_idx,
    check_tensor,
)

CPU = torch.device("cpu")
ALL = ("reference", "torch", "triton")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("MAMBAKIT_BACKEND", raising=False)


def test_auto_is_torch_on_cpu():
    assert resolve_backend("auto", CPU, ALL) == "torch"
    assert resolve_backend("auto", CPU, ("reference", "torch")) == "torch"


def test_auto_picks_triton_for_cuda_only_when_implemented(monkeypatch):
    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, ALL) == "triton"
    assert resolve_backend("auto", cuda, ("reference", "torch")) == "torch"
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    assert resolve_backend("auto", cuda, ALL) == "torch"


def test_explicit_backends():
    assert resolve_backend("reference", CPU, ALL) == "reference"
    assert resolve_backend("torch", CPU, ALL) == "torch"


def test_env_overrides_auto_only(monkeypatch):
    monkeypatch.setenv("MAMBAKIT_BACKEND", "reference")
    assert resolve_backend("auto", CPU, ALL) == "reference"
    assert resolve_backend("torch", CPU, ALL) == "torch"  # an explicit argument wins
    monkeypatch.setenv("MAMBAKIT_BACKEND", "auto")
    assert resolve_backend("auto", CPU, ALL) == "torch"


def test_env_override_reaches_the_op(monkeypatch):
    import mambakit.ops.conv1d.reference as ref
    import mambakit.ops.conv1d.torch as tor

    calls = []
    for name, mod in (("reference", ref), ("torch", tor)):
        real = mod.causal_conv1d_impl
        monkeypatch.setattr(mod, "causal_conv1d_impl", lambda *a, n=name, f=real: calls.append(n) or f(*a))
    x, w = torch.randn(1, 3, 2), torch.randn(2, 2)
    causal_conv1d(x, w)
    monkeypatch.setenv("MAMBAKIT_BACKEND", "reference")
    causal_conv1d(x, w)
    causal_conv1d(x, w, backend="torch")
    assert calls == ["torch", "reference", "torch"]


def test_unknown_backend_names_backend(monkeypatch):
    with pytest.raises(ValueError, match="argument backend='cuda'"):
        resolve_backend("cuda", CPU, ALL)
    monkeypatch.setenv("MAMBAKIT_BACKEND", "fast")
    with pytest.raises(ValueError, match="MAMBAKIT_BACKEND='fast'"):
        resolve_backend("auto", CPU, ALL)


def test_unimplemented_backend_names_backend(monkeypatch):
    with pytest.raises(ValueError, match="backend='triton'.*implements only"):
        resolve_backend("triton", CPU, ("reference", "torch"))
    monkeypatch.setenv("MAMBAKIT_BACKEND", "triton")
    with pytest.raises(ValueError, match="MAMBAKIT_BACKEND='triton'"):
        resolve_backend("auto", CPU, ("reference", "torch"))


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
        resolve_backend("triton", CPU, ALL)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", CPU, ALL) == "triton"
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="Triton does not import"):
        resolve_backend("triton", CPU, ALL)


def test_public_entry_rejects_bad_backend():
    x, w = torch.randn(1, 3, 2), torch.randn(2, 2)
    with pytest.raises(ValueError, match="backend"):
        causal_conv1d(x, w, backend="nope")


def test_check_tensor_messages():
    t = torch.zeros(2, 3)
    assert check_tensor("a", t, (2, None)) is t
    with pytest.raises(TypeError, match="a must be a torch.Tensor, got list"):
        check_tensor("a", [1.0], (1,))
    with pytest.raises(ValueError, match=r"a must have shape \(2, \*, 1\), got \(2, 3\)"):
        check_tensor("a", t, (2, None, 1))
    with pytest.raises(ValueError, match=r"a must have shape \(3, \*\)"):
        check_tensor("a", t, (3, None))
    with pytest.raises(TypeError, match="a must have dtype.*got torch.int64"):
        check_tensor("a", t.long(), (2, 3))
    with pytest.raises(ValueError, match="a is on cpu but the other inputs are on meta"):
        check_tensor("a", t, (2, 3), device=torch.device("meta"))


def test_check_helpers():
    assert check_optional("b", None, (1,)) is None
    with pytest.raises(ValueError, match="b must have shape"):
        check_optional("b", torch.zeros(2), (1,))
    assert check_any_rank("x", torch.zeros(2, 3, 4)).shape == (2, 3, 4)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        check_any_rank("x", 3.0)
    assert check_positive_int("chunk_size", 4) == 4
    for bad in (0, -1, 2.0, True, "4"):
        with pytest.raises(ValueError, match="chunk_size"):
            check_positive_int("chunk_size", bad)
    check_divides("group_size", 4, "dim", 8)
    with pytest.raises(ValueError, match="group_size=3 must be positive and divide dim=8"):
        check_divides("group_size", 3, "dim", 8)


def test_check_seq_idx():
    check_seq_idx(None, 2, 3, CPU)
    check_seq_idx(torch.tensor([[0, 0, 1], [4, 5, 5]]), 2, 3, CPU)
    with pytest.raises(ValueError, match="seq_idx must be non-decreasing"):
        check_seq_idx(torch.tensor([[0, 1, 0]]), 1, 3, CPU)
    with pytest.raises(ValueError, match="seq_idx must have shape"):
        check_seq_idx(torch.zeros(1, 4, dtype=torch.int32), 1, 3, CPU)
    with pytest.raises(TypeError, match="seq_idx must have dtype"):
        check_seq_idx(torch.zeros(1, 3), 1, 3, CPU)


def test_backend_modules_import_on_first_use_and_once():
    """Each op's `_impl` (ops/_backend.py BackendModules) imports a backend module when first asked,
    and hands back the same module after."""
    import sys

    from mambakit.ops._backend import BackendModules

    impl = BackendModules("mambakit.ops.norm", ("reference", "torch"))
    assert impl.implemented == ("reference", "torch")
    module = impl("reference")
    assert module is sys.modules["mambakit.ops.norm.reference"] and impl("reference") is module
    assert hasattr(impl("torch"), "rms_norm_impl")
    with pytest.raises(ModuleNotFoundError):
        impl("nonexistent")
