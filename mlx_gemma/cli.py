"""Command line: `mlx-gemma generate ...` and `mlx-gemma fuse ...`.

Each subcommand parses its flags, calls the Python API, and turns a bad value into one line
on stderr naming it, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from . import _platform
from .loading import DTYPES, ModelLoadError


def _messages_arg(value: str) -> list[dict[str, Any]]:
    text = open(value[1:]).read() if value.startswith("@") else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--messages is not valid JSON ({exc}): pass a list such as "
                                         '\'[{"role": "user", "content": "Hi"}]\' or @file.json') from exc


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local model directory or Hugging Face id")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: float32 on Linux)")
    parser.add_argument("--quantize", type=int, choices=(4, 8), help="quantize weights to 4 or 8 bits")


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default 0.6)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--frequency-penalty", type=float)
    parser.add_argument("--presence-penalty", type=float)


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = ["max_tokens", "temperature", "top_p", "top_k", "seed",
             "repetition_penalty", "frequency_penalty", "presence_penalty"]
    return {name: getattr(args, name) for name in names}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-gemma", description="Gemma on MLX with per-request LoRA")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text, streamed to stdout")
    add_model_flags(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt (a user turn, or as given with --raw)")
    source.add_argument("--messages", type=_messages_arg, help="chat messages as JSON, or @file.json")
    gen.add_argument("--raw", action="store_true", help="tokenize the prompt as given (no chat template)")
    gen.add_argument("--adapter", help="a LoRA adapter directory (PEFT or mlx-lm files) to apply")
    gen.add_argument("--fuse", action="store_true", help="merge --adapter into the weights instead")
    add_sampling_flags(gen)
    gen.set_defaults(func=cmd_generate)
    fuse = commands.add_parser("fuse", help="merge a LoRA adapter into a model and write a checkpoint")
    add_model_flags(fuse)
    fuse.add_argument("--adapter", required=True, help="the LoRA adapter directory")
    fuse.add_argument("--out", required=True, help="directory for the fused checkpoint")
    fuse.set_defaults(func=cmd_fuse)
    return parser


def cmd_generate(args: argparse.Namespace) -> None:
    import mlx_gemma

    if args.fuse and not args.adapter:
        raise ValueError("--fuse needs --adapter PATH: the adapter to merge")
    adapters = {Path(args.adapter).name: args.adapter} if args.adapter else None
    fuse = Path(args.adapter).name if args.fuse else None
    runtime = mlx_gemma.load(args.model, adapters=adapters, dtype=args.dtype, quantize=args.quantize, fuse=fuse)
    print(f"[{runtime!r}; {_platform.blas_note()}]", file=sys.stderr)
    lora = None if args.fuse or not args.adapter else Path(args.adapter).name
    start = time.perf_counter()
    stream = runtime.stream(prompt=args.prompt, messages=args.messages, raw=args.raw, lora=lora,
                            **sampling_kwargs(args))
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    usage = stream.usage
    print(f"[prompt {usage.prompt_tokens} tokens, generated {usage.completion_tokens} in {seconds:.2f} s "
          f"({usage.completion_tokens / max(seconds, 1e-9):.1f} tokens/s), finish: {stream.finish_reason}]",
          file=sys.stderr)


def cmd_fuse(args: argparse.Namespace) -> None:
    import mlx_gemma
    from .loading import save_checkpoint

    name = Path(args.adapter).name
    runtime = mlx_gemma.load(args.model, adapters={name: args.adapter}, dtype=args.dtype,
                             quantize=args.quantize, fuse=name)
    out = save_checkpoint(runtime.loaded, runtime.model, args.out)
    fused = runtime.fused
    print(f"wrote {out}: adapter {name} ({fused['format']}, rank {fused['rank']}, {fused['modules']} layers) "
          f"fused into {args.model}; weights are dense {runtime.loaded.dtype}"
          + (" (quantized layers were dequantized)" if runtime.loaded.quantization else ""))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, ModelLoadError, RuntimeError) as exc:
        print(f"mlx-gemma: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
