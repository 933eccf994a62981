"""`mambakit generate --model DIR --prompt TEXT`: stream generated text to the terminal, then tokens/s.

The model comes from DIR (`save_pretrained` layout: config.json + model.safetensors); the tokenizer
from DIR/tokenizer.json (the `tokenizers` library) when it exists, else the byte-level tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (config.json + weights)")
    parser.add_argument("--prompt", required=True, action="append", help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--tokenizer", default=None, help="a tokenizer.json, or 'byte' (default: from --model)"
    )
    parser.add_argument("--eos-token", default=None, help="name of the eos token in tokenizer.json")
    parser.add_argument("--no-eos", action="store_true", help="do not stop at the tokenizer's eos token")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: bfloat16 on CUDA")
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA")
    parser.add_argument(
        "--ssm-dtype", choices=sorted(_DTYPES), default=None, help="SSM state dtype (default float32)"
    )


def load_tokenizer_for(model_dir: Path, spec: str | None, eos_token: str | None):
    """`spec` ('byte' or a path) when given, else model_dir/tokenizer.json, else the byte tokenizer."""
    from mambakit.training.tokenizer import ByteTokenizer, load_tokenizer

    if spec is not None:
        return load_tokenizer(spec, eos_token)
    path = model_dir / "tokenizer.json"
    return load_tokenizer(str(path), eos_token) if path.is_file() else ByteTokenizer()


class _TextStream:
    """Decode a row's tokens as they come and print only the new text (waiting while the text ends
    in a partial UTF-8 character, decoded as U+FFFD)."""

    def __init__(self, tokenizer, out) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.printed :] + "\n")
        self.out.flush()


def run(args: argparse.Namespace) -> int:
    from mambakit.inference.generate import generate
    from mambakit.models.lm import LanguageModel

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"--model {model_dir}: no config.json there (a directory from save_pretrained)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else None)
    model = LanguageModel.from_pretrained(model_dir, device=device, dtype=dtype).eval()
    tokenizer = load_tokenizer_for(model_dir, args.tokenizer, args.eos_token)
    vocab = model.config.vocab_size
    prompts = [tokenizer.encode(p).tolist() for p in args.prompt]
    for p, ids in zip(args.prompt, prompts):
        if not ids:
            raise SystemExit(f"--prompt {p!r} encodes to no tokens")
        if max(ids) >= vocab:
            raise SystemExit(
                f"--prompt {p!r} has token ids >= the model's vocab_size={vocab}: wrong tokenizer?"
            )
    eos = getattr(tokenizer, "eos_id", None)
    eos = None if args.no_eos or eos is None or eos >= vocab else eos

    streams = [_TextStream(tokenizer, sys.stdout)] if len(prompts) == 1 else []
    if streams:
        sys.stdout.write(args.prompt[0])

    def on_tokens(tokens: torch.Tensor) -> None:
        for s, t in zip(streams, tokens.tolist()):
            if eos is None or t != eos:
                s.push(t)

    try:
        out = generate(
            model, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, eos_token_id=eos, seed=args.seed,
            cuda_graph=not args.no_cuda_graph, callback=on_tokens,
            ssm_dtype=_DTYPES[args.ssm_dtype] if args.ssm_dtype else None,
        )  # fmt: skip
    except ValueError as e:
        raise SystemExit(f"mambakit generate: {e}") from None
    for s in streams:
        s.finish()
    if not streams:  # a batch: print each row whole
        for i, p in enumerate(args.prompt):
            ids = [t for t in out.row(i) if t != eos]
            print(f"[{i}] {p}{tokenizer.decode(ids)}")
    print(
        f"{out.num_tokens} tokens in {out.prefill_s + out.decode_s:.2f} s: {out.tokens_per_s:.1f} tokens/s "
        f"(prefill {out.prefill_s * 1e3:.1f} ms, {device}, cuda graph "
        f"{'on' if device.type == 'cuda' and not args.no_cuda_graph else 'off'})",
        file=sys.stderr,
    )
    return 0
