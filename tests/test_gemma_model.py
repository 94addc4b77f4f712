"""Gemma 1 numerics against transformers' GemmaForCausalLM goldens (scripts/make_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx
import mlx_gemma
from mlx_gemma.models.cache import make_cache

from conftest import FIXTURES


def golden(shape: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / f"gemma_tiny_{shape}_logits.npz"))


@pytest.mark.parametrize("shape", ["2b", "7b"])
def test_logits_match_transformers_float32(tiny_dirs, shape):
    runtime = mlx_gemma.load(tiny_dirs[shape], dtype="float32")
    reference = golden(shape)
    n_cases = len([k for k in reference if k.startswith("ids_")])
    assert n_cases == 4
    for i in range(n_cases):
        ours = runtime.logits(reference[f"ids_{i}"].tolist())
        assert ours.dtype == np.float32
        assert ours.shape == reference[f"logits_{i}"].shape
        np.testing.assert_allclose(ours, reference[f"logits_{i}"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", ["2b", "7b"])
def test_shapes_are_multi_query_and_multi_head(tiny_dirs, shape):
    args = mlx_gemma.load(tiny_dirs[shape]).model.args
    assert args.num_key_value_heads == (1 if shape == "2b" else args.num_attention_heads)
    assert args.num_attention_heads * args.head_dim != args.hidden_size


def test_greedy_ids_match_transformers(runtime):
    reference = golden("2b")
    ids = [2]
    for _ in range(len(reference["greedy_0"])):
        ids.append(int(runtime.logits(ids)[-1].argmax()))
    assert ids[1:] == reference["greedy_0"].tolist()


def test_cached_decode_equals_full_forward(runtime):
    ids = golden("2b")["ids_2"].tolist()
    model = runtime.model
    cache = make_cache(len(model.layers))
    half = len(ids) // 2
    stepwise = [np.array(model(mx.array([ids[:half]]), cache=cache)[0])]
    for token in ids[half:]:
        stepwise.append(np.array(model(mx.array([[token]]), cache=cache)[0]))
    np.testing.assert_allclose(np.concatenate(stepwise), runtime.logits(ids), atol=1e-5)


def test_last_only_equals_last_row(runtime):
    ids = golden("2b")["ids_0"].tolist()
    last = np.array(runtime.model(mx.array([ids]), last_only=True)[0])
    np.testing.assert_allclose(last[0], runtime.logits(ids)[-1], atol=1e-6)


def test_bfloat16_and_quantized_stay_close(tiny_dir):
    reference = golden("2b")
    ids, expected = reference["ids_0"].tolist(), reference["logits_0"]
    for kwargs, tolerance in [({"dtype": "bfloat16"}, 0.35), ({"quantize": 8}, 0.35)]:
        runtime = mlx_gemma.load(tiny_dir, **kwargs)
        ours = runtime.logits(ids)
        assert np.abs(ours - expected).max() < tolerance, kwargs
        assert (ours.argmax(-1) == expected.argmax(-1)).mean() >= 0.8, kwargs
