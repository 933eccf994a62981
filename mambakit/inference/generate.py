"""Text generation: one chunked prefill over the prompts, then one `model.step` per new token.

    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.8, top_p=0.9, seed=0)
    out.tokens        # (batch, steps) new tokens; after a row's eos, pad_token_id
    for tokens in stream_generate(model, prompts, ...):   # (batch,) each step
        ...

Prompts of different lengths share one batch: they are left-padded, and the padding is made inert
by marking it as a separate packed document (`seq_idx` 0 for padding, 1 for the prompt). Every layer
already keeps packed documents apart: the scans and the conv start each document from a zero state
and the prefill hands on only the last document's state; attention masks keys before the row's
document start (`KVCache.doc_start`) and restarts rotary positions there. So each row continues
exactly as if it had been run alone, in one batched prefill.

On CUDA the decode step is a CUDA graph (`cuda_graph.py`) captured per batch size and replayed;
`cuda_graph=False` runs it eagerly, and on the CPU it always runs eagerly. Greedy decoding without a
repetition penalty takes the argmax inside the graph, which feeds it back itself: one graph launch a
token. Other sampling happens outside the graph, on the device, without host syncs; the loop syncs
per step only to check eos (when eos tokens are given) or to stream tokens to a callback.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mambakit.inference.cache import InferenceCache
from mambakit.inference.sampling import SamplingParams, sample

Prompts = torch.Tensor | Sequence[Sequence[int] | torch.Tensor]


@dataclass
class GenerationOutput:
    """tokens (batch, steps) int64 on the CPU: the new tokens, pad_token_id after a row's eos.
    lengths: new tokens per row, its eos included. prompt_lengths: tokens per prompt.
    prefill_s, decode_s: wall time of the prefill (and first token) and of the decode steps."""

    tokens: torch.Tensor
    lengths: list[int]
    prompt_lengths: list[int]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def tokens_per_s(self) -> float:
        """New tokens of all rows per second of wall time (prefill included)."""
        total = self.prefill_s + self.decode_s
        return self.num_tokens / total if total > 0 else float("nan")

    def row(self, i: int) -> list[int]:
        """The new tokens of row i, up to and including its eos."""
        return self.tokens[i, : self.lengths[i]].tolist()


def _check_int(name: str, v: object, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return v


def prepare_prompts(
    input_ids: Prompts, attention_mask: torch.Tensor | None, pad_token_id: int, vocab_size: int, device
) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """Prompts -> (ids (batch, L) left-padded, seq_idx (batch, L) or None when no row is padded,
    prompt lengths). Accepts a (batch, L) tensor (with an optional 0/1 attention_mask, padding on
    either side), a 1-D tensor (one prompt) or a list of token sequences."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2 or input_ids.is_floating_point():
            raise ValueError(
                f"input_ids must be an integer tensor (batch, seqlen), got {tuple(input_ids.shape)}"
            )
        if attention_mask is None:
            rows = list(input_ids.cpu())
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask.cpu().bool()
            rows = [r[m] for r, m in zip(input_ids.cpu(), mask)]
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask goes with a tensor input_ids; a list of prompts needs none")
        if isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, Sequence) or not input_ids:
            raise ValueError("input_ids must be a tensor or a non-empty list of token-id sequences")
        rows = [torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in input_ids]
    lengths = [int(r.numel()) for r in rows]
    if not rows or min(lengths) == 0:
        raise ValueError(f"every prompt needs at least one token, got lengths {lengths}")
    flat = torch.cat(rows)
    if bool(((flat < 0) | (flat >= vocab_size)).any()):
        raise ValueError(
            f"input_ids must lie in [0, vocab_size={vocab_size}), got [{int(flat.min())}, {int(flat.max())}]"
        )
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    seq_idx = torch.ones(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - lengths[i] :] = r
        seq_idx[i, : width - lengths[i]] = 0
    ids = ids.to(device)
    if min(lengths) == width:
        return ids, None, lengths
    return ids, seq_idx.to(device), lengths


