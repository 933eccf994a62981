"""Run logs: metrics.csv (one row a step and split) and TensorBoard scalars when tensorboard is installed."""

from __future__ import annotations

import csv
from pathlib import Path

from tqdm.auto import tqdm

CSV_FIELDS = ("step", "split", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s")


class MetricsLogger:
    """metrics.csv (rows kept up to the resumed step), TensorBoard when installed; rank 0 only."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path = run_dir / "metrics.csv"
        kept = []
        if start_step > 0 and self.path.is_file():
            with open(self.path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, CSV_FIELDS)
            w.writeheader()
            w.writerows(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            tqdm.write("tensorboard is not installed: logging to metrics.csv only (pip install tensorboard)")
        else:
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def log(self, rows: list[dict]) -> None:
        if not self.enabled or not rows:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, CSV_FIELDS).writerows(rows)
        if self.tb is not None:
            for r in rows:
                for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                    if r.get(k) not in (None, ""):
                        self.tb.add_scalar(f"{r['split']}/{k}", float(r[k]), int(r["step"]))
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
