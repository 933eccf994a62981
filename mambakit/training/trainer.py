"""The training loop: one readable function, `train(cfg)`, from a `TrainConfig` to a finished run directory.

A step: the global batch of rows for this step (a pure function of seed and step, see data.StepSampler)
is cut into micro-batches, this process's share is run forward and backward (gradients accumulate;
the loss of each micro-batch is its summed cross-entropy over the number of targets of the whole global
batch, so the gradient is the same whatever the split over processes and micro-batches), gradients are
clipped, AdamW steps, the schedule advances. Around it: validation loss, atomic checkpoints, CSV and
TensorBoard logs, a tqdm bar, and SIGTERM/SIGINT handling that saves a checkpoint before leaving.

Run directory: config.toml (resolved), metrics.csv and tb/ (metrics.py), checkpoints/step_*/
(checkpoint.py); token files in a cache beside the runs (token_cache.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from mambakit.models.checkpoint import from_pretrained
from mambakit.models.config import ModelConfig
from mambakit.models.lm import LanguageModel
from mambakit.models.presets import preset
from mambakit.training import distributed as D
from mambakit.training import layout as L
from mambakit.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from mambakit.training.checkpoint import rng_state as current_rng_state
from mambakit.training.config import TrainConfig, dump_toml
from mambakit.training.cuda_graph import GraphedMicroStep
from mambakit.training.data import PackedRows, StepSampler, shard_rows
from mambakit.training.layout import Layout, layout, split_sequence
from mambakit.training.loss import IGNORE_INDEX, lm_loss
from mambakit.training.metrics import MetricsLogger
from mambakit.training.optim import build_optimizer, build_scheduler
from mambakit.training.sample import sample
from mambakit.training.token_cache import prepare_data
from mambakit.training.tokenizer import load_tokenizer


@dataclass
class TrainResult:
    """What a run did. losses[s] is the training loss of optimizer step s (1-based)."""

    run_dir: Path
    step: int
    losses: dict[int, float] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    interrupted: str | None = None  # "SIGTERM", "SIGINT" or "stop_after" when the loop left early
    sample: str | None = None


def resolve_model_config(model_section: dict, vocab_size: int) -> ModelConfig:
    """The ModelConfig of a `[model]` table: its preset with every other key as an override;
    vocab_size defaults to the tokenizer's."""
    section = dict(model_section)
    name = section.pop("preset", None)
    if not isinstance(name, str):
        raise ValueError(f"model.preset must name a preset (e.g. 'tiny-mamba2'), got {name!r}")
    section.setdefault("vocab_size", vocab_size)
    config = preset(name, **section)
    if config.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size={config.vocab_size} is smaller than the tokenizer's {vocab_size}")
    return config


def resolved_config_dict(cfg: TrainConfig, model_config: ModelConfig) -> dict:
    tree = cfg.to_dict()
    tree["model"] = {"preset": cfg.model["preset"], **dataclasses.asdict(model_config)}
    return tree


def default_run_name(cfg: TrainConfig) -> str:
    return f"{cfg.model.get('preset', 'model')}-{time.strftime('%Y%m%d-%H%M%S')}"


def apply_activation_checkpointing(model: LanguageModel) -> None:
    """Recompute each block's activations in the backward pass instead of storing them. The block's
    forward is replaced on the instance, so parameter names (and checkpoints) do not change."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.backbone.layers:

        def forward(*args, _inner=layer.forward, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


class _Interrupt:
    """Records SIGTERM / SIGINT instead of dying, so the loop can save a checkpoint and leave; a second
    signal of the same kind acts as usual (the original handler is back)."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name
        signal.signal(signum, self._old[signum])

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@torch.no_grad()
def evaluate(
    model: nn.Module, rows: PackedRows, cfg: TrainConfig, info: D.DistInfo, autocast, lay: Layout
) -> float | None:
    """Mean cross-entropy over the first rows of the validation split (same rows every time)."""
    mb = micro_batch_size(cfg, lay.data_world)
    n = min(len(rows), cfg.train.eval_batches * cfg.train.batch_size) // (mb * lay.data_world)
    if n == 0:
        return None
    all_rows = torch.arange(n * mb * lay.data_world).numpy()
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    model.eval()
    for part in shard_rows(all_rows, mb, lay.data_rank, lay.data_world):
        batch = split_sequence(rows.batch(part), lay).to(info.device)
        with autocast:
            loss = lm_loss(model, batch.input_ids, batch.targets, batch.seq_idx)
        total += torch.stack([loss.double(), torch.tensor(float(batch.num_targets), device=info.device)])
    model.train()
    total = D.all_reduce(total, info) / lay.loss_replicas
    return float(total[0] / total[1].clamp(min=1))


