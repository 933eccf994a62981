"""`mambakit info`: versions, available backends and devices, for bug reports and a first check."""

from __future__ import annotations

import argparse
import os
import platform

import torch

import mambakit
from mambakit.ops import BACKENDS
from mambakit.ops._backend import resolve_backend, triton_available

OPS = ("selective_scan", "ssd", "conv1d", "norm", "cross_entropy", "mamba1_step", "mamba2_step")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def _implemented(op: str) -> tuple[str, ...]:
    import importlib

    return importlib.import_module(f"mambakit.ops.{op}.api")._IMPLEMENTED


def run(args: argparse.Namespace) -> int:
    del args
    print(f"mambakit {mambakit.__version__}")
    print(f"python   {platform.python_version()} ({platform.machine()}, {platform.system()})")
    print(f"torch    {torch.__version__} (threads: {torch.get_num_threads()})")
    if triton_available():
        import triton

        print(f"triton   {triton.__version__}")
    else:
        print("triton   not installed (GPU kernels unavailable; the torch backend is used)")
    print(f"MAMBAKIT_BACKEND={os.environ.get('MAMBAKIT_BACKEND', 'auto')}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}   {torch.cuda.get_device_name(i)}")
            devices.append(torch.device("cuda", i))
    else:
        print("cuda     not available")
    print(f"\n{'op':16s} {'implemented':32s} " + " ".join(f"auto@{d}" for d in devices))
    for op in OPS:
        impl = _implemented(op)
        picks = [resolve_backend("auto", d, impl) for d in devices]
        print(f"{op:16s} {', '.join(b for b in BACKENDS if b in impl):32s} " + " ".join(picks))
    return 0
