"""Helpers shared by the benchmark scripts: timing, a printed table, and JSON with its environment.

Scripts import it as `from _common import ...` after putting `benchmarks/` on sys.path.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_ms(
    fn: Callable[[], object],
    repeats: int = 5,
    warmup: int = 1,
    min_time_s: float = 0.0,
    max_repeats: int = 200,
) -> dict:
    """Run `fn` `warmup` times, then time at least `repeats` runs, and more (up to `max_repeats`) until
    `min_time_s` seconds are spent, so that fast ops get enough samples for a stable median.
    GPU work is synchronized. Returns {"median_ms", "min_ms", "repeats"}."""
    for _ in range(warmup):
        fn()
    _sync()
    times: list[float] = []
    while len(times) < max(1, repeats) or (sum(times) < min_time_s * 1e3 and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": len(times)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or installed without a version
        return None


def environment() -> dict:
    """Where and when a benchmark ran: device, versions, date (UTC) and the exact command."""
    cuda = torch.cuda.is_available()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": _version("triton"),
            "mambakit": _version("mambakit"),
        },
    }


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows as an aligned text table; floats with 2 decimals, None as '-'."""

    def cell(v: object) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write `payload` as indented JSON, creating the folder; the file appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


def cuda_kernel_totals(prof) -> dict[str, tuple[int, float]]:
    """kernel name -> (launches, device microseconds) over a finished torch.profiler run."""
    totals: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            entry = totals.setdefault(ev.name, [0, 0.0])
            entry[0] += 1
            entry[1] += ev.device_time
    return {name: (int(n), us) for name, (n, us) in totals.items()}


def profiled_kernel_totals(step, reps: int, warmup: int) -> dict[str, tuple[int, float]]:
    """`cuda_kernel_totals` over `reps` profiled calls of `step()`, after `warmup` untimed ones (compile
    and tune outside the profile)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    return cuda_kernel_totals(prof)


def profile_kernels(step, reps: int = 5, top: int = 15) -> list[dict]:
    """GPU time per kernel (ms per call, launches per call) of `step()`, from torch.profiler: three
    untimed calls first, then `reps` profiled ones."""
    rows = [
        {"kernel": name[:60], "ms_per_call": us / 1e3 / reps, "launches": n // reps}
        for name, (n, us) in profiled_kernel_totals(step, reps, warmup=3).items()
    ]
    rows.sort(key=lambda r: -r["ms_per_call"])
    return rows[:top]