def micro_batch_size(cfg: TrainConfig, data_world: int) -> int:
    """Rows a micro-batch holds; `data_world` processes share the micro-batches of a step."""
    mb = cfg.train.micro_batch_size or cfg.train.batch_size // data_world
    if mb <= 0 or cfg.train.batch_size % (mb * data_world):
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} must be a multiple of train.micro_batch_size * "
            f"data-parallel processes = {mb} * {data_world}"
        )
    return mb


def cpu_threads() -> int:
    """Threads for a CPU run when train.threads is not set: the cores the 1-minute load average leaves
    idle, at least 1, at most torch's default. On a machine shared with other jobs, more threads than
    idle cores make PyTorch's OpenMP workers wait on each other: measured on a 2-core machine at load 9,
    a step took 0.9 s with 1 thread and 2.5 to 8 s with 2. (Thread counts can change float rounding:
    set train.threads to resume bit for bit on another machine or load.)"""
    try:
        idle = (os.cpu_count() or 1) - round(os.getloadavg()[0])
    except OSError:  # no load average on this platform
        return torch.get_num_threads()
    return max(1, min(torch.get_num_threads(), idle))


def _check_config(cfg: TrainConfig) -> None:
    t = cfg.train
    for name in ("steps", "batch_size", "log_every", "eval_batches", "keep_last"):
        if getattr(t, name) <= 0:
            raise ValueError(f"train.{name} must be positive, got {getattr(t, name)}")
    if cfg.data.seq_len <= 0:
        raise ValueError(f"data.seq_len must be positive, got {cfg.data.seq_len}")
    if cfg.optim.lr <= 0 or cfg.optim.warmup_steps < 0 or not 0 <= cfg.optim.min_lr_ratio <= 1:
        raise ValueError("optim.lr must be > 0, optim.warmup_steps >= 0 and optim.min_lr_ratio in [0, 1]")


def train(cfg: TrainConfig, resume: str | Path | None = None) -> TrainResult:
    """Train as `cfg` says; `resume` is a run directory (its newest checkpoint) or a checkpoint directory.
    Under torchrun every process calls this; rank 0 alone writes files and prints."""
    _check_config(cfg)
    threads = torch.get_num_threads()
    info = D.init_distributed(cfg.train.device, cfg.distributed.backend)
    try:
        return _train(cfg, resume, info)
    finally:
        D.shutdown(info)
        torch.set_num_threads(threads)  # train.threads is for this run only (tests call train in-process)


