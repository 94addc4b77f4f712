"""Gemma 3 text numerics against transformers' Gemma3ForCausalLM goldens (scripts/make_reference.py).

The tiny `gemma3` checkpoint of scripts/make_tiny_model.py has 4 layers (sliding, sliding,
global, sliding) with a sliding window of 4, so the 24-token golden sequence exercises the
window; query_pre_attn_scalar (24) differs from head_dim (32).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mlx.core as mx
import mlx.nn as nn
import mlx_gemma
from mlx_gemma.loading import build_model, read_weights
from mlx_gemma.models import gemma3
from mlx_gemma.models.cache import make_cache
from mlx_gemma.models.gemma3 import FULL, SLIDING, ModelArgs, window_mask

from conftest import FIXTURES
from make_tiny_model import write_tiny_model

TOL = 1e-4


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "gemma3", shape="gemma3", seed=0)


@pytest.fixture(scope="module")
def gemma3_runtime(gemma3_dir: Path) -> mlx_gemma.Runtime:
    return mlx_gemma.load(gemma3_dir, dtype="float32")


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / "gemma_tiny_gemma3_logits.npz"))


def config_of(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())


def forward(model: nn.Module, ids: list[int]) -> np.ndarray:
    """(len, vocab) logits of one sequence, no cache."""
    return np.array(model(mx.array([ids], dtype=mx.int32))[0])


# ---------------------------------------------------------------------------------------------
# Against transformers


def test_checkpoint_is_gemma3_with_both_layer_kinds(gemma3_runtime):
    args = gemma3_runtime.model.args
    assert gemma3_runtime.loaded.config["model_type"] == "gemma3_text"
    assert args.layer_kinds() == [SLIDING, SLIDING, FULL, SLIDING]
    assert (args.sliding_window, args.query_pre_attn_scalar, args.head_dim) == (4, 24, 32)
    assert args.num_attention_heads * args.head_dim != args.hidden_size
    assert [layer.self_attn.window for layer in gemma3_runtime.model.layers] == [4, 4, None, 4]


def test_logits_match_transformers_float32(gemma3_runtime, golden):
    n_cases = len([k for k in golden if k.startswith("ids_")])
    assert n_cases == 4 and max(len(golden[f"ids_{i}"]) for i in range(n_cases)) == 24
    for i in range(n_cases):
        ours = gemma3_runtime.logits(golden[f"ids_{i}"].tolist())
        assert ours.dtype == np.float32 and ours.shape == golden[f"logits_{i}"].shape
        np.testing.assert_allclose(ours, golden[f"logits_{i}"], atol=TOL, rtol=0)


# Each setting the golden pins down: getting it wrong moves the logits far past TOL.
WRONG_SETTINGS = {
    "rope bases swapped": {"rope_parameters": {FULL: {"rope_type": "default", "rope_theta": 10_000.0},
                                               SLIDING: {"rope_type": "default", "rope_theta": 1_000_000.0}}},
    "no window": {"sliding_window": 512},
    "window one wider": {"sliding_window": 5},
    "every layer global": {"layer_types": [FULL] * 4},
    "every layer sliding": {"layer_types": [SLIDING] * 4},
    "scale from head_dim": {"query_pre_attn_scalar": 32},
}


@pytest.mark.parametrize("change", WRONG_SETTINGS.values(), ids=WRONG_SETTINGS.keys())
def test_golden_rejects_wrong_settings(gemma3_dir, golden, change):
    model, _ = build_model({**config_of(gemma3_dir), **change}, read_weights(gemma3_dir), "float32", None)
    assert np.abs(forward(model, golden["ids_2"].tolist()) - golden["logits_2"]).max() > 1.0


@pytest.mark.parametrize(("kwargs", "tolerance"), [
    ({"dtype": "float16"}, 0.05), ({"dtype": "bfloat16"}, 0.35), ({"quantize": 8}, 0.5)])
def test_half_precision_and_quantized_stay_close(gemma3_dir, golden, kwargs, tolerance):
    runtime = mlx_gemma.load(gemma3_dir, **kwargs)
    ours, expected = runtime.logits(golden["ids_2"].tolist()), golden["logits_2"]
    assert np.abs(ours - expected).max() < tolerance
    assert (ours.argmax(-1) == expected.argmax(-1)).mean() >= 0.8


def test_greedy_generation_matches_transformers(gemma3_runtime, golden):
    text = str(golden["greedy_text"])
    ids, _ = gemma3_runtime.prepare(prompt=text, raw=True, temperature=0, max_tokens=8)
    assert ids == golden["greedy_prompt"].tolist() and len(ids) > 4
    result = gemma3_runtime.generate(prompt=text, raw=True, temperature=0, max_tokens=8)
    assert result.token_ids == golden["greedy_0"].tolist()
    assert result.finish_reason == "length"


# ---------------------------------------------------------------------------------------------
# Cache and sliding window


def test_window_mask_literal():
    assert window_mask(3, 6, 2).tolist() == [
        [False, False, True, True, False, False],
        [False, False, False, True, True, False],
        [False, False, False, False, True, True],
    ]
    assert window_mask(4, 4, 3).tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [False, True, True, True],
    ]


def cached_logits(model: nn.Module, ids: list[int], prefill: int, step: int) -> np.ndarray:
    """Logits of ids from a cached prefill of ids[:prefill], then chunks of `step` tokens."""
    cache = make_cache(len(model.layers))
    bounds = [0, *range(prefill, len(ids), step), len(ids)]
    rows = [np.array(model(mx.array([ids[a:b]]), cache=cache)[0]) for a, b in zip(bounds, bounds[1:])]
    return np.concatenate(rows)


@pytest.fixture
def visible_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int | None, int, int]]:
    """Record (window, n_keys, n_queries) of every Attention._visible call."""
    calls: list[tuple[int | None, int, int]] = []
    original: Callable = gemma3.Attention._visible

    def spy(self, keys, values, length):
        calls.append((self.window, keys.shape[2], length))
        return original(self, keys, values, length)

    monkeypatch.setattr(gemma3.Attention, "_visible", spy)
    return calls


@pytest.mark.parametrize("prefill", [1, 3, 7])
@pytest.mark.parametrize("step", [1, 3, 6])
def test_chunked_prefill_and_decode_equal_full_forward(gemma3_runtime, visible_calls, prefill, step):
    ids = [2, 5, 331, 329, 343, 263, 409, 462, 485, 322, 314, 264, 6, 263, 5, 368, 263, 401, 406, 535]
    model = gemma3_runtime.model
    full = forward(model, ids)
    visible_calls.clear()
    np.testing.assert_allclose(cached_logits(model, ids, prefill, step), full, atol=TOL, rtol=0)
    sliding_past_window = [(n_keys, n) for window, n_keys, n in visible_calls if window and n_keys > window]
    if step == 1:  # decode: the slice of the last `window` keys
        assert any(n == 1 for _, n in sliding_past_window)
    else:  # chunks past the window: the masked path
        assert any(n > 1 and n_keys > n for n_keys, n in sliding_past_window)


def test_long_decode_past_window_matches_golden(gemma3_runtime, golden):
    ids = golden["ids_2"].tolist()
    np.testing.assert_allclose(cached_logits(gemma3_runtime.model, ids, 2, 1), golden["logits_2"], atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Config reading


def old_style(config: dict[str, Any], rope_theta: float, local: float, pattern: int) -> dict[str, Any]:
    """The same model as transformers 4.x configs wrote it: flat RoPE keys, a layer period."""
    config = {k: v for k, v in config.items() if k not in ("rope_parameters", "layer_types")}
    return {**config, "rope_theta": rope_theta, "rope_local_base_freq": local, "sliding_window_pattern": pattern}


def new_style(config: dict[str, Any], rope_theta: float, local: float, layer_types: list[str]) -> dict[str, Any]:
    """transformers 5: RoPE per layer type, explicit layer_types."""
    rope = {FULL: {"rope_type": "default", "rope_theta": rope_theta},
            SLIDING: {"rope_type": "default", "rope_theta": local}}
    config = {k: v for k, v in config.items() if k != "sliding_window_pattern"}
    return {**config, "rope_parameters": rope, "layer_types": layer_types}


def rope_of(args: ModelArgs) -> list[tuple[float, float]]:
    """(base, scale) of each layer's RoPE in a model built from args."""
    return [(layer.self_attn.rope.base, layer.self_attn.rope.scale) for layer in gemma3.Model(args).layers]


