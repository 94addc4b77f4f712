#!/usr/bin/env python3
"""LoRA serving cost: base vs unfused rank-8 (all seven projections) vs fused, load and switch.

    python benchmarks/bench_lora.py [--model tiny|2b-shape] [--dtype float32] [--runs 5]
        [--prompt-tokens 32] [--decode-tokens 32] [--json out.json]

Three decodes alternate on one model: plain (no adapter installed: the layers are unwrapped
for the run and the adapter added back after it, outside the timer), base (the adapter
resident, the request choosing none) and unfused (the request choosing the adapter by its
slot); ratios are against plain, pair by pair, so the unfused ratio is the whole cost of
serving an adapter. Then the adapter is fused into the same weights and timed alone (its
ratio is against the median plain figure). Load time is reading,
validating and installing the adapter files; switch time is what a request with another
resident adapter costs before its forward pass. The check that a switch copies no base
weight compares the base weight arrays before and after (same objects, same memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (compare, print_rows, random_2b, scratch_dir, single_row, timed, tiny_model_dir,  # noqa: E402
                    write_random_peft_adapter)

import mlx.core as mx  # noqa: E402

import mlx_gemma  # noqa: E402
from mlx_gemma import _platform  # noqa: E402
from mlx_gemma.engine import generate_tokens  # noqa: E402
from mlx_gemma.lora import layers  # noqa: E402
from mlx_gemma.lora.store import AdapterRegistry  # noqa: E402
from mlx_gemma.sampler import GenerationParams  # noqa: E402


def base_arrays(model) -> list[int]:
    return [id(layer.self_attn.q_proj.base.weight if hasattr(layer.self_attn.q_proj, "base")
               else layer.self_attn.q_proj.weight) for layer in model.layers]


def decode_runner(model, ids: list[int], n_decode: int, slot: int):
    params = GenerationParams(max_tokens=n_decode, temperature=0)
    return lambda: timed((s.token for s in generate_tokens(model, ids, params, frozenset(), 1 << 20, slot)), len(ids))


def plain_runner(registry: AdapterRegistry, adapter_dir: Path, ids: list[int], n_decode: int):
    """Decode with the adapter uninstalled (every layer unwrapped); it is added back after the run."""
    run = decode_runner(registry.model, ids, n_decode, 0)

    def plain() -> dict:
        registry.release("r8")
        registry.remove("r8")
        try:
            return run()
        finally:
            registry.add("r8", adapter_dir)
            registry.acquire("r8")
    return plain


def load_and_switch(registry: AdapterRegistry, adapter_dir: Path, runs: int) -> list[dict]:
    load_s = []
    for i in range(runs):
        start = time.perf_counter()
        registry.add(f"load{i}", adapter_dir)
        load_s.append(time.perf_counter() - start)
    names = [f"load{i}" for i in range(runs)]
    switch_s = []
    for name in names * 20:
        start = time.perf_counter()
        layers.set_rows(registry.model, [registry.acquire(name)])
        registry.release(name)
        switch_s.append(time.perf_counter() - start)
    for name in names:
        registry.remove(name)
    return [single_row("adapter load (read + validate + install)", load_s, "s"),
            single_row("adapter switch between resident adapters", switch_s, "s")]


def run(args: argparse.Namespace) -> list[dict]:
    if args.model == "2b-shape":
        model = random_2b(args.dtype)
    else:
        model = mlx_gemma.load(args.model if args.model != "tiny" else tiny_model_dir(), dtype=args.dtype).model
    registry = AdapterRegistry(model, "gemma")
    adapter_dir = write_random_peft_adapter(scratch_dir() / "r8", layers.linear_dims(model))
    before = base_arrays(model)
    extra = load_and_switch(registry, adapter_dir, 3)
    registry.add("r8", adapter_dir)
    slot = registry.acquire("r8")
    ids = [2] + [(i * 31) % 200 + 270 for i in range(args.prompt_tokens - 1)]
    runners = {"plain": plain_runner(registry, adapter_dir, ids, args.decode_tokens),
               "base": decode_runner(model, ids, args.decode_tokens, 0),
               "unfused r8": decode_runner(model, ids, args.decode_tokens, slot)}
    rows = compare(f"{args.model} {args.dtype}", runners, "plain", args.runs, metrics=("decode_tps",))
    same_base = base_arrays(model) == before
    registry.release("r8")
    registry.remove("r8")
    layers.fuse(model, registry.read("r8", adapter_dir))
    fused_runner = decode_runner(model, ids, args.decode_tokens, 0)
    fused_runner()  # warm-up, as the others had
    fused = [fused_runner()["decode_tps"] for _ in range(args.runs)]
    plain_median = rows[0]["reference"]
    rows.append({**single_row(f"{args.model} {args.dtype} fused r8 decode_tps", fused, "tokens/s"),
                 "reference": plain_median, "reference_name": "plain",
                 "ratio": statistics.median(fused) / plain_median,
                 "ratio_min": min(fused) / plain_median, "ratio_max": max(fused) / plain_median})
    print(f"# base weight arrays unchanged by adding, switching and removing adapters: {same_base} "
          "(0 bytes of base weights copied)")
    return rows + extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"# mlx {mx.__version__}; {_platform.blas_note()}; model {args.model}, {args.dtype}")
    rows = run(args)
    print_rows([r for r in rows if r["ratio"] is not None])
    for r in rows:
        if r["ratio"] is None:
            print(f"{r['name']:52} {r['ours'] * 1e3:10.3f} ms (min {r['min'] * 1e3:.3f}, max {r['max'] * 1e3:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