def _train(cfg: TrainConfig, resume: str | Path | None, info: D.DistInfo) -> TrainResult:
    t = cfg.train
    say = tqdm.write if info.is_main else (lambda *a, **k: None)
    if t.threads or info.device.type == "cpu":
        torch.set_num_threads(t.threads or cpu_threads())

    # where: a resumed run continues in its own directory
    ckpt_path = None
    if resume is not None:
        ckpt_path = latest_checkpoint(resume)
        if ckpt_path is None:
            raise FileNotFoundError(f"--resume {resume}: no checkpoint there (looked for checkpoints/step_*)")
        run_dir = ckpt_path.parent.parent
    else:
        run_dir = Path(t.out) / D.broadcast_object(t.name or default_run_name(cfg), info)
        if latest_checkpoint(run_dir) is not None:  # a new run would mix its checkpoints with the old ones
            raise FileExistsError(
                f"run directory {run_dir} already has checkpoints: continue it with --resume {run_dir} "
                "or give another --name"
            )
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(t.seed)
    random.seed(t.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.eos_token)
    train_rows, val_rows = prepare_data(cfg, tokenizer, info)
    model_config = resolve_model_config(cfg.model, tokenizer.vocab_size)
    if info.is_main:
        (run_dir / "config.toml").write_text(dump_toml(resolved_config_dict(cfg, model_config)))

    model = LanguageModel(model_config).to(info.device)
    if t.activation_checkpointing:
        apply_activation_checkpointing(model)
    if t.compile:
        for layer in model.backbone.layers:
            layer.compile()
    n_params = sum(p.numel() for p in model.parameters())  # before sharding: the whole model
    lay = layout(cfg.distributed.strategy, info, cfg.data.seq_len, cfg.distributed.tp_size)
    model = L.parallelize_model(model, lay, info)
    optimizer = build_optimizer(model, cfg.optim)
    mb = micro_batch_size(cfg, lay.data_world)
    sampler = StepSampler(len(train_rows), t.batch_size, t.seed)
    data_state = {
        "num_rows": len(train_rows),
        "seq_len": cfg.data.seq_len,
        "seed": t.seed,
        "batch_size": t.batch_size,
    }

    step, elapsed = 0, 0.0
    if ckpt_path is not None:
        model_state, state = load_checkpoint(ckpt_path)
        saved = {k: v for k, v in state["data"].items() if k != "rows_consumed"}
        if saved != data_state:
            raise ValueError(
                f"checkpoint {ckpt_path} was trained with data {saved}, this run has {data_state}"
            )
        L.load_full_states(model, optimizer, model_state, state["optimizer"])
        set_rng_state(state["rng"])
        step, elapsed = int(state["step"]), float(state.get("elapsed_s", 0.0))
        say(f"resumed from {ckpt_path} at step {step}")
    # the schedule is rebuilt at the step reached (its saved state is kept in checkpoints for reference)
    scheduler = build_scheduler(optimizer, cfg.optim, t.steps, start_step=step)

    use_bf16 = t.precision == "bf16" or (t.precision == "auto" and info.device.type == "cuda")
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=use_bf16)
    tokens_per_step = t.batch_size * cfg.data.seq_len
    result = TrainResult(run_dir=run_dir, step=step)
    logger = MetricsLogger(run_dir, step, info.is_main)
    if info.is_main:
        say(
            f"run {run_dir}: {model_config.n_layer} layers '{model_config.pattern}', d_model "
            f"{model_config.d_model}, {n_params / 1e6:.2f}M parameters, "
            f"{len(train_rows.file) / 1e6:.2f}M training tokens, {info.world_size} process(es) on "
            f"{info.device.type}"
            + (f" ({torch.get_num_threads()} threads)" if info.device.type == "cpu" else "")
        )

    def save(at: int) -> Path | None:
        model_state, optim_state = L.full_states(model, optimizer)  # collective: every rank takes part
        path = None
        if info.is_main:
            state = {
                "optimizer": optim_state,
                "scheduler": scheduler.state_dict(),
                "rng": current_rng_state(),
                "data": {**data_state, "rows_consumed": at * t.batch_size},
                "world_size": info.world_size,
                "elapsed_s": elapsed,
            }
            path = save_checkpoint(run_dir, at, model_state, model_config, state, t.keep_last)
        D.barrier(info)
        return path

    pending: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
    window_time, window_steps = 0.0, 0  # compute time and steps since the last log line
    bar = tqdm(
        total=t.steps,
        initial=step,
        disable=not (info.is_main and t.progress),
        unit="step",
        dynamic_ncols=True,
    )

    def flush() -> None:
        nonlocal window_time, window_steps
        rate = window_steps * tokens_per_step / max(window_time, 1e-9)
        rows = []
        for s, loss, gnorm, lr in pending:
            value = float(loss)
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"training loss is {value} at step {s}; lower optim.lr or check the data"
                )
            result.losses[s] = value
            rows.append(
                {"step": s, "split": "train", "loss": value, "lr": lr, "grad_norm": float(gnorm),
                 "tokens": s * tokens_per_step, "tokens_per_s": round(rate, 1),
                 "elapsed_s": round(elapsed, 3)}
            )  # fmt: skip
        if rows:
            bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
        logger.log(rows)
        pending.clear()
        window_time, window_steps = 0.0, 0

    graphed = graphed_micro_step(cfg, model, model_config, autocast, info, say)

    model.train()
    with _Interrupt() as interrupt:
        while step < t.steps:
            t0 = time.perf_counter()
            rows = sampler.rows_for_step(step)
            n_targets = max(1, train_rows.num_targets(rows))
            micro = shard_rows(rows, mb, lay.data_rank, lay.data_world)
            loss_sum = torch.zeros((), device=info.device)
            for i, part in enumerate(micro):
                batch = split_sequence(train_rows.batch(part), lay).to(info.device)
                if graphed is not None:
                    loss = graphed(lay.grad_scale / n_targets, batch.input_ids, batch.targets, batch.seq_idx)
                else:
                    with D.grad_sync(model, i == len(micro) - 1):
                        with autocast:  # summed cross-entropy, chunked: the logits never exist whole
                            loss = lm_loss(model, batch.input_ids, batch.targets, batch.seq_idx)
                        # the data-parallel wrappers average gradients over processes: grad_scale undoes it
                        (loss * (lay.grad_scale / n_targets)).backward()
                loss_sum += loss.detach()
            if info.enabled and lay.strategy == "cp":
                L.sum_gradients_cp(model)
            max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
            grad_norm = L.clip_grad_norm(model, max_norm)
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
                grad_norm = grad_norm.full_tensor()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=graphed is None)  # a graph writes into the same .grad
            step += 1
            loss_sum = D.all_reduce(loss_sum, info) / lay.loss_replicas
            pending.append((step, loss_sum / n_targets, grad_norm.detach(), lr))
            window_steps += 1
            window_time += time.perf_counter() - t0
            elapsed += time.perf_counter() - t0
            bar.update(1)

            stop_now = interrupt.signal is not None or (t.stop_after is not None and step >= t.stop_after)
            if info.enabled:  # every rank must leave at the same step
                flag = torch.tensor(float(stop_now), device=info.device)
                stop_now = bool(D.all_reduce(flag, info, op="max"))
            if step % t.log_every == 0 or step == t.steps or stop_now:
                flush()
            if val_rows is not None and ((t.eval_every and step % t.eval_every == 0) or step == t.steps):
                val = evaluate(model, val_rows, cfg, info, autocast, lay)
                if val is not None:
                    result.val_losses[step] = val
                    logger.log([{"step": step, "split": "val", "loss": val, "elapsed_s": round(elapsed, 3)}])
                    say(f"step {step}: validation loss {val:.4f}")
            if (t.save_every and step % t.save_every == 0) or step == t.steps or stop_now:
                result.checkpoint = save(step)
            if stop_now:
                result.interrupted = interrupt.signal or "stop_after"
                say(
                    f"stopped at step {step} ({result.interrupted}); checkpoint saved; "
                    f"continue with: mambakit train --resume {run_dir}"
                )
                break
    bar.close()
    logger.close()
    result.step = step
    if result.interrupted is None and info.is_main and t.sample_tokens > 0:
        result.sample = _final_sample(cfg, tokenizer, run_dir, info.device)
        say(f"sample (prompt {t.sample_prompt!r}):\n{result.sample}")
    return result


