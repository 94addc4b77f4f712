#!/usr/bin/env python3
"""Write reference logits from Hugging Face transformers for the tiny Gemma test checkpoints.

    python scripts/make_reference.py [--out tests/fixtures]

For each shape ("2b": multi-query, "7b": multi-head) this writes the tiny random checkpoint of
scripts/make_tiny_model.py (seed 0) into a temporary directory, loads it with
`Model` (float32, eager attention, eval mode) and computes the logits at
every position of four fixed token-id sequences with a plain forward pass (no cache). As a
self-check it decodes 8 tokens greedily from [<bos>] with the KV cache, and runs the longest
sequence as a cached prefill of its first half plus one-token steps, and asserts both sets of
cached logits match an uncached forward within 1e-5.

Outputs, under --out:
  gemma_tiny_{shape}_logits.npz   ids_0..ids_3 (int32), logits_0..logits_3 (float32, (len, vocab)),
                                  greedy_0 (int32, the 8 greedy ids after [<bos>])
  gemma_tiny_reference.json       transformers/torch versions, shapes, seed, date, the activation
                                  transformers resolved, max |logit|, top-2 margin and the cache
                                  check's max difference per shape

Needs torch and transformers (plus numpy, safetensors, tokenizers); run it by hand. The tests
only read the fixtures and never import torch. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_model import write_tiny_model  # noqa: E402

SHAPES = ("2b", "7b")
SEED = 0
GREEDY_STEPS = 8
CACHE_TOL = 1e-5
BOS = 2

Model = transformers.GemmaForCausalLM

# Fixed inputs (vocab size of the tiny tokenizer is 538). ids_0: "<bos>The capital of France is..",
# ids_1: just <bos> (length 1), ids_2: a chat prompt plus text (length 24), ids_3: no <bos>,
# with edge ids 0 (<pad>) and 537 (the last id).
SEQUENCES: list[list[int]] = [
    [2, 401, 406, 535, 524, 361, 348, 413, 492, 387],
    [2],
    [2, 5, 331, 329, 343, 263, 409, 462, 485, 322, 314, 264, 6, 263, 5, 368, 263,
     401, 406, 535, 524, 361, 348, 413],
    [300, 7, 537, 100, 0, 263],
]


def load_model(model_dir: Path) -> Model:
    """Load the checkpoint in float32 with eager attention; fail on missing or unexpected weights."""
    model, info = transformers.GemmaForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"weights did not load cleanly: {problems}")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model.eval()


@torch.inference_mode()
def full_logits(model: Model, ids: list[int]) -> np.ndarray:
    """Logits at every position of ids, one forward pass without a cache: (len, vocab) float32."""
    out = model(torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


def forward_cached(model: Model, ids: list[int], cache: object | None) -> tuple[torch.Tensor, object]:
    """One forward over ids on top of the KV cache; return (len, vocab) logits and the cache."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(torch.tensor([ids]), use_cache=True, **({name: cache} if cache is not None else {}))
    return out.logits[0], getattr(out, name)


