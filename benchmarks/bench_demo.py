#!/usr/bin/env python3
"""The demo model (Gemma 3 270M, GGUF Q4_K_M): start-up with and without the conversion cache,
and decode speed with and without the Linux fast path, beside llama.cpp on the same file.

    python benchmarks/bench_demo.py [--runs 3] [--tokens 32] [--json out.json]

- start: `mlx_gemma.load("demo")` in a fresh process, first with an empty conversion cache
  (GGUF read, dequantized, tokenizer built, cache written) and then again (cache read).
- decode: greedy tokens/s after the first token for the same prompt ids, each variant in its
  own process (OpenBLAS preloading is per process): float32 + OpenBLAS (the Linux fast path),
  float32 on MLX's reference BLAS, bfloat16 on MLX's reference BLAS, and llama.cpp
  (llama-cpp-python, when installed) on the GGUF file itself with all cores.
Figures are medians over the runs with min and max; the ratios divide by llama.cpp's figure
(or, for start-up, the first start by the second).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "Water boils at a temperature of"
VARIANTS = {  # name: (dtype, environment)
    "mlx-gemma float32 + OpenBLAS (fast path)": ("float32", {}),
    "mlx-gemma float32, reference BLAS": ("float32", {"MLX_GEMMA_OPENBLAS": "0"}),
    "mlx-gemma bfloat16, reference BLAS": ("bfloat16", {"MLX_GEMMA_OPENBLAS": "0"}),
}


def worker_start() -> dict:
    start = time.perf_counter()
    import mlx_gemma

    mlx_gemma.load("demo")
    return {"seconds": time.perf_counter() - start}


def worker_decode(dtype: str, tokens: int) -> dict:
    import mlx_gemma
    from mlx_gemma.engine import generate_tokens
    from mlx_gemma.sampler import GenerationParams

    rt = mlx_gemma.load("demo", dtype=dtype)
    ids = [rt.tokenizer.bos_id, *rt.tokenizer.encode(PROMPT)]
    params = GenerationParams(max_tokens=tokens, temperature=0)
    steps = lambda: generate_tokens(rt.model, ids, params, frozenset(), rt.loaded.context_length)  # noqa: E731
    list(steps())  # warm-up
    start = time.perf_counter()
    first = None
    for _ in steps():
        first = first or time.perf_counter()
    return {"decode_tps": (tokens - 1) / (time.perf_counter() - first), "ttft_s": first - start}


def worker_llama_cpp(tokens: int) -> dict:
    from llama_cpp import Llama

    import mlx_gemma

    path = str(mlx_gemma.loading.demo_gguf())
    llm = Llama(model_path=path, n_ctx=512, n_threads=os.cpu_count(), verbose=False)
    ids = llm.tokenize(PROMPT.encode(), add_bos=True)

    def run() -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        first, count = None, 0
        for _ in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            count += 1
            first = first or time.perf_counter()
            if count == tokens:
                break
        return (tokens - 1) / (time.perf_counter() - first), first - start
    run()
    decode_tps, ttft = run()
    return {"decode_tps": decode_tps, "ttft_s": ttft}


def in_process(args: list[str], env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(name: str, values: list[float], unit: str, reference: float | None, reference_name: str) -> dict:
    ours = statistics.median(values)
    return {"name": name, "ours": ours, "min": min(values), "max": max(values), "unit": unit, "runs": len(values),
            "reference": reference, "reference_name": reference_name,
            "ratio": ours / reference if reference else None}


def start_rows(runs: int) -> list[dict]:
    first, second = [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="mlx-gemma-bench-") as cache_dir:  # ~1 GB of conversion each
            cache = {"MLX_GEMMA_CACHE": cache_dir}
            first.append(in_process(["start"], cache)["seconds"])
            second.append(in_process(["start"], cache)["seconds"])
    cached = statistics.median(second)
    return [summary("start, cached (second start)", second, "s", None, ""),
            summary("start, converting (first start)", first, "s", cached, "second start")]


def decode_rows(runs: int, tokens: int) -> list[dict]:
    samples = {name: [] for name in VARIANTS}
    llama = []
    for _ in range(runs):
        for name, (dtype, env) in VARIANTS.items():
            samples[name].append(in_process(["decode", dtype, str(tokens)], env)["decode_tps"])
        try:
            llama.append(in_process(["llama_cpp", str(tokens)], {})["decode_tps"])
        except RuntimeError as exc:
            print(f"# llama.cpp skipped: {str(exc).splitlines()[-1]}", file=sys.stderr)
    reference = statistics.median(llama) if llama else None
    rows = [summary(f"decode {name}", values, "tokens/s", reference, "llama.cpp") for name, values in samples.items()]
    if llama:
        rows.append(summary("decode llama.cpp (llama-cpp-python), same GGUF", llama, "tokens/s", None, ""))
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'measurement':58} {'median':>9} {'(min-max)':>17} {'ratio':>7}")
    for r in rows:
        ratio = f"{r['ratio']:.2f} vs {r['reference_name']}" if r["ratio"] else ""
        print(f"{r['name']:58} {r['ours']:9.2f} ({r['min']:.2f}-{r['max']:.2f}) {r['unit']:9} {ratio}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, rest = sys.argv[2], sys.argv[3:]
        work = {"start": worker_start, "decode": lambda: worker_decode(rest[0], int(rest[1])),
                "llama_cpp": lambda: worker_llama_cpp(int(rest[0]))}[kind]
        print(json.dumps(work()))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = start_rows(args.runs) + decode_rows(args.runs, args.tokens)
    print_rows(rows)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()
