"""Backend selection shared by every op: one rule for `backend="auto"` and one error for a bad name."""

from __future__ import annotations

import importlib
import os

import torch

BACKENDS = ("reference", "torch", "triton")


_TRITON_IMPORTS: bool | None = None


def triton_available() -> bool:
    """True when Triton imports (it needs a CUDA device unless TRITON_INTERPRET=1). Remembered in a
    module global rather than by `functools.cache`: torch.compile traces this call inside the ops, and
    Dynamo warns about (and bypasses) cache wrappers."""
    global _TRITON_IMPORTS
    if _TRITON_IMPORTS is None:
        try:
            import triton  # noqa: F401

            _TRITON_IMPORTS = True
        except Exception:
            _TRITON_IMPORTS = False
    return _TRITON_IMPORTS


def resolve_backend(backend: str, device: torch.device, implemented: tuple[str, ...]) -> str:
    """Turn a user's `backend=` into the name of an implementation that exists for this op.

    `"auto"` picks Triton for CUDA tensors when Triton imports and the op has a Triton kernel, else
    the chunked PyTorch backend. `MAMBAKIT_BACKEND` overrides `"auto"` (only `"auto"`: an explicit
    argument always wins). Asking for a backend the op does not have is an error, never a silent
    fallback.
    """
    if backend == "auto":
        backend = os.environ.get("MAMBAKIT_BACKEND", "auto")
        if backend == "auto":
            use_triton = device.type == "cuda" and "triton" in implemented and triton_available()
            return "triton" if use_triton else "torch"
        where = "environment variable MAMBAKIT_BACKEND"
    else:
        where = "argument backend"
    if backend not in BACKENDS:
        raise ValueError(f"{where}={backend!r} is not one of {('auto',) + BACKENDS}")
    if backend not in implemented:
        raise ValueError(f"{where}={backend!r}: this op implements only {implemented}")
    if backend == "triton":
        if not triton_available():
            raise ValueError(f"{where}='triton' but Triton does not import; install triton or use 'torch'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"{where}='triton' needs CUDA tensors (got {device.type}); "
                "set TRITON_INTERPRET=1 to run the kernels on the CPU through Triton's interpreter"
            )
    return backend


class BackendModules:
    """An op package's backend modules (`reference.py`, `torch.py`, `triton/`), imported on first use:
    Triton's import is slow and useful only with a GPU or the interpreter.

        _impl = BackendModules(__package__)
        name = resolve_backend(backend, x.device, _impl.implemented)
        _impl(name).my_op_impl(...)
    """

    def __init__(self, package: str, implemented: tuple[str, ...] = BACKENDS) -> None:
        self.package = package
        self.implemented = implemented
        self._loaded: dict = {}

    def __call__(self, backend: str):
        module = self._loaded.get(backend)
        if module is None:
            module = self._loaded[backend] = importlib.import_module(f".{backend}", self.package)
        return module
