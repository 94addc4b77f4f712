#!/usr/bin/env python3
"""The whole benchmark suite behind `mlx-gemma bench`: one run, one machine, JSON and a plot.

    python benchmarks/bench_suite.py [--model tiny|2b-shape|demo|PATH] [--quick] [--json PATH] [--plot PATH]

Each (section, model, dtype) of the plan runs in its own process (so peak memory and
OpenBLAS state are per measurement) and prints its rows as JSON:
- generate: decode and prefill tokens/s, time to first token and MLX peak memory, ours vs
  mlx-lm (`stream_generate` where the model has a tokenizer, `generate_step` at 2B shape,
  which has none) and vs llama.cpp (llama-cpp-python, when installed) on GGUF models; then
  the limit: measured memory read bandwidth / bytes read per decoded token, and our fraction.
- lora: base vs unfused rank 8 vs fused, adapter load and switch time (bench_lora.py).
- batch: 1, 4, 8, 16 concurrent streams, base-only and one adapter per stream (bench_batch.py).
- http: one stream through the SSE route vs the Python API (bench_http.py).
Every figure is a median over the runs with min and max; ratios are pair by pair in the same
run. The JSON holds the machine, the command, and one object per measurement with `name`,
`ours`, `reference`, `reference_name`, `ratio`, `unit`, `runs` (and min/max, ratio_min/max).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STREAMS = (1, 4, 8, 16)
QUICK = [("generate", "tiny", "float32"), ("lora", "tiny", "float32"), ("batch", "tiny", "float32"),
         ("http", "tiny", "float32"), ("generate", "2b-shape", "float32"), ("generate", "demo", "float32")]
FULL = [*QUICK, ("generate", "2b-shape", "bfloat16"), ("lora", "2b-shape", "float32"),
        ("batch", "demo", "float32"), ("http", "demo", "float32")]
SIZES = {  # (quick, full): runs, prompt tokens, decoded tokens per run
    "tiny": ((3, 64, 64), (7, 128, 128)),
    "demo": ((2, 16, 16), (3, 64, 32)),
    "2b-shape": ((2, 16, 4), (3, 32, 10)),
}


def plan(model: str | None, quick: bool) -> list[tuple[str, str, str]]:
    """The (section, model, dtype) list to run; a model outside the presets gets every section."""
    if model is None:
        return QUICK if quick else FULL
    entries = [entry for entry in (QUICK if quick else FULL) if entry[1] == model]
    return entries or [(section, model, "float32") for section in ("generate", "lora", "batch", "http")]


BATCH_RUNS = {"tiny": (15, 21)}  # (quick, full): a tiny batch run lasts about 0.1 s, so its median needs more


def sizes(model: str, quick: bool, section: str = "") -> tuple[int, int, int]:
    preset = SIZES.get(model, SIZES["demo"])
    runs, n_prompt, n_decode = preset[0] if quick else preset[1]
    if section == "batch" and model in BATCH_RUNS:
        runs = BATCH_RUNS[model][0 if quick else 1]
    return runs, n_prompt, n_decode


def run_worker(section: str, model: str, dtype: str, quick: bool) -> list[dict]:
    """Run one section in a child process; its last stdout line is the rows as JSON."""
    command = [sys.executable, str(HERE / "bench_suite.py"), "--worker", section, model, dtype] + (["--quick"] if quick else [])
    print(f"# {section} {model} {dtype} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"# {section} {model} {dtype} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return []
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"#   {len(rows)} measurements in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return [{**row, "section": section, "model": model, "dtype": dtype} for row in rows]


def machine() -> dict:
    """What the figures were measured on: never compare across two of these."""
    import mlx_gemma  # first: preloads OpenBLAS on Linux
    import mlx.core as mx
    from mlx_gemma import _platform

    cuda = bool(getattr(mx, "cuda", None) and mx.cuda.is_available())
    return {"platform": platform.platform(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "mlx": mx.__version__, "mlx_device": str(mx.default_device()), "mlx_backend": "cuda" if cuda else
            ("metal" if mx.metal.is_available() else "cpu"), "blas": _platform.blas_note(),
            "mlx_gemma": mlx_gemma.__version__, "mlx_lm": _version("mlx_lm"), "llama_cpp": _version("llama_cpp")}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def run_suite(model: str | None, quick: bool) -> dict:
    started = time.perf_counter()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": shlex.join(["mlx-gemma", "bench", *sys.argv[1:]]), "quick": quick,
              "machine": machine(), "measurements": []}
    for section, name, dtype in plan(model, quick):
        report["measurements"] += run_worker(section, name, dtype, quick)
    report["duration_s"] = round(time.perf_counter() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        from suite_sections import run_section

        section, model, dtype = argv[1:4]
        print(json.dumps(run_section(section, model, dtype, sizes(model, "--quick" in argv, section), STREAMS)))
        return 0
    parser = argparse.ArgumentParser(prog="mlx-gemma bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="one model: tiny, 2b-shape, demo, a directory or a .gguf file (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer models, runs and tokens (a few minutes)")
    parser.add_argument("--json", default="mlx-gemma-bench.json", help="where to write the measurements")
    parser.add_argument("--plot", default="mlx-gemma-bench.png", help="where to write the PNG")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from suite_report import print_report, write_plot

    report = run_suite(args.model, args.quick)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    write_plot(report, args.plot)
    print_report(report)
    print(f"# wrote {args.json} and {args.plot} in {report['duration_s']:.0f} s")
    return 0 if report["measurements"] else 1


if __name__ == "__main__":
    sys.exit(main())
