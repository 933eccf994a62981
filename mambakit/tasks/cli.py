"""`mambakit task NAME`: train the task models on a synthetic task, evaluate them, print a table and
write results.json (and a plot) to --out.

    mambakit task selective-copying --models mamba1,lti --cpu
    mambakit task induction-heads --models mamba2,attention --cpu
    mambakit task mqar --models mamba2,hybrid --cpu
    mambakit task phonebook --models mamba2,hybrid,attention --cpu

Without --cpu the task has the paper's settings (and training runs sized for a GPU).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from mambakit.tasks.induction_heads import InductionHeads
from mambakit.tasks.models import MODEL_NAMES, build_task_model
from mambakit.tasks.mqar import MQAR
from mambakit.tasks.phonebook import Phonebook
from mambakit.tasks.selective_copying import SelectiveCopying
from mambakit.tasks.train import TrainSettings, evaluate, train


@dataclass(frozen=True)
class TaskSpec:
    task: type
    gpu: TrainSettings
    cpu: TrainSettings
    eval_examples: int


TASKS: dict[str, TaskSpec] = {
    "selective-copying": TaskSpec(
        SelectiveCopying,
        TrainSettings(steps=20000, batch_size=64, lr=1e-3),
        TrainSettings(steps=1500, lr=5e-3),
        512,
    ),
    # the Mamba paper's optimizer for this task: no weight decay, constant lr (Appendix E.1). With
    # AdamW's 0.1 and a cosine, Mamba-1 at --cpu fell to 0.44 at 32x its training length; without, 1.00
    "induction-heads": TaskSpec(
        InductionHeads,
        TrainSettings(steps=20000, batch_size=64, lr=1e-3, weight_decay=0.0, min_lr_ratio=1.0),
        TrainSettings(steps=1000, lr=5e-3, weight_decay=0.0, min_lr_ratio=1.0),
        64,
    ),
    "mqar": TaskSpec(
        MQAR, TrainSettings(steps=20000, batch_size=64, lr=1e-3), TrainSettings(steps=3000, lr=1e-3), 256
    ),
    "phonebook": TaskSpec(
        Phonebook, TrainSettings(steps=20000, batch_size=32, lr=1e-3), TrainSettings(steps=4000, lr=1e-3), 256
    ),
}


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(TASKS), help="the synthetic task")
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help=f"comma-separated, of {MODEL_NAMES}")
    parser.add_argument("--cpu", action="store_true", help="the small CPU setting of the task and training")
    parser.add_argument("--seqlen", type=int, help="override the task's training length")
    parser.add_argument("--num-tokens", type=int, help="selective copying: tokens to memorize")
    parser.add_argument("--num-kv-pairs", type=int, help="mqar: key-value pairs")
    parser.add_argument("--num-entries", type=int, help="phonebook: entries")
    parser.add_argument("--num-queries", type=int, help="phonebook: queries after the book")
    parser.add_argument("--vocab-size", type=int, help="override the task's vocabulary")
    parser.add_argument("--eval-lengths", type=_int_list, help="induction heads: comma-separated lengths")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--d-state", type=int, help="SSM state size (default 16 for Mamba-1, 64 for Mamba-2)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument(
        "--weight-decay", type=float, help="AdamW weight decay (default 0.1; 0 for induction heads)"
    )
    parser.add_argument(
        "--min-lr-ratio",
        type=float,
        help="final / peak lr of the cosine (default 0.1; 1 = constant, the induction-heads default)",
    )
    parser.add_argument("--eval-examples", type=int)
    parser.add_argument("--eval-tokens", type=int, default=2**16, help="tokens in one evaluation batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/tasks", help="directory for results.json and plots")


def build_task(args: argparse.Namespace):
    spec = TASKS[args.name]
    task = spec.task.cpu() if args.cpu else spec.task.paper()
    overrides = {
        "seqlen": args.seqlen,
        "num_tokens": args.num_tokens,
        "num_kv_pairs": args.num_kv_pairs,
        "num_entries": args.num_entries,
        "num_queries": args.num_queries,
        "vocab_size": args.vocab_size,
        "eval_lengths": tuple(args.eval_lengths) if args.eval_lengths else None,
    }
    fields = asdict(task)
    for key, value in overrides.items():
        if value is not None:
            if key not in fields:
                raise ValueError(f"--{key.replace('_', '-')} does not apply to task {args.name}")
            fields[key] = value
    return spec.task(**fields)


def _on_device(sample, device: str):
    def wrapped(batch_size: int, generator: torch.Generator):
        batch = sample(batch_size, generator)
        batch.input_ids, batch.targets = batch.input_ids.to(device), batch.targets.to(device)
        return batch

    return wrapped


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown or not models:
        raise SystemExit(f"--models must be a comma-separated list of {MODEL_NAMES}, got {args.models!r}")
    spec = TASKS[args.name]
    task = build_task(args)
    settings = spec.cpu if args.cpu else spec.gpu
    settings = replace(
        settings,
        seed=args.seed,
        **{
            k: v
            for k, v in (
                ("steps", args.steps),
                ("batch_size", args.batch_size),
                ("lr", args.lr),
                ("weight_decay", args.weight_decay),
                ("min_lr_ratio", args.min_lr_ratio),
            )
            if v is not None
        },
    )
    n_eval = args.eval_examples or spec.eval_examples
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"task {args.name}: {task}")
    print(f"training: {settings}")
    results = {"task": args.name, "settings": asdict(task), "training": asdict(settings), "models": {}}
    for name in models:
        torch.manual_seed(args.seed)
        model = build_task_model(name, task.vocab_size, args.d_model, args.n_layers, args.d_state).to(
            args.device
        )
        print(f"{name}: pattern {model.config.pattern}, {model.num_parameters():,} parameters")
        log = train(model, _on_device(task.sample, args.device), settings, log=print)
        entry = {
            "pattern": model.config.pattern,
            "parameters": model.num_parameters(),
            "train_seconds": round(log.seconds, 1),
            "final_loss": log.losses[-1],
            "train_accuracy": log.train_accuracy,
        }
        if isinstance(task, InductionHeads):
            entry["accuracy_by_length"] = {}
            for length in task.eval_lengths:
                start = time.perf_counter()

                def sample(b, g, length=length):
                    return task.sample(b, g, seqlen=length)

                batch_size = max(1, args.eval_tokens // length)
                examples = max(min(n_eval, 4 * batch_size), min(n_eval, 32))
                acc = evaluate(
                    model, _on_device(sample, args.device), examples, batch_size, seed=args.seed + 1
                )
                entry["accuracy_by_length"][length] = acc
                print(f"  eval length {length:8d}: accuracy {acc:.3f} ({examples} examples, "
                      f"{time.perf_counter() - start:.1f} s)")  # fmt: skip
        else:
            entry["accuracy"] = evaluate(
                model, _on_device(task.sample, args.device), n_eval, settings.batch_size, seed=args.seed + 1
            )
            print(f"  eval accuracy {entry['accuracy']:.3f}")
        results["models"][name] = entry
        (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    if isinstance(task, InductionHeads):
        plot_lengths(results, out / "induction_heads.png")
    print(f"wrote {out / 'results.json'}")
    return 0


def print_table(results: dict) -> None:
    models = results["models"]
    first = next(iter(models.values()))
    if "accuracy_by_length" in first:
        lengths = list(first["accuracy_by_length"])
        print("| model | params | " + " | ".join(str(n) for n in lengths) + " |")
        print("| --- | --- | " + " | ".join("---" for _ in lengths) + " |")
        for name, e in models.items():
            accs = " | ".join(f"{e['accuracy_by_length'][n]:.2f}" for n in lengths)
            print(f"| {name} | {e['parameters']:,} | {accs} |")
    else:
        print("| model | pattern | params | accuracy | train s |")
        print("| --- | --- | --- | --- | --- |")
        for name, e in models.items():
            print(
                f"| {name} | {e['pattern']} | {e['parameters']:,} | {e['accuracy']:.3f} "
                f"| {e['train_seconds']} |"
            )


def plot_lengths(results: dict, path: Path) -> None:
    """Accuracy against evaluation length (log2 axis), one line a model, the training length marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, e in results["models"].items():
        lengths = [int(n) for n in e["accuracy_by_length"]]
        ax.plot(lengths, list(e["accuracy_by_length"].values()), marker="o", label=name)
    ax.axvline(results["settings"]["seqlen"], color="gray", linestyle="--", label="training length")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("evaluation sequence length")
    ax.set_ylabel("accuracy")
    ax.set_title("induction heads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
