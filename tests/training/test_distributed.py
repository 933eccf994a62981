"""Distributed training on CPU (gloo, 2 processes under torchrun): DDP, FSDP2, tensor and context
parallelism give the losses of a 1-process run with the same global batch, and checkpoints move between
2 processes and 1 both ways."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from mambakit.training.trainer import train
from tests.training.conftest import tiny_config, tiny_overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml(v: object) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _torchrun_cmd(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "-m", "mambakit", "train", *args]  # fmt: skip


ENV = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}


def _torchrun(args: list[str], nproc: int = 2) -> str:
    proc = subprocess.run(_torchrun_cmd(args, nproc), env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _losses(run_dir, split="train") -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["split"] == split}


def _close(a: dict[int, float], b: dict[int, float], rel: float = 1e-5) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-6), (k, a[k], b[k])


def test_ddp_fsdp_match_one_process_and_checkpoints_move(corpus, tmp_path):
    extra = {"train.device": "cpu"}
    # 1 process: global batch 4 as 2 micro-batches of 2 (accumulation)
    ref = train(tiny_config(corpus, tmp_path / "one", **extra))
    shutil.copytree(ref.run_dir, tmp_path / "one_copy" / "run")

    # 2 processes, DDP: global batch 4 as one micro-batch of 2 on each
    over = tiny_overrides(corpus, tmp_path / "ddp", **extra)
    out = _torchrun([f"--set={k}={_toml(v)}" for k, v in over.items()])
    assert "2 process(es)" in out
    ddp_dir = tmp_path / "ddp" / "run"
    _close(_losses(ddp_dir), ref.losses)
    _close(_losses(ddp_dir, "val"), ref.val_losses)

    # a checkpoint written by 2 processes resumes in 1
    resumed = train(
        tiny_config(corpus, tmp_path / "ddp", **extra), resume=ddp_dir / "checkpoints" / "step_00000003"
    )
    _close(resumed.losses, {k: v for k, v in ref.losses.items() if k > 3})

    # a checkpoint written by 1 process resumes in 2, sharded with FSDP2 (fully_shard)
    ckpt = tmp_path / "one_copy" / "run" / "checkpoints" / "step_00000003"
    _torchrun(["--resume", str(ckpt), "--set", "distributed.strategy=fsdp"])
    fsdp = _losses(tmp_path / "one_copy" / "run")
    _close({k: v for k, v in fsdp.items() if k > 3}, {k: v for k, v in ref.losses.items() if k > 3})
    _close(_losses(tmp_path / "one_copy" / "run", "val"), ref.val_losses)


def test_sigterm_under_torchrun_saves_on_every_rank_at_one_step(corpus, tmp_path):
    over = tiny_overrides(
        corpus, tmp_path, **{"train.device": "cpu", "train.steps": 100_000, "train.save_every": 0}
    )
    cmd = _torchrun_cmd([f"--set={k}={_toml(v)}" for k, v in over.items()])
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    steps = sorted(_losses(tmp_path / "run"))
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == [f"step_{steps[-1]:08d}"], out
    assert "SIGTERM" in out


def test_tp_and_cp_match_one_process_and_checkpoints_move(corpus, tmp_path):
    """distributed.strategy tp (tensor parallel) and cp (the sequence split) over 2 processes train
    the 1-process losses; a tp checkpoint resumes in 1 process and a 1-process one under tp."""
    extra = {"train.device": "cpu", "model.attn.num_kv_heads": 2}  # tp splits the KV heads
    ref = train(tiny_config(corpus, tmp_path / "one", **extra))
    shutil.copytree(ref.run_dir, tmp_path / "one_copy" / "run")
    for strategy in ("tp", "cp"):
        over = tiny_overrides(corpus, tmp_path / strategy, **extra, **{"distributed.strategy": strategy})
        _torchrun([f"--set={k}={_toml(v)}" for k, v in over.items()])
        run_dir = tmp_path / strategy / "run"
        _close(_losses(run_dir), ref.losses, rel=1e-4)
        _close(_losses(run_dir, "val"), ref.val_losses, rel=1e-4)

    # a checkpoint written under tp (sharded weights and moments, gathered) resumes in 1 process
    resumed = train(
        tiny_config(corpus, tmp_path / "tp", **extra),
        resume=tmp_path / "tp" / "run" / "checkpoints" / "step_00000003",
    )
    _close(resumed.losses, {k: v for k, v in ref.losses.items() if k > 3}, rel=1e-4)

    # a checkpoint written by 1 process resumes under tp (each process takes its shards)
    ckpt = tmp_path / "one_copy" / "run" / "checkpoints" / "step_00000003"
    _torchrun(["--resume", str(ckpt), "--set", "distributed.strategy=tp"])
    tp = _losses(tmp_path / "one_copy" / "run")
    _close({k: v for k, v in tp.items() if k > 3}, {k: v for k, v in ref.losses.items() if k > 3}, rel=1e-4)


def test_fsdp_x_tp_on_4_processes_matches_one_process_and_checkpoints_move(corpus, tmp_path):
    """distributed.strategy fsdp_tp on 4 processes (2 TP groups of 2, FSDP2 across them) trains the
    1-process losses, and checkpoints move to and from 1 process."""
    extra = {"train.device": "cpu", "model.attn.num_kv_heads": 2}
    ref = train(tiny_config(corpus, tmp_path / "one", **extra))
    shutil.copytree(ref.run_dir, tmp_path / "one_copy" / "run")
    over = tiny_overrides(corpus, tmp_path / "2d", **extra, **{"distributed.strategy": "fsdp_tp"})
    out = _torchrun([f"--set={k}={_toml(v)}" for k, v in over.items()], nproc=4)
    assert "4 process(es)" in out
    _close(_losses(tmp_path / "2d" / "run"), ref.losses, rel=1e-4)
    _close(_losses(tmp_path / "2d" / "run", "val"), ref.val_losses, rel=1e-4)

    later = {k: v for k, v in ref.losses.items() if k > 3}
    resumed = train(
        tiny_config(corpus, tmp_path / "2d", **extra),
        resume=tmp_path / "2d" / "run" / "checkpoints" / "step_00000003",
    )
    _close(resumed.losses, later, rel=1e-4)
    ckpt = tmp_path / "one_copy" / "run" / "checkpoints" / "step_00000003"
    _torchrun(["--resume", str(ckpt), "--set", "distributed.strategy=fsdp_tp"], nproc=4)
    _close({k: v for k, v in _losses(tmp_path / "one_copy" / "run").items() if k > 3}, later, rel=1e-4)