def graphed_micro_step(
    cfg: TrainConfig,
    model: nn.Module,
    model_config: ModelConfig,
    autocast: torch.autocast,
    info: D.DistInfo,
    say: Callable[[str], None],
) -> GraphedMicroStep | None:
    """The CUDA-graph micro-step when `train.cuda_graph` asks for one and this run allows it, else None.

    It needs one CUDA process (the data-parallel wrappers' gradient hooks and collectives are not
    captured) and neither activation checkpointing (its RNG-state stash reads the device) nor compile:
    "auto" then stays eager, "true" raises. A micro-step that cannot be captured raises under both,
    naming `train.cuda_graph = false` as the way out."""
    t = cfg.train
    if t.cuda_graph == "false":
        return None
    blockers = [
        reason
        for reason, present in (
            (f"device {info.device.type}", info.device.type != "cuda"),
            ("torchrun (several processes)", info.enabled),
            ("train.activation_checkpointing", t.activation_checkpointing),
            ("train.compile", t.compile),
        )
        if present
    ]
    if blockers:
        if t.cuda_graph == "true":
            raise ValueError(f"train.cuda_graph = true cannot be used with {', '.join(blockers)}")
        return None

    def loss_fn(input_ids, targets, seq_idx):
        with autocast:  # summed cross-entropy, chunked: the logits never exist whole
            return lm_loss(model, input_ids, targets, seq_idx)

    say("training micro-steps replay a CUDA graph (train.cuda_graph); one capture per batch shape")
    return GraphedMicroStep(model, loss_fn, vocab_size=model_config.vocab_size, ignore_index=IGNORE_INDEX)


def _final_sample(cfg: TrainConfig, tokenizer, run_dir: Path, device: torch.device) -> str:
    """Reload the last checkpoint as a plain model (this also checks it loads) and continue the prompt."""
    path = latest_checkpoint(run_dir)
    model = from_pretrained(path, device=device)
    prompt = [tokenizer.eos_id, *tokenizer.encode(cfg.train.sample_prompt).tolist()]
    ctx = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    with ctx:
        t = cfg.train
        out = sample(model, prompt, t.sample_tokens, t.sample_temperature, t.sample_top_k, seed=t.seed)
    return cfg.train.sample_prompt + tokenizer.decode(out)
