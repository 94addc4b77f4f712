#!/usr/bin/env python3
"""HTTP overhead: one greedy stream through the Workers AI SSE route vs the Python API.

    python benchmarks/bench_http.py [--model tiny|demo|PATH] [--tokens 64] [--runs 5] [--json out.json]

The server (`build_app`, uvicorn on a loopback port, in this process) and the Python API
share one runtime. Each run streams the same raw prompt both ways, alternating: over HTTP
with `"stream": true` (time to first token is the first non-empty `response` event; the token
count comes from the final usage event), and through `Runtime.stream`. Decode tokens/s counts
the tokens after the first over the time after the first. Ratios are HTTP / Python, pair by pair.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare, print_rows, scratch_dir, tiny_model_dir  # noqa: E402  (imports mlx_gemma first)

import httpx  # noqa: E402

import mlx_gemma  # noqa: E402
from mlx_gemma.server.app import build_app  # noqa: E402
from mlx_gemma.server.background import serving  # noqa: E402
from mlx_gemma.server.service import Settings  # noqa: E402

PROMPT = "The history of the lighthouse begins"
ROUTE = "/client/v4/accounts/local/ai/run/@cf/google/gemma-2b-it-lora"


def rates(start: float, first: float, end: float, tokens: int) -> dict[str, float]:
    return {"decode_tps": (tokens - 1) / max(end - first, 1e-9), "ttft_s": first - start, "tokens": tokens}


def over_http(client: httpx.Client, tokens: int) -> dict[str, float]:
    body = {"prompt": PROMPT, "raw": True, "stream": True, "temperature": 0, "max_tokens": tokens}
    start, first, count = time.perf_counter(), None, 0
    with client.stream("POST", ROUTE, json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: "):])
            if event["response"] and first is None:
                first = time.perf_counter()
            count = event.get("usage", {}).get("completion_tokens", count)
    return rates(start, first or time.perf_counter(), time.perf_counter(), count)


def in_python(runtime: mlx_gemma.Runtime, tokens: int) -> dict[str, float]:
    start, first = time.perf_counter(), None
    stream = runtime.stream(prompt=PROMPT, raw=True, temperature=0, max_tokens=tokens)
    for piece in stream:
        if piece and first is None:
            first = time.perf_counter()
    return rates(start, first or time.perf_counter(), time.perf_counter(), len(stream.token_ids))


def run(runtime: mlx_gemma.Runtime, label: str, tokens: int, runs: int) -> list[dict]:
    app = build_app(runtime, Settings(data_dir=scratch_dir()))
    with serving(app) as url, httpx.Client(base_url=url, timeout=600) as client:
        runners: dict[str, Callable[[], dict]] = {"HTTP SSE": lambda: over_http(client, tokens),
                                                  "Python API": lambda: in_python(runtime, tokens)}
        return compare(f"{label} one stream", runners, "Python API", runs, metrics=("decode_tps", "ttft_s"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    runtime = mlx_gemma.load(tiny_model_dir() if args.model == "tiny" else args.model)
    rows = run(runtime, args.model, args.tokens, args.runs)
    print_rows(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
