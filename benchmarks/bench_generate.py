#!/usr/bin/env python3
"""Decode and prefill speed: mlx-gemma vs mlx-lm on the same weights, in the same process.

    python benchmarks/bench_generate.py [--model tiny|2b-shape|PATH] [--dtype float32]
        [--prompt-tokens 128] [--decode-tokens 64] [--runs 5] [--json out.json]

- `tiny`: the random checkpoint of scripts/make_tiny_model.py (Python overhead dominates).
- `2b-shape`: random weights with Gemma-2B's exact shapes, built in memory (no download);
  both runtimes hold the very same arrays.
- PATH: a Hugging Face Gemma directory.

Two pairs are timed, alternating ours and theirs on each run (greedy, same prompt ids):
token level, our `engine.generate_tokens` vs `mlx_lm.generate.generate_step`; and, for models
with a tokenizer, text level, our engine through the path `Runtime.stream` takes vs
`mlx_lm.stream_generate`: tokenizing and detokenizing included on both sides, one item per
token on both sides, and our prefix cache emptied before each run, so that every run of
either reads the whole prompt. After each run, work still in flight (mlx-lm evaluates a step
ahead) is waited for outside the timers, and the order of the two alternates run by run.
Prefill tokens/s is prompt length / time to first token; decode tokens/s counts the tokens
after the first over the time after the first. Figures are medians over the runs with min
and max; ratios are ours / mlx-lm, pair by pair.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare, print_rows, random_2b, timed, tiny_model_dir  # noqa: E402  (imports mlx_gemma first)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx_lm.generate import generate_step, stream_generate  # noqa: E402
from mlx_lm.models import gemma as lm_gemma  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402

import mlx_gemma  # noqa: E402
from mlx_gemma import _platform  # noqa: E402
from mlx_gemma.engine import generate_tokens  # noqa: E402
from mlx_gemma.runtime import Pieces  # noqa: E402
from mlx_gemma.sampler import GenerationParams  # noqa: E402


def random_2b_pair(dtype: str) -> tuple[nn.Module, nn.Module]:
    """Our model and mlx-lm's sharing one set of random weights with Gemma-2B's shapes."""
    ours = random_2b(dtype)
    theirs = lm_gemma.Model(lm_gemma.ModelArgs.from_dict(ours.args.__dict__))
    theirs.update(ours.parameters())
    return ours, theirs


def load_pair(path: str, dtype: str) -> tuple[mlx_gemma.Runtime, nn.Module, object]:
    from mlx_lm import load as lm_load

    runtime = mlx_gemma.load(path, dtype=dtype)
    theirs, tokenizer = lm_load(path)
    theirs.update(runtime.model.parameters())  # literally the same arrays
    return runtime, theirs, tokenizer


def token_level(ours: nn.Module, theirs: nn.Module, ids: list[int], n_decode: int) -> dict[str, Callable]:
    params = GenerationParams(max_tokens=n_decode, temperature=0)

    def run_ours() -> dict[str, float]:
        steps = generate_tokens(ours, ids, params, frozenset(), 1 << 20)
        return timed((s.token for s in steps), len(ids))

    def run_theirs() -> dict[str, float]:
        steps = generate_step(mx.array(ids), theirs, max_tokens=n_decode, sampler=make_sampler(0.0))
        return timed((int(t) for t, _ in steps), len(ids))

    return {"mlx-gemma": run_ours, "mlx-lm": run_theirs}


def text_steps(runtime: mlx_gemma.Runtime, prompt: str, n_decode: int) -> Iterator[str]:
    """Our text path one token at a time, as `stream_generate` yields mlx-lm's: the prompt is
    tokenized and submitted on the first `next` (inside the caller's timer), and each engine
    step is detokenized as `Runtime.stream` does (an incomplete character gives an empty piece)."""
    ids, params = runtime.prepare(prompt=prompt, raw=True, temperature=0, max_tokens=n_decode)
    steps: queue.SimpleQueue = queue.SimpleQueue()
    pieces = Pieces(runtime.tokenizer.detokenizer(), runtime.tokenizer.stop_ids)
    runtime.submit(ids, params, None, steps.put)
    while pieces.finish_reason is None:
        yield pieces.take(steps.get())


def text_level(runtime: mlx_gemma.Runtime, theirs: nn.Module, tokenizer: object, ids: list[int],
               n_decode: int) -> dict[str, Callable]:
    prompt = runtime.tokenizer.decode(ids)

    def run_ours() -> dict[str, float]:
        runtime.engine.run(runtime.engine.prefixes.clear)  # every run reads the whole prompt, as mlx-lm's do
        return timed(text_steps(runtime, prompt, n_decode), len(ids))

    def run_theirs() -> dict[str, float]:
        responses = stream_generate(theirs, tokenizer, prompt, max_tokens=n_decode, sampler=make_sampler(0.0))
        return timed(iter(responses), len(ids))

    return {"mlx-gemma": run_ours, "mlx-lm": run_theirs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args()
    print(f"# mlx {mx.__version__}; {_platform.blas_note()}; model {args.model}, {args.dtype}")
    rows = run_benchmarks(args)
    print_rows(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


def run_benchmarks(args: argparse.Namespace) -> list[dict]:
    if args.model == "2b-shape":
        ours, theirs = random_2b_pair(args.dtype)
        ids = [2] + [(i * 7919) % 255000 + 1000 for i in range(args.prompt_tokens - 1)]
        return compare(f"2b-shape {args.dtype} token-level", token_level(ours, theirs, ids, args.decode_tokens),
                       "mlx-lm", args.runs)
    path = args.model
    if args.model == "tiny":
        path = tiny_model_dir()
    runtime, theirs, tokenizer = load_pair(path, args.dtype)
    vocab = runtime.model.args.vocab_size
    ids = [2] + [(i * 31) % (vocab - 300) + 270 for i in range(args.prompt_tokens - 1)]
    label = f"{args.model} {args.dtype}"
    rows = compare(f"{label} token-level", token_level(runtime.model, theirs, ids, args.decode_tokens), "mlx-lm", args.runs)
    return rows + compare(f"{label} text-level", text_level(runtime, theirs, tokenizer, ids, args.decode_tokens),
                          "mlx-lm", args.runs)


if __name__ == "__main__":
    main()