def test_from_dict_reads_the_tiny_config(gemma3_dir):
    args = ModelArgs.from_dict(config_of(gemma3_dir))
    assert (args.rope_theta, args.rope_local_base_freq, args.rope_scaling) == (1_000_000.0, 10_000.0, None)
    assert args.layer_kinds() == [SLIDING, SLIDING, FULL, SLIDING]
    assert rope_of(args) == [(10_000.0, 1.0), (10_000.0, 1.0), (1_000_000.0, 1.0), (10_000.0, 1.0)]


def test_from_dict_old_and_new_configs_agree(gemma3_dir):
    base = config_of(gemma3_dir)
    kinds = [SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL]
    base = {**base, "num_hidden_layers": 6}
    old = ModelArgs.from_dict(old_style(base, 500_000.0, 20_000.0, 3))
    new = ModelArgs.from_dict(new_style(base, 500_000.0, 20_000.0, kinds))
    for args in (old, new):
        assert (args.rope_theta, args.rope_local_base_freq, args.rope_scaling) == (500_000.0, 20_000.0, None)
        assert args.layer_kinds() == kinds
    assert rope_of(old) == rope_of(new) == [(20_000.0, 1.0)] * 2 + [(500_000.0, 1.0)] + [(20_000.0, 1.0)] * 2 + [
        (500_000.0, 1.0)]


