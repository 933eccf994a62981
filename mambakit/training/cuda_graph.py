"""One training micro-step (forward, loss, backward) captured in a CUDA graph and replayed.

At 8 x 2048 tokens a 130M model's step launches ~1,800-2,300 kernels, and in eager mode the host
(Python, autograd, the custom ops' wrappers, Triton's launcher) takes longer to issue them than the
GPU takes to run them: Mamba-2 130M spent 88 ms of GPU time in a 115-172 ms step, depending on the
host. Replaying a captured graph issues the whole forward and backward with one launch.

Use: `step = GraphedMicroStep(model, loss_fn)`; `loss = step(scale, input_ids, targets, seq_idx)` computes
`loss_fn(input_ids, targets, seq_idx)`, adds the gradients of `loss * scale` into the parameters'
`.grad` (allocated as zeros on first use, so that accumulation over micro-batches is an in-place add
the graph can replay) and returns a fresh tensor holding the loss. Each distinct (shape, dtype,
seq_idx present) is captured once, after `warmup` eager runs on a side stream (autotuning and lazy
initialization must not happen inside a capture). The gradients the caller had accumulated before a
capture are kept. After the optimizer step, zero the gradients in place
(`optimizer.zero_grad(set_to_none=False)`): a graph keeps writing into the same `.grad` tensors.
Each captured shape keeps its own activation memory (graphs do not share a pool here), so a run that
feeds several shapes holds several steps' activations.

Everything inside must be capturable: no host synchronization and no data-dependent shapes (the
mambakit ops skip their value checks while a capture is running; `__call__` runs the model's and the
loss's checks of the token and target ranges and of seq_idx's order on the way in).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mambakit.models.lm import check_token_ids
from mambakit.ops._checks import check_seq_idx
from mambakit.ops.cross_entropy.api import check_target_values


class GraphedMicroStep:
    """Forward + loss + backward of `model`'s parameters through `loss_fn`, replayed from CUDA graphs."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
        warmup: int = 2,
        vocab_size: int | None = None,
        ignore_index: int = -100,
    ) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "GraphedMicroStep needs a CUDA device (CUDA graphs); run the eager step on CPU"
            )
        self.loss_fn, self.warmup = loss_fn, warmup
        self.vocab_size, self.ignore_index = vocab_size, ignore_index
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._graphs: dict[tuple, tuple] = {}

    def _check(self, input_ids: torch.Tensor, targets: torch.Tensor, seq_idx: torch.Tensor | None) -> None:
        for name, t in (("input_ids", input_ids), ("targets", targets), ("seq_idx", seq_idx)):
            if t is not None and not t.is_cuda:
                raise ValueError(f"{name} must be a CUDA tensor for a CUDA-graph step, got device {t.device}")
        if targets.shape != input_ids.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and targets {tuple(targets.shape)} must have one shape "
                "(batch, seqlen)"
            )
        # the model's and the loss's own value checks, which cannot run inside a replay
        check_seq_idx(seq_idx, *input_ids.shape, input_ids.device)
        if self.vocab_size is not None:
            check_token_ids(input_ids, self.vocab_size)
            check_target_values(targets, self.ignore_index, self.vocab_size)

    def _run(self, scale, input_ids, targets, seq_idx) -> torch.Tensor:
        loss = self.loss_fn(input_ids, targets, seq_idx)
        (loss * scale).backward()
        return loss.detach()

    def _capture(self, key, input_ids, targets, seq_idx):
        static = {
            "scale": torch.ones((), device=input_ids.device),
            "input_ids": input_ids.clone(),
            "targets": targets.clone(),
            "seq_idx": None if seq_idx is None else seq_idx.clone(),
        }
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        kept = [p.grad.clone() for p in self.params]  # warm-up runs accumulate into .grad
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._run(static["scale"], static["input_ids"], static["targets"], static["seq_idx"])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                loss = self._run(static["scale"], static["input_ids"], static["targets"], static["seq_idx"])
        except RuntimeError as exc:
            raise RuntimeError(
                f"the training micro-step could not be captured in a CUDA graph ({exc}); "
                "run it eagerly (train.cuda_graph = false)"
            ) from exc
        finally:
            with torch.no_grad():
                for p, g in zip(self.params, kept, strict=True):
                    p.grad.copy_(g)
            del kept
        self._grad_ptrs = [p.grad.data_ptr() for p in self.params]
        self._graphs[key] = (graph, static, loss)
        return self._graphs[key]

    def __call__(
        self,
        scale: float,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        seq_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Accumulate d(loss * scale)/d params into .grad; return the (unscaled) loss, a new tensor."""
        self._check(input_ids, targets, seq_idx)
        with torch.cuda.device(input_ids.device):  # capture and replay on the inputs' GPU
            return self._replay(scale, input_ids, targets, seq_idx)

    def _replay(self, scale, input_ids, targets, seq_idx) -> torch.Tensor:
        key = (tuple(input_ids.shape), input_ids.dtype, targets.dtype, seq_idx is not None, input_ids.device)
        graph, static, loss = self._graphs.get(key) or self._capture(key, input_ids, targets, seq_idx)
        for p, ptr in zip(self.params, self._grad_ptrs, strict=True):
            if p.grad is None or p.grad.data_ptr() != ptr:
                raise RuntimeError(
                    "a parameter's .grad was replaced after capture (the graph writes into the old one): "
                    "zero the gradients in place (optimizer.zero_grad(set_to_none=False)) when stepping "
                    "with CUDA graphs"
                )
        static["scale"].fill_(scale)
        static["input_ids"].copy_(input_ids)
        static["targets"].copy_(targets)
        if seq_idx is not None:
            static["seq_idx"].copy_(seq_idx)
        graph.replay()
        return loss.clone()