@torch.no_grad()
def prefill(
    model: nn.Module, input_ids: torch.Tensor, cache: InferenceCache, seq_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """The chunked forward over the prompts, filling `cache`; returns the last position's logits
    (batch, vocab_size). Same as `model(input_ids, seq_idx=seq_idx, cache=cache)[:, -1]` but projects
    only the last position onto the vocabulary (a 64K-token prompt would otherwise make a
    (64K, vocab) logits tensor)."""
    return model(input_ids, seq_idx=seq_idx, cache=cache, logits_to_keep=1)[:, 0]


def _eos_tensor(eos_token_id: int | Sequence[int] | None, vocab_size: int, device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    for i in ids:
        _check_int("eos_token_id", i, 0)
        if i >= vocab_size:
            raise ValueError(f"eos_token_id {i} is not below vocab_size={vocab_size}")
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


def stream_generate(
    model: nn.Module,
    input_ids: Prompts,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    cuda_graph: bool = True,
    compile: bool = False,
    ssm_dtype: torch.dtype | None = None,
    stats: dict | None = None,
    copy_tokens: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield the new tokens (batch,) int64 (on the model's device) one step at a time.

    Arguments as in `generate`. Stops after max_new_tokens steps or once every row has emitted an
    eos token; a finished row yields pad_token_id. `stats`, when given, receives the prompt lengths
    and timings ("prompt_lengths", "prefill_s", "decode_s"); time spent by the consumer between steps
    counts as decode time. copy_tokens=False saves a copy a step in greedy CUDA-graph decoding: the
    tokens are then views of the decoder's token history, which the next generation at this batch
    size overwrites (`generate` stacks them before that).
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    _check_int("max_new_tokens", max_new_tokens, 0)
    vocab = model.config.vocab_size
    weight = model.backbone.embedding.weight
    device = weight.device
    eos = _eos_tensor(eos_token_id, vocab, device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None else 0
    _check_int("pad_token_id", pad_token_id, 0)
    if pad_token_id >= vocab:
        raise ValueError(f"pad_token_id {pad_token_id} is not below vocab_size={vocab}")
    ids, seq_idx, lengths = prepare_prompts(input_ids, attention_mask, pad_token_id, vocab, device)
    batch, width = ids.shape
    needed = width + max(max_new_tokens - 1, 0)  # the last new token is never fed back
    if max_seqlen is None:
        max_seqlen = max(needed, 1)
    else:
        _check_int("max_seqlen", max_seqlen, 1)
        if needed > max_seqlen:
            raise ValueError(
                f"prompt of {width} tokens (longest row) plus max_new_tokens={max_new_tokens} does not fit "
                f"in max_seqlen={max_seqlen}; raise max_seqlen or shorten the prompt"
            )
    if stats is not None:
        stats.update(prompt_lengths=lengths, prefill_s=0.0, decode_s=0.0)
    if max_new_tokens == 0:
        return
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    t0 = time.perf_counter()
    use_graph = cuda_graph and device.type == "cuda"
    greedy_in_graph = use_graph and params.greedy and params.repetition_penalty == 1.0
    if use_graph:
        from mambakit.inference.cuda_graph import cuda_graph_decoder

        decoder = cuda_graph_decoder(
            model, batch, max_seqlen, compile=compile, ssm_dtype=ssm_dtype, greedy=greedy_in_graph
        )
        cache, step = decoder.cache, decoder.step
    else:
        cache = model.allocate_inference_cache(batch, max_seqlen, ssm_dtype=ssm_dtype)

        def step(tokens: torch.Tensor) -> torch.Tensor:
            return model.step(tokens[:, None], cache)[:, -1]

    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        real = ids if seq_idx is None else torch.where(seq_idx.bool(), ids, ids[:, -1:])
        seen.scatter_(1, real, True)  # padding maps to the row's last prompt token, already seen

    with torch.no_grad():
        logits = prefill(model, ids, cache, seq_idx)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            from_graph = greedy_in_graph and t > 0  # the graph's argmax, already the next step's input
            if from_graph:
                tokens = decoder.last_tokens()
            else:
                tokens = sample(logits, params, seen, generator)
            if eos is not None:
                tokens = torch.where(finished, pad_token_id, tokens)
                finished |= torch.isin(tokens, eos)
            if t == 0 and stats is not None:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                stats["prefill_s"] = time.perf_counter() - t0
                t1 = time.perf_counter()
            yield tokens.clone() if copy_tokens and from_graph else tokens
            if t == max_new_tokens - 1 or (eos is not None and bool(finished.all())):
                break
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            # a finished row's input is its argmax, not the pad it yields: what it computes is discarded
            logits = step(None if from_graph else tokens)
    if stats is not None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats["decode_s"] = time.perf_counter() - t1


def generate(
    model: nn.Module,
    input_ids: Prompts,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    cuda_graph: bool = True,
    compile: bool = False,
    ssm_dtype: torch.dtype | None = None,
    callback: Callable[[torch.Tensor], object] | None = None,
) -> GenerationOutput:
    """Generate up to `max_new_tokens` tokens after each prompt.

    input_ids: a (batch, seqlen) tensor (with `attention_mask` 0/1 when rows are padded), one 1-D
        prompt, or a list of token-id sequences of any lengths.
    temperature: 0 is greedy (as is top_k=1); top_k / top_p / min_p / repetition_penalty: see
        `SamplingParams`. eos_token_id: one id or several; a row stops at its first, and pads with
        pad_token_id (default: the first eos id, else 0) after it.
    seed or generator: the randomness of sampling; the same seed gives the same tokens.
    max_seqlen: the capacity of the attention caches (default: just enough); a prompt that does not
        fit raises. cuda_graph: replay a captured decode step on CUDA (ignored on the CPU).
    ssm_dtype: the SSM states' dtype, default float32; torch.bfloat16 halves the decoding state (what
        bounds Mamba-2 decoding at large batch), with steps still computed in float32.
    callback: called with the new tokens (batch,) int64 on the CPU after every step (streaming).
    """
    stats: dict = {}
    steps = []
    for tokens in stream_generate(
        model, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, seed=seed, generator=generator, attention_mask=attention_mask,
        max_seqlen=max_seqlen, cuda_graph=cuda_graph, compile=compile, ssm_dtype=ssm_dtype, stats=stats,
        copy_tokens=False,
    ):  # fmt: skip
        steps.append(tokens)
        if callback is not None:
            callback(tokens.cpu())
    lengths_prompt = stats["prompt_lengths"]
    batch = len(lengths_prompt)
    out = torch.stack(steps, dim=1).cpu() if steps else torch.zeros(batch, 0, dtype=torch.long)
    lengths = [out.shape[1]] * batch
    eos = _eos_tensor(eos_token_id, model.config.vocab_size, "cpu")
    if eos is not None and out.shape[1] > 0:
        is_eos = torch.isin(out, eos)
        for i in range(batch):
            hits = is_eos[i].nonzero()
            if hits.numel():
                lengths[i] = int(hits[0]) + 1
    return GenerationOutput(out, lengths, lengths_prompt, stats["prefill_s"], stats["decode_s"])
