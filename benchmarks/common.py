"""Shared pieces of the benchmark scripts: model presets, timing, and the result table.

Every row is one measurement: name, ours, reference, reference_name, ratio (median of the
pairwise ratios, ours / reference, each pair from the same run), ratio_min/ratio_max, unit,
runs. Import mlx_gemma before mlx so OpenBLAS is preloaded on Linux.
"""

from __future__ import annotations

import atexit
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import mlx_gemma  # noqa: E402,F401  (first: preloads OpenBLAS on Linux)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mlx_gemma.models import gemma  # noqa: E402

GEMMA_2B = dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18, intermediate_size=16384,
                num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=256000,
                rms_norm_eps=1e-6, rope_theta=10000.0)


def random_2b(dtype: str) -> nn.Module:
    """Our Gemma model with Gemma-2B's exact shapes and random weights (no download)."""
    model = gemma.Model(gemma.ModelArgs(**GEMMA_2B))
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return model


def scratch_dir(prefix: str = "mlx-gemma-bench-") -> Path:
    """A new temporary directory, removed when the benchmark process exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def tiny_model_dir() -> str:
    from make_tiny_model import write_tiny_model
    return str(write_tiny_model(scratch_dir() / "tiny"))


UNITS = {"decode_tps": "tokens/s", "prefill_tps": "tokens/s", "ttft_s": "s", "peak_memory_gb": "GB"}


def timed(tokens: Iterator[object], n_prompt: int) -> dict[str, float]:
    """Consume a token iterator; return prefill and decode tokens/s, time to first token and
    MLX's peak memory over the run."""
    mx.reset_peak_memory()
    start = time.perf_counter()
    first = None
    count = 0
    for _ in tokens:
        count += 1
        first = first or time.perf_counter()
    end = time.perf_counter()
    return {"prefill_tps": n_prompt / (first - start), "decode_tps": (count - 1) / max(end - first, 1e-9),
            "ttft_s": first - start, "tokens": count, "peak_memory_gb": mx.get_peak_memory() / 1e9}


def settle() -> None:
    """Wait, outside any timer, for work a runner left in flight: mlx-lm evaluates one step ahead,
    even past its last token, and that step must not be charged to the runner after it."""
    mx.synchronize()
    lm_generate = sys.modules.get("mlx_lm.generate")
    if lm_generate is not None:
        mx.synchronize(lm_generate.generation_stream)


def sample_runners(runners: dict[str, Callable[[], dict]], runs: int) -> dict[str, list[dict]]:
    """Warm each runner up, then alternate them `runs` times, in turn forwards and backwards so
    that none always runs right after the same other."""
    samples: dict[str, list[dict]] = {k: [] for k in runners}
    for run in runners.values():
        run()
        settle()
    for n in range(runs):
        for key, run in list(runners.items())[:: -1 if n % 2 else 1]:
            samples[key].append(run())
            settle()
    return samples


def ratio_row(name: str, ours: list[float], theirs: list[float], reference_name: str, unit: str) -> dict:
    """One measurement: medians, ours' min-max, and the median of the pairwise ratios."""
    ratios = [a / b for a, b in zip(ours, theirs)]
    return {"name": name, "ours": statistics.median(ours), "min": min(ours), "max": max(ours),
            "reference": statistics.median(theirs), "reference_name": reference_name,
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "unit": unit, "runs": len(ratios)}


def single_row(name: str, values: list[float], unit: str) -> dict:
    """A measurement with no reference: median with min and max."""
    return {"name": name, "ours": statistics.median(values), "min": min(values), "max": max(values),
            "reference": None, "reference_name": None, "ratio": None, "unit": unit, "runs": len(values)}


def compare(name: str, runners: dict[str, Callable[[], dict]], reference: str | Sequence[str], runs: int,
            metrics: tuple[str, ...] = ("decode_tps", "prefill_tps")) -> list[dict]:
    """Alternate the runners; one row per (runner, reference, metric) that both runners report."""
    references = [reference] if isinstance(reference, str) else list(reference)
    samples = sample_runners(runners, runs)
    rows = []
    for key in (k for k in runners if k not in references):
        for ref in references:
            for metric in metrics:
                if metric in samples[key][0] and metric in samples[ref][0]:
                    ours, theirs = [s[metric] for s in samples[key]], [s[metric] for s in samples[ref]]
                    rows.append(ratio_row(f"{name} {key} {metric}", ours, theirs, ref, UNITS.get(metric, "")))
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'measurement':52} {'ours':>10} {'reference':>18} {'ratio':>7} {'(min-max)':>13}")
    for r in rows:
        digits = 4 if r["unit"] == "s" else 1  # times to first token are milliseconds
        reference = f"{r['reference']:.{digits}f} {r['reference_name']}"
        print(f"{r['name']:52} {r['ours']:10.{digits}f} {reference:>18} {r['ratio']:7.3f} "
              f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f})")


SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_random_peft_adapter(out: Path, linears: dict[str, tuple[int, int]], rank: int = 8,
                              alpha: float = 16.0, seed: int = 0, model_type: str = "gemma") -> Path:
    """A PEFT-format rank-`rank` adapter on all seven projections of every layer, random weights."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for path, (n_in, n_out) in linears.items():
        if path.rsplit(".", 1)[-1] in SEVEN_PROJECTIONS:
            prefix = f"base_model.model.{path}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (0.01 * rng.standard_normal((n_out, rank))).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": SEVEN_PROJECTIONS,
              "bias": "none", "model_type": model_type}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out