@torch.inference_mode()
def greedy_cached(model: Model, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy decode with the KV cache; return the new ids and the logits that chose each one."""
    logits, cache = forward_cached(model, prompt, None)
    step_logits, new_ids = [logits[-1]], []
    for _ in range(steps):
        new_ids.append(int(step_logits[-1].argmax()))
        if len(new_ids) == steps:
            break
        logits, cache = forward_cached(model, new_ids[-1:], cache)
        step_logits.append(logits[-1])
    return new_ids, torch.stack(step_logits).numpy()


@torch.inference_mode()
def forced_cached(model: Model, ids: list[int], prefill: int) -> np.ndarray:
    """Logits of ids via a cached prefill of ids[:prefill], then one token at a time."""
    logits, cache = forward_cached(model, ids[:prefill], None)
    rows = [logits]
    for token in ids[prefill:]:
        logits, cache = forward_cached(model, [token], cache)
        rows.append(logits)
    return torch.cat(rows).numpy()


def check_cache(model: Model) -> tuple[list[int], float]:
    """Greedy 8 tokens from [<bos>] with the cache, and a cached teacher-forced pass over the
    longest sequence; assert both match uncached forwards within CACHE_TOL."""
    greedy, cached = greedy_cached(model, [BOS], GREEDY_STEPS)
    uncached = full_logits(model, [BOS] + greedy[:-1])[-GREEDY_STEPS:]
    if greedy != [int(i) for i in uncached.argmax(-1)]:
        raise AssertionError("greedy ids from the cached and uncached logits differ")
    longest = max(SEQUENCES, key=len)
    forced = forced_cached(model, longest, len(longest) // 2)
    diff = float(max(np.abs(cached - uncached).max(), np.abs(forced - full_logits(model, longest)).max()))
    if diff > CACHE_TOL:
        raise AssertionError(f"cached vs uncached logits differ by {diff:.3g} > {CACHE_TOL}")
    return greedy, diff


def activation_info(model: Model, model_dir: Path) -> dict:
    """What the checkpoint asks for, what transformers resolved, and a numerical confirmation."""
    raw = json.loads((model_dir / "config.json").read_text())
    act = model.model.layers[0].mlp.act_fn
    x = torch.linspace(-6.0, 6.0, 1001)
    with torch.inference_mode():
        y = act(x)
    tanh_err = float((y - torch.nn.functional.gelu(x, approximate="tanh")).abs().max())
    erf_err = float((y - torch.nn.functional.gelu(x)).abs().max())
    return {
        "config_json_hidden_act": raw.get("hidden_act"),
        "config_json_hidden_activation": raw.get("hidden_activation"),
        "resolved_config_hidden_act": model.config.hidden_act,
        "resolved_config_hidden_activation": getattr(model.config, "hidden_activation", None),
        "act_fn_class": f"{type(act).__module__}.{type(act).__qualname__}",
        "max_abs_diff_vs_gelu_tanh": tanh_err,
        "max_abs_diff_vs_gelu_erf": erf_err,
        "uses_tanh_approximation": tanh_err < 1e-6 < erf_err,
    }


def reference_for_shape(shape: str, out_dir: Path) -> dict:
    """Write gemma_tiny_{shape}_logits.npz; return a summary for the JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_model(Path(tmp) / f"tiny-{shape}", shape=shape, seed=SEED)
        model = load_model(model_dir)
        activation = activation_info(model, model_dir)
    vocab = model.config.vocab_size
    arrays: dict[str, np.ndarray] = {}
    for i, ids in enumerate(SEQUENCES):
        assert 1 <= len(ids) <= 24 and all(0 <= t < vocab for t in ids)
        arrays[f"ids_{i}"] = np.asarray(ids, dtype=np.int32)
        arrays[f"logits_{i}"] = full_logits(model, ids).astype(np.float32)
        assert arrays[f"logits_{i}"].shape == (len(ids), vocab)
    greedy, cache_diff = check_cache(model)
    arrays["greedy_0"] = np.asarray(greedy, dtype=np.int32)
    path = out_dir / f"gemma_tiny_{shape}_logits.npz"
    np.savez(path, **arrays)
    all_logits = [arrays[f"logits_{i}"] for i in range(len(SEQUENCES))]
    return {
        "file": path.name,
        "vocab_size": vocab,
        "num_attention_heads": model.config.num_attention_heads,
        "num_key_value_heads": model.config.num_key_value_heads,
        "greedy_0": greedy,
        "cache_check_max_abs_diff": cache_diff,
        "max_abs_logit": float(max(np.abs(l).max() for l in all_logits)),
        "logit_std": float(np.concatenate(all_logits).std()),
        "min_top2_margin": float(min((np.sort(l, -1)[:, -1] - np.sort(l, -1)[:, -2]).min() for l in all_logits)),
        "argmax_equals_input_fraction": float(np.mean(np.concatenate(
            [l.argmax(-1) == arrays[f"ids_{i}"] for i, l in enumerate(all_logits)]))),
        "activation": activation,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "fixtures")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shapes = {}
    for shape in SHAPES:
        shapes[shape] = summary = reference_for_shape(shape, args.out)
        act = summary["activation"]
        print(f"{shape}: hidden_act {act['config_json_hidden_act']!r} -> {act['resolved_config_hidden_act']!r} "
              f"({act['act_fn_class']}, tanh approximation: {act['uses_tanh_approximation']}); "
              f"max |logit| {summary['max_abs_logit']:.4f}; greedy {summary['greedy_0']}; "
              f"cache diff {summary['cache_check_max_abs_diff']:.2e}")
    record = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "date": datetime.date.today().isoformat(),
        "seed": SEED,
        "dtype": "float32",
        "attn_implementation": "eager",
        "sequence_lengths": [len(s) for s in SEQUENCES],
        "greedy_prompt": [BOS],
        "greedy_steps": GREEDY_STEPS,
        "cache_check_tolerance": CACHE_TOL,
        "shapes": shapes,
    }
    path = args.out / "gemma_tiny_reference.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {', '.join(s['file'] for s in shapes.values())} and {path.name} to {args.out}")


if __name__ == "__main__":
    main()
