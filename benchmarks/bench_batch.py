#!/usr/bin/env python3
"""Continuous batching: aggregate decode speed of concurrent streams, base-only and mixed adapters.

    python benchmarks/bench_batch.py [--model tiny|demo|PATH] [--streams 8] [--tokens 64] [--runs 3]
        [--json out.json]

Three loads on the same runtime, alternating run by run: one stream alone; `--streams`
concurrent base streams; `--streams` concurrent streams each with its own rank-8 adapter on
all seven projections (random weights). Each stream is greedy, `--tokens` long, from its own
prompt; streams are read from threads through the Python API (`Runtime.stream`). Aggregate
tokens/s is every stream's tokens over the wall time from submission to the last token;
time to first token is per stream, p50 and p99 over the streams of all runs. The prefix cache
is emptied before each run, so no run reuses the prompts of the one before.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import scratch_dir, tiny_model_dir, write_random_peft_adapter  # noqa: E402  (imports mlx_gemma first)

import mlx_gemma  # noqa: E402
from mlx_gemma.lora.adapters import FAMILIES  # noqa: E402


def load(model: str, streams: int) -> tuple[mlx_gemma.Runtime, list[str]]:
    runtime = mlx_gemma.load(tiny_model_dir() if model == "tiny" else model, max_batch=streams,
                             max_resident_adapters=streams)
    family = FAMILIES[runtime.loaded.config["model_type"]]
    linears = runtime.registry.base_info().linears
    root = scratch_dir()
    names = []
    for i in range(streams):
        write_random_peft_adapter(root / f"a{i}", linears, seed=i, model_type="gemma" if family == "gemma" else "gemma3")
        runtime.add_adapter(f"a{i}", str(root / f"a{i}"))
        names.append(f"a{i}")
    return runtime, names


def run_load(runtime: mlx_gemma.Runtime, loras: list[str | None], tokens: int) -> dict:
    """Start every stream at once; return aggregate tokens/s and each stream's time to first token.
    The prefix cache is emptied first, so every run reads its prompts in full."""
    runtime.engine.run(runtime.engine.prefixes.clear)
    start = time.perf_counter()
    streams = [runtime.stream(prompt=f"Stream {i} writes about the sea and", raw=True, lora=lora,
                              temperature=0, max_tokens=tokens) for i, lora in enumerate(loras)]
    firsts: list[float] = [0.0] * len(streams)

    def read(i: int) -> None:
        for _ in streams[i]:
            firsts[i] = firsts[i] or time.perf_counter() - start

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    generated = sum(len(stream.token_ids) for stream in streams)
    return {"tps": generated / seconds, "ttft": firsts}


def measure(runtime: mlx_gemma.Runtime, adapters: list[str], tokens: int, runs: int) -> dict[str, list[dict]]:
    loads = {"1 stream": [None], f"{len(adapters)} base streams": [None] * len(adapters),
             f"{len(adapters)} streams, {len(adapters)} adapters": list(adapters)}
    for loras in loads.values():
        run_load(runtime, loras, 4)  # warm-up
    samples: dict[str, list[dict]] = {name: [] for name in loads}
    for _ in range(runs):
        for name, loras in loads.items():
            samples[name].append(run_load(runtime, loras, tokens))
    return samples


def rows(samples: dict[str, list[dict]], model: str, tokens: int) -> list[dict]:
    names = list(samples)
    tps = {name: [s["tps"] for s in samples[name]] for name in names}
    out = []
    for name, reference in ((names[1], names[0]), (names[2], names[0]), (names[2], names[1])):
        ratios = [a / b for a, b in zip(tps[name], tps[reference])]
        out.append({"name": f"{model} aggregate decode, {name}", "ours": statistics.median(tps[name]),
                    "reference": statistics.median(tps[reference]), "reference_name": reference,
                    "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                    "unit": "tokens/s", "runs": len(ratios), "tokens_per_stream": tokens})
    for name in names[1:]:
        ttfts = sorted(t for s in samples[name] for t in s["ttft"])
        p99 = ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]
        out.append({"name": f"{model} time to first token, {name}", "ours": statistics.median(ttfts), "p99": p99,
                    "unit": "s", "runs": len(samples[name])})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    runtime, adapters = load(args.model, args.streams)
    results = rows(measure(runtime, adapters, args.tokens, args.runs), args.model, args.tokens)
    for r in results:
        if "ratio" in r:
            print(f"{r['name']:58} {r['ours']:9.1f} vs {r['reference']:9.1f} {r['reference_name']:>24}: "
                  f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})")
        else:
            print(f"{r['name']:58} p50 {r['ours'] * 1000:8.1f} ms   p99 {r['p99'] * 1000:8.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
