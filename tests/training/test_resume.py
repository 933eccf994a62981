"""Exact resume on CPU: a run stopped at step k (by stop_after, or by SIGTERM to a subprocess) and
resumed gives the same losses, bit for bit, as the run that never stopped."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import torch

from mambakit.training.checkpoint import latest_checkpoint
from mambakit.training.trainer import train
from tests.training.conftest import tiny_config, tiny_overrides


def _toml(v: object) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def test_stop_and_resume_bit_identical(corpus, tmp_path):
    full = train(tiny_config(corpus, tmp_path / "a"))
    assert sorted(full.losses) == [1, 2, 3, 4, 5, 6] and full.interrupted is None
    assert all(torch.isfinite(torch.tensor(v)) for v in full.losses.values())
    assert full.losses[6] < full.losses[1]  # it learns

    first = train(tiny_config(corpus, tmp_path / "b", **{"train.stop_after": 4}))
    assert first.interrupted == "stop_after" and first.step == 4
    assert first.checkpoint.name == "step_00000004"
    second = train(tiny_config(corpus, tmp_path / "b"), resume=first.run_dir)
    assert sorted(second.losses) == [5, 6]
    assert {**first.losses, **second.losses} == full.losses  # exact float equality
    assert second.val_losses == {6: full.val_losses[6]}
    # the CSV holds each step once after the resume
    with open(second.run_dir / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_sigterm_saves_and_resume_matches(corpus, tmp_path):
    # warmup longer than any run: the lr of a step then does not depend on train.steps, so a run cut
    # by a signal at an unknown step k can be compared with an uninterrupted run of k + 2 steps
    common = {"optim.warmup_steps": 10_000, "train.eval_every": 0, "train.save_every": 0}
    over = tiny_overrides(corpus, tmp_path / "sig", **common, **{"train.steps": 100_000})
    cmd = [sys.executable, "-m", "mambakit", "train", *[f"--set={k}={_toml(v)}" for k, v in over.items()]]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "sig" / "run" / "metrics.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:  # header + 2 steps
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    ckpt = latest_checkpoint(tmp_path / "sig" / "run")
    k = int(ckpt.name.split("_")[1])
    assert k >= 2 and "SIGTERM" in out
    with open(metrics) as f:
        before = {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}
    assert max(before) == k  # the signal was handled at the end of a step, whose checkpoint was saved

    resumed = train(tiny_config(corpus, tmp_path / "sig", **common, **{"train.steps": k + 2}), resume=ckpt)
    full = train(tiny_config(corpus, tmp_path / "ref", **common, **{"train.steps": k + 2}))
    assert {**before, **resumed.losses} == full.losses