def test_from_dict_linear_rope_scaling_on_global_layers_only(gemma3_dir):
    base = config_of(gemma3_dir)
    new = new_style(base, 1_000_000.0, 10_000.0, [SLIDING, SLIDING, FULL, SLIDING])
    new["rope_parameters"][FULL].update(rope_type="linear", factor=8.0)
    old = {**old_style(base, 1_000_000.0, 10_000.0, 3), "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    expected = [(10_000.0, 1.0), (10_000.0, 1.0), (1_000_000.0, 0.125), (10_000.0, 1.0)]
    assert rope_of(ModelArgs.from_dict(new)) == rope_of(ModelArgs.from_dict(old)) == expected


# ---------------------------------------------------------------------------------------------
# LoRA


def write_peft_adapter(path: Path, layer_dims: dict[str, tuple[int, int]], r: int, alpha: float,
                       seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A PEFT LoRA adapter on the given "model.layers.i.self_attn.X" linears (out, in dims);
    return its (A (r, in), B (out, r)) per module."""
    rng = np.random.default_rng(seed)
    pairs = {module: ((rng.standard_normal((r, d_in)) / np.sqrt(d_in)).astype(np.float32),
                      (0.5 * rng.standard_normal((d_out, r)) / np.sqrt(r)).astype(np.float32))
             for module, (d_out, d_in) in layer_dims.items()}
    tensors = {}
    for module, (a, b) in pairs.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"],
              "bias": "none", "task_type": "CAUSAL_LM"}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return pairs


def test_lora_equals_merged_weights(gemma3_dir, golden, tmp_path):
    base_weights = load_file(str(gemma3_dir / "model.safetensors"))
    targets = [f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj")]
    r, alpha = 4, 8.0
    pairs = write_peft_adapter(tmp_path / "adapter", {m: base_weights[f"{m}.weight"].shape for m in targets},
                               r, alpha, seed=7)

    runtime = mlx_gemma.load(gemma3_dir, dtype="float32")
    runtime.add_adapter("a", str(tmp_path / "adapter"))
    merged = mlx_gemma.load(gemma3_dir, dtype="float32")
    merged.model.load_weights([(f"{m}.weight", mx.array(base_weights[f"{m}.weight"] + (alpha / r) * (b @ a)))
                               for m, (a, b) in pairs.items()], strict=False)

    for i in (0, 2):
        ids = golden[f"ids_{i}"].tolist()
        adapted = runtime.logits(ids, lora="a")
        np.testing.assert_allclose(adapted, merged.logits(ids), atol=TOL, rtol=0)
        assert np.abs(adapted - golden[f"logits_{i}"]).max() > 0.1  # the adapter does something
        np.testing.assert_allclose(runtime.logits(ids), golden[f"logits_{i}"], atol=TOL, rtol=0)  # base intact
