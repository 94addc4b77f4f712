#!/usr/bin/env python3
"""Write reference logits from Hugging Face transformers for the tiny Gemma test checkpoints.

    python scripts/make_reference.py [--out tests/fixtures] [--only gemma|adapters|gemma3 ...]

For each shape ("2b": multi-query, "7b": multi-head) this writes the tiny random checkpoint of
scripts/make_tiny_model.py (seed 0) into a temporary directory, loads it with
`Model` (float32, eager attention, eval mode) and computes the logits at
every position of four fixed token-id sequences with a plain forward pass (no cache). As a
self-check it decodes 8 tokens greedily from [<bos>] with the KV cache, and runs the longest
sequence as a cached prefill of its first half plus one-token steps, and asserts both sets of
cached logits match an uncached forward within 1e-5.

The Gemma 3 part does the same for the tiny `gemma3` checkpoint with Gemma3ForCausalLM (sliding
window 4, so the longer sequences exercise the window), on the same four sequences, and decodes
8 tokens greedily from GEMMA3_GREEDY_TEXT (tokenized with the checkpoint's tokenizer, <bos>
first, as the runtime's raw mode does); it asserts no greedy token is a stop id and runs the
same cache checks. --only picks parts (repeatable; default all), so the Gemma 3 golden can be
written without rewriting the others (np.savez stamps the time into its zip entries).

Outputs, under --out:
  gemma_tiny_{shape}_logits.npz   ids_0..ids_3 (int32), logits_0..logits_3 (float32, (len, vocab)),
                                  greedy_0 (int32, the 8 greedy ids after [<bos>])
  gemma_tiny_reference.json       transformers/torch versions, shapes, seed, date, the activation
                                  transformers resolved, max |logit|, top-2 margin and the cache
                                  check's max difference per shape
  adapters/<case>/                PEFT LoRA adapters with non-zero random weights (see ADAPTER_CASES):
                                  adapter_config.json and adapter_model.safetensors as written by
                                  PeftModel.save_pretrained, plus reference_logits.npz with
                                  ids_0..ids_2 (int32) and logits_0..logits_2 (float32, (len, vocab))
                                  of the PeftModel (eval, float32, eager, plain forward, no cache)
  gemma_tiny_gemma3_logits.npz    ids_0..ids_3, logits_0..logits_3 as above; greedy_text (str),
                                  greedy_prompt (int32, its ids), greedy_0 (int32, the 8 greedy ids)
  gemma_tiny_gemma3_reference.json  versions, date, the config as transformers resolved it (layer
                                  types, RoPE parameters per layer type, window, query scalar),
                                  the greedy ids, their smallest top-2 margin and the cache checks

Each adapter is built with a fixed torch seed on the seed-0 tiny checkpoint, saved, reloaded with
PeftModel.from_pretrained on a fresh base and checked to reproduce its logits within 1e-6; the
script asserts it moves the logits by more than 1e-2 vs the base. For reproducible files,
base_model_name_or_path is set to a fixed name, target_modules is written as a list in the
case's own order (PEFT itself writes list(set), whose order depends on PYTHONHASHSEED) and the
boilerplate README.md model card PEFT writes next to the adapter is deleted.

Needs torch, transformers and peft (plus numpy, safetensors, tokenizers); run it by hand. The
tests only read the fixtures and never import torch. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_model import write_tiny_model  # noqa: E402

SHAPES = ("2b", "7b")
SEED = 0
GREEDY_STEPS = 8
CACHE_TOL = 1e-5
BOS = 2

Model = transformers.PreTrainedModel
STOP_IDS = (1, 6)  # <eos>, <end_of_turn>: the runtime stops on these
GEMMA3_GREEDY_TEXT = "Tell me a story about a cat who"

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


def load_model(model_dir: Path, cls: type[Model] = transformers.GemmaForCausalLM) -> Model:
    """Load the checkpoint in float32 with eager attention; fail on missing or unexpected weights."""
    model, info = cls.from_pretrained(
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


def check_cache(model: Model, prompt_ids: tuple[int, ...] = (BOS,)) -> tuple[list[int], float]:
    """Greedy 8 tokens from prompt_ids with the cache, and a cached teacher-forced pass over the
    longest sequence; assert both match uncached forwards within CACHE_TOL."""
    prompt = list(prompt_ids)
    greedy, cached = greedy_cached(model, prompt, GREEDY_STEPS)
    uncached = full_logits(model, prompt + greedy[:-1])[-GREEDY_STEPS:]
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
        "resolved_config_hidden_act": getattr(model.config, "hidden_act", None),
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


# ---------------------------------------------------------------------------------------------
# Gemma 3


def top2_margin(logits: np.ndarray) -> float:
    """Smallest gap between the best and second-best logit over the rows."""
    top = np.sort(logits, -1)
    return float((top[..., -1] - top[..., -2]).min())


def gemma3_resolved_config(model: Model) -> dict:
    """The attention and RoPE settings as transformers read them from config.json."""
    config = model.config
    return {
        "layer_types": list(config.layer_types),
        "rope_parameters": config.rope_parameters,
        "sliding_window": config.sliding_window,
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "final_logit_softcapping": config.final_logit_softcapping,
        "attn_logit_softcapping": config.attn_logit_softcapping,
        "head_dim": config.head_dim,
    }


def reference_gemma3(out_dir: Path) -> dict:
    """Write gemma_tiny_gemma3_logits.npz and gemma_tiny_gemma3_reference.json; return the summary."""
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_model(Path(tmp) / "tiny-gemma3", shape="gemma3", seed=SEED)
        model = load_model(model_dir, transformers.Gemma3ForCausalLM)
        activation = activation_info(model, model_dir)
        prompt = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(GEMMA3_GREEDY_TEXT).ids
    assert prompt[0] == BOS and len(prompt) > model.config.sliding_window
    vocab = model.config.vocab_size
    arrays: dict[str, np.ndarray] = {}
    for i, ids in enumerate(SEQUENCES):
        arrays[f"ids_{i}"] = np.asarray(ids, dtype=np.int32)
        arrays[f"logits_{i}"] = full_logits(model, ids).astype(np.float32)
        assert arrays[f"logits_{i}"].shape == (len(ids), vocab)
    greedy, cache_diff = check_cache(model, tuple(prompt))
    if set(greedy) & set(STOP_IDS):
        raise AssertionError(f"greedy ids {greedy} hit a stop id: pick another GEMMA3_GREEDY_TEXT")
    greedy_logits = full_logits(model, prompt + greedy[:-1])[-GREEDY_STEPS:]
    arrays["greedy_text"] = np.asarray(GEMMA3_GREEDY_TEXT)
    arrays["greedy_prompt"] = np.asarray(prompt, dtype=np.int32)
    arrays["greedy_0"] = np.asarray(greedy, dtype=np.int32)
    path = out_dir / "gemma_tiny_gemma3_logits.npz"
    np.savez(path, **arrays)
    all_logits = [arrays[f"logits_{i}"] for i in range(len(SEQUENCES))]
    summary = {
        "file": path.name,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "date": datetime.date.today().isoformat(),
        "seed": SEED,
        "dtype": "float32",
        "attn_implementation": "eager",
        "model_class": type(model).__name__,
        "resolved_config": gemma3_resolved_config(model),
        "sequence_lengths": [len(s) for s in SEQUENCES],
        "greedy_text": GEMMA3_GREEDY_TEXT,
        "greedy_prompt": prompt,
        "greedy_0": greedy,
        "greedy_min_top2_margin": top2_margin(greedy_logits),
        "cache_check_tolerance": CACHE_TOL,
        "cache_check_max_abs_diff": cache_diff,
        "max_abs_logit": float(max(np.abs(l).max() for l in all_logits)),
        "min_top2_margin": float(min(top2_margin(l) for l in all_logits)),
        "argmax_equals_input_fraction": float(np.mean(np.concatenate(
            [l.argmax(-1) == arrays[f"ids_{i}"] for i, l in enumerate(all_logits)]))),
        "activation": activation,
    }
    (out_dir / "gemma_tiny_gemma3_reference.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------
# LoRA adapters (PEFT)

ADAPTER_TOL = 1e-6  # reloaded adapter vs the logits saved
MIN_ADAPTER_EFFECT = 1e-2  # an adapter must move some logit by more than this vs the base
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# ids_0: "<bos>The capital of France is.." (10), ids_1: just <bos> (1), ids_2: no <bos>, with the
# edge ids 0 (<pad>) and 537 (the last id) (20).
ADAPTER_SEQUENCES: list[list[int]] = [
    [2, 401, 406, 535, 524, 361, 348, 413, 492, 387],
    [2],
    [300, 7, 537, 100, 0, 263, 5, 331, 329, 343, 263, 409, 462, 485, 322, 314, 264, 6, 263, 401],
]


@dataclass(frozen=True)
class AdapterCase:
    """One adapter fixture: folder name, torch seed, LoraConfig keywords, base shape."""

    name: str
    seed: int
    lora: dict[str, Any]
    shape: str = "2b"


def case_all7_r8() -> AdapterCase:
    """All seven projections of every layer, r=8, alpha=16."""
    return AdapterCase("all7_r8", 1001, {"target_modules": ALL7, "r": 8, "lora_alpha": 16})


def case_all7_r8_7b() -> AdapterCase:
    """As all7_r8, on the multi-head 7b shape."""
    return AdapterCase("all7_r8_7b", 1002, {"target_modules": ALL7, "r": 8, "lora_alpha": 16}, shape="7b")


def case_regex_subset() -> AdapterCase:
    """target_modules as a regex string: q_proj, v_proj and down_proj of layer 1 only."""
    regex = r".*\.layers\.1\.(self_attn\.(q_proj|v_proj)|mlp\.down_proj)"
    return AdapterCase("regex_subset", 1003, {"target_modules": regex, "r": 4, "lora_alpha": 8})


def case_layers_subset() -> AdapterCase:
    """q_proj, o_proj and up_proj restricted to layer 0 with layers_to_transform."""
    lora = {"target_modules": ["q_proj", "o_proj", "up_proj"], "layers_to_transform": [0], "r": 8, "lora_alpha": 32}
    return AdapterCase("layers_subset", 1004, lora)


def case_rslora_patterns() -> AdapterCase:
    """rsLoRA (alpha / sqrt(r)) with per-module rank_pattern and alpha_pattern overrides."""
    lora = {"target_modules": ALL7, "r": 8, "lora_alpha": 16, "use_rslora": True,
            "rank_pattern": {"q_proj": 4, "layers.1.mlp.down_proj": 2}, "alpha_pattern": {"v_proj": 32}}
    return AdapterCase("rslora_patterns", 1005, lora)


def case_second_all7_r8() -> AdapterCase:
    """A second all-seven adapter (other seed, alpha=8), for batching two different adapters."""
    return AdapterCase("second_all7_r8", 1006, {"target_modules": ALL7, "r": 8, "lora_alpha": 8})


ADAPTER_CASES: tuple[Callable[[], AdapterCase], ...] = (
    case_all7_r8, case_all7_r8_7b, case_regex_subset, case_layers_subset, case_rslora_patterns,
    case_second_all7_r8,
)


def sequence_logits(model: torch.nn.Module, vocab: int) -> list[np.ndarray]:
    """full_logits of every ADAPTER_SEQUENCES entry, shape-checked."""
    out = []
    for ids in ADAPTER_SEQUENCES:
        assert 1 <= len(ids) <= 20 and all(0 <= t < vocab for t in ids)
        out.append(full_logits(model, ids).astype(np.float32))
        assert out[-1].shape == (len(ids), vocab)
    return out


def build_adapter(case: AdapterCase, base: Model) -> PeftModel:
    """Wrap base (in place) with the case's LoRA, non-zero random weights from the case's seed."""
    torch.manual_seed(case.seed)
    config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **case.lora)
    model = get_peft_model(base, config).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model


def save_adapter(model: PeftModel, case: AdapterCase, case_dir: Path) -> None:
    """save_pretrained (safetensors) with a fixed base name and an ordered target_modules list;
    drop the model card PEFT writes alongside."""
    config = model.peft_config["default"]
    config.base_model_name_or_path = f"tiny-gemma-{case.shape}-seed{SEED}"
    if isinstance(config.target_modules, set):  # PEFT would write list(set): hash-seed order
        config.target_modules = list(case.lora["target_modules"])
    # save_embedding_layers=False: "auto" would look base_model_name_or_path up on the Hub.
    model.save_pretrained(case_dir, safe_serialization=True, save_embedding_layers=False)
    (case_dir / "README.md").unlink(missing_ok=True)  # PEFT's boilerplate model card
    assert sorted(p.name for p in case_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def check_reload(model_dir: Path, case_dir: Path, saved: list[np.ndarray]) -> float:
    """Reload the saved adapter on a fresh base; assert it reproduces the saved logits."""
    reloaded = PeftModel.from_pretrained(load_model(model_dir), case_dir).eval()
    diff = max(float(np.abs(a - b).max()) for a, b in zip(sequence_logits(reloaded, reloaded.config.vocab_size), saved))
    if diff > ADAPTER_TOL:
        raise AssertionError(f"{case_dir.name}: reloaded adapter logits differ by {diff:.3g} > {ADAPTER_TOL}")
    return diff


def write_adapter_case(case: AdapterCase, out_dir: Path) -> dict:
    """Write adapters/<case>/ (adapter files + reference_logits.npz); return check numbers."""
    case_dir = out_dir / case.name
    case_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("adapter_config.json", "adapter_model.safetensors", "reference_logits.npz"):
        (case_dir / stale).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_model(Path(tmp) / f"tiny-{case.shape}", shape=case.shape, seed=SEED)
        base = load_model(model_dir)
        vocab = base.config.vocab_size
        base_logits = sequence_logits(base, vocab)
        model = build_adapter(case, base)
        logits = sequence_logits(model, vocab)
        save_adapter(model, case, case_dir)
        reload_diff = check_reload(model_dir, case_dir, logits)
    arrays = {f"ids_{i}": np.asarray(ids, dtype=np.int32) for i, ids in enumerate(ADAPTER_SEQUENCES)}
    arrays.update({f"logits_{i}": l for i, l in enumerate(logits)})
    np.savez(case_dir / "reference_logits.npz", **arrays)
    effect = max(float(np.abs(a - b).max()) for a, b in zip(logits, base_logits))
    if effect <= MIN_ADAPTER_EFFECT:
        raise AssertionError(f"{case.name}: adapter moves logits by only {effect:.3g} <= {MIN_ADAPTER_EFFECT}")
    return {"max_abs_change_vs_base": effect, "reload_max_abs_diff": reload_diff}


def write_adapters(out_dir: Path) -> None:
    """Write every ADAPTER_CASES fixture under out_dir and print its checks."""
    for make_case in ADAPTER_CASES:
        case = make_case()
        checks = write_adapter_case(case, out_dir)
        print(f"adapter {case.name} ({case.shape}): max |PEFT - base logits| {checks['max_abs_change_vs_base']:.4f}; "
              f"reload diff {checks['reload_max_abs_diff']:.2e}")


PARTS = ("gemma", "adapters", "gemma3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "fixtures")
    parser.add_argument("--only", choices=PARTS, action="append",
                        help="write only this part (repeatable): Gemma 1 logits, LoRA adapters or Gemma 3 logits")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = set(args.only or PARTS)
    if "gemma" in parts:
        write_gemma(args.out)
    if "adapters" in parts:
        write_adapters(args.out / "adapters")
        print(f"wrote {len(ADAPTER_CASES)} LoRA adapter fixtures to {args.out / 'adapters'}")
    if "gemma3" in parts:
        summary = reference_gemma3(args.out)
        print(f"gemma3: transformers read layer_types {summary['resolved_config']['layer_types']}, "
              f"rope_parameters {summary['resolved_config']['rope_parameters']}; "
              f"max |logit| {summary['max_abs_logit']:.4f}; greedy {summary['greedy_0']} "
              f"(min top-2 margin {summary['greedy_min_top2_margin']:.3f}); "
              f"cache diff {summary['cache_check_max_abs_diff']:.2e}; wrote {summary['file']}")


def write_gemma(out: Path) -> None:
    """The Gemma 1 goldens: gemma_tiny_{shape}_logits.npz and gemma_tiny_reference.json."""
    shapes = {}
    for shape in SHAPES:
        shapes[shape] = summary = reference_for_shape(shape, out)
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
    path = out / "gemma_tiny_reference.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {', '.join(s['file'] for s in shapes.values())} and {path.name} to {out}")


if __name__ == "__main__":
    main()
