"""The sections of the benchmark suite, each run in its own process by bench_suite.py.

`run_section(section, model, dtype, (runs, prompt_tokens, decode_tokens), streams)` returns a
list of measurement rows (see common.py). Models: `tiny` (scripts/make_tiny_model.py),
`2b-shape` (random weights with Gemma-2B's exact shapes, in memory), `demo` (Gemma 3 270M from
its GGUF), or a path to a Hugging Face directory or a .gguf file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare, single_row, timed, tiny_model_dir  # noqa: E402  (imports mlx_gemma first)

import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import mlx_gemma  # noqa: E402
from mlx_gemma.loading import demo_gguf, resolve_model_dir  # noqa: E402

GENERATE_METRICS = ("decode_tps", "prefill_tps", "ttft_s", "peak_memory_gb")
PROMPT = "The history of the lighthouse begins with fires lit on hills above the harbour. "


def model_path(model: str) -> str:
    return tiny_model_dir() if model == "tiny" else str(resolve_model_dir(model))


def gguf_file(model: str) -> Path | None:
    if model == "demo":
        return demo_gguf()
    return Path(model) if model.endswith(".gguf") else None


def prompt_ids(runtime: mlx_gemma.Runtime, n_prompt: int) -> list[int]:
    """About n_prompt ids of plain text whose decoding encodes back to the same ids."""
    text_ids = runtime.tokenizer.encode(PROMPT * (1 + n_prompt // 8))[: n_prompt - 1]
    return [runtime.tokenizer.bos_id, *runtime.tokenizer.encode(runtime.tokenizer.decode(text_ids))]


# -- generate -----------------------------------------------------------------------------------

def generate_rows(model: str, dtype: str, runs: int, n_prompt: int, n_decode: int) -> list[dict]:
    from bench_generate import load_pair, random_2b_pair, text_level, token_level

    label = f"{model} {dtype}"
    if model == "2b-shape":
        ours, theirs = random_2b_pair(dtype)
        ids = [2] + [(i * 7919) % 255000 + 1000 for i in range(n_prompt - 1)]
        rows = compare(f"{label} token level", token_level(ours, theirs, ids, n_decode), "mlx-lm", runs,
                       GENERATE_METRICS)
        return rows + limit_rows(ours, label, rows[0])
    runtime, theirs, tokenizer = load_pair(model_path(model), dtype)
    ids = prompt_ids(runtime, n_prompt)
    runners = text_level(runtime, theirs, tokenizer, ids, n_decode)
    references = ["mlx-lm"]
    gguf = gguf_file(model)
    if gguf is not None and llama_cpp_installed():
        runners["llama.cpp"] = llama_runner(gguf, runtime.tokenizer.decode(ids[1:]), n_decode)
        references.append("llama.cpp")
    rows = compare(f"{label} text level", runners, references, runs, GENERATE_METRICS)
    return rows + limit_rows(runtime.model, label, rows[0])


def llama_cpp_installed() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("# llama.cpp skipped: pip install llama-cpp-python to compare with it", file=sys.stderr)
        return False
    return True


def llama_runner(gguf: Path, prompt: str, n_decode: int) -> Callable[[], dict]:
    """llama.cpp (llama-cpp-python) on the same GGUF file, greedy, all cores."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    ids = llm.tokenize(prompt.encode(), add_bos=True)

    def tokens() -> Iterator[int]:
        for count, token in enumerate(llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0), 1):
            yield token
            if count == n_decode:
                return

    def run() -> dict:
        llm.reset()
        figures = timed(tokens(), len(ids))
        del figures["peak_memory_gb"]  # MLX's counter says nothing about llama.cpp's memory
        return figures
    return run


# -- the memory-bandwidth limit ------------------------------------------------------------------

def read_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of the best of `repeats` streaming reads of a fresh array, over all cores."""
    data = np.ones(int(gigabytes * 1e9) // 4, dtype=np.float32)
    parts = np.array_split(data, os.cpu_count() or 1)
    best = 0.0
    with ThreadPoolExecutor(len(parts)) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, data.nbytes / (time.perf_counter() - start))
    return best


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decoded token reads: every parameter once (a tied embedding once)."""
    return sum(array.nbytes for _, array in tree_flatten(model.parameters()))


