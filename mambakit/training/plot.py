"""`mambakit plot RUN_DIR`: the curves of a run (metrics.csv) as PNG files beside it.

Writes `loss.png` (training loss per step, validation loss at its steps) and `throughput.png` (tokens/s
per logged step). Needs matplotlib (the `train` extra).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def read_metrics(run_dir: str | Path) -> dict[str, list[dict[str, float]]]:
    """Rows of metrics.csv grouped by split, numbers as floats (empty cells left out)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run directory of `mambakit train`?")
    out: dict[str, list[dict[str, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            split = row.pop("split")
            out.setdefault(split, []).append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write loss.png and throughput.png for a run; returns their paths."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'mambakit[train]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    metrics = read_metrics(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = metrics.get("train", []), metrics.get("val", [])
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats / token)", title=f"{Path(run_dir).name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(out_dir / "loss.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    rows = [r for r in train if "tokens_per_s" in r]
    ax.plot([r["step"] for r in rows], [r["tokens_per_s"] for r in rows], lw=1)
    ax.set(xlabel="step", ylabel="tokens / s", title=f"{Path(run_dir).name}: throughput")
    ax.grid(alpha=0.3)
    paths.append(out_dir / "throughput.png")
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of `mambakit train`")
    parser.add_argument("--out", metavar="DIR", help="where to write the PNG files (default: RUN_DIR)")


def run(args: argparse.Namespace) -> int:
    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ImportError) as e:
        raise SystemExit(f"mambakit plot: {e}") from None
    for p in paths:
        print(f"wrote {p}")
    return 0
