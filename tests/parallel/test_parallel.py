"""Tensor and context parallelism on CPU (gloo): each worker script runs under torchrun with 2 and 4
processes and compares every rank's results with the one-process computation on the same weights and
data (see the workers' docstrings for what each checks); a mismatch fails the worker and this test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "MAMBAKIT_BACKEND": "torch"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: str, nproc: int, *args: str) -> str:
    script = os.path.join(ROOT, "tests", "parallel", script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), script, *args]  # fmt: skip
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=200, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.mark.parametrize("nproc", [2, 4])
def test_context_parallel_ops(nproc):
    assert f"ops OK on {nproc} ranks" in _torchrun("worker_ops.py", nproc)


@pytest.mark.parametrize("nproc", [2, 4])
def test_tensor_and_context_parallel_models(nproc):
    assert f"models OK on {nproc} ranks" in _torchrun("worker_models.py", nproc)


def test_2d_meshes_fsdp_x_tp_checkpoint_relayout_and_cp_x_tp(tmp_path):
    assert "FSDP x TP and CP x TP OK on 4 ranks" in _torchrun("worker_2d.py", 4, str(tmp_path))