def limit_rows(model: nn.Module, label: str, decode_row: dict) -> list[dict]:
    """The decode ceiling set by memory bandwidth, and our measured fraction of it."""
    bandwidth = read_bandwidth()
    per_token = weight_bytes(model)
    limit = bandwidth / per_token
    fraction = {"name": f"{label} decode, fraction of the bandwidth limit", "ours": decode_row["ours"],
                "min": decode_row["min"], "max": decode_row["max"], "reference": limit,
                "reference_name": "bandwidth limit", "ratio": decode_row["ours"] / limit,
                "ratio_min": decode_row["min"] / limit, "ratio_max": decode_row["max"] / limit,
                "unit": "tokens/s", "runs": decode_row["runs"]}
    return [single_row(f"{label} memory read bandwidth", [bandwidth / 1e9], "GB/s"),
            single_row(f"{label} weight bytes read per decoded token", [per_token / 1e9], "GB"), fraction]


# -- lora, batch, http ---------------------------------------------------------------------------

def lora_rows(model: str, dtype: str, runs: int, n_prompt: int, n_decode: int) -> list[dict]:
    from bench_lora import run

    target = model if model == "2b-shape" else model_path(model)
    args = argparse.Namespace(model=target, dtype=dtype, runs=runs, prompt_tokens=n_prompt, decode_tokens=n_decode)
    rows = run(args)
    for row in rows:
        row["name"] = row["name"].replace(target, model)
        if not row["name"].startswith(model):
            row["name"] = f"{model} {dtype} {row['name']}"
    return rows


def batch_rows(model: str, runs: int, n_decode: int, streams: tuple[int, ...]) -> list[dict]:
    from bench_batch import load, run_load

    runtime, adapters = load(model_path(model), max(streams))
    loads = {(n, kind): ([None] * n if kind == "base" else adapters[:n]) for n in streams for kind in ("base", "adapters")}
    for loras in loads.values():
        run_load(runtime, loras, 4)  # warm-up
    samples: dict[tuple[int, str], list[dict]] = {key: [] for key in loads}
    for _ in range(runs):
        for key, loras in loads.items():
            samples[key].append(run_load(runtime, loras, n_decode))
    return [row for n in streams for row in _batch_rows_for(model, n, samples)]


def _batch_rows_for(model: str, n: int, samples: dict[tuple[int, str], list[dict]]) -> list[dict]:
    from common import ratio_row

    tps = {key: [s["tps"] for s in values] for key, values in samples.items()}
    one = tps[(1, "base")]
    rows = [ratio_row(f"{model} batch {n} streams base aggregate decode", tps[(n, "base")], one, "1 stream", "tokens/s"),
            ratio_row(f"{model} batch {n} streams, one adapter each, aggregate decode", tps[(n, "adapters")], one,
                      "1 stream", "tokens/s"),
            ratio_row(f"{model} batch {n} streams, one adapter each, vs base-only", tps[(n, "adapters")],
                      tps[(n, "base")], f"{n} base streams", "tokens/s")]
    ttfts = sorted(t for s in samples[(n, "adapters")] for t in s["ttft"])
    rows.append({**single_row(f"{model} batch {n} streams, one adapter each, time to first token p50", ttfts, "s"),
                 "p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]})
    for row, load in zip(rows, ("base", "adapters", "adapters", "adapters")):
        row.update(streams=n, load=load)
    return rows


def http_rows(model: str, runs: int, n_decode: int) -> list[dict]:
    from bench_http import run

    return run(mlx_gemma.load(model_path(model)), model, n_decode, runs)


def run_section(section: str, model: str, dtype: str, size: tuple[int, int, int],
                streams: tuple[int, ...]) -> list[dict]:
    runs, n_prompt, n_decode = size
    if section == "generate":
        return generate_rows(model, dtype, runs, n_prompt, n_decode)
    if section == "lora":
        return lora_rows(model, dtype, runs, min(n_prompt, 32), n_decode)
    if section == "batch":
        return batch_rows(model, runs, n_decode, streams)
    if section == "http":
        return http_rows(model, runs, n_decode)
    raise SystemExit(f"unknown section {section!r}: generate, lora, batch or http")
