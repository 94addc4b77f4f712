"""Model code the transformers goldens do not reach: float16 residual clipping, an untied LM head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mlx_gemma  # noqa: F401  (before mlx)
import mlx.core as mx
from mlx_gemma.loading import build_model, read_config, read_weights

from make_tiny_model import write_tiny_model

FLOAT16_MAX = float(np.finfo(np.float16).max)
IDS = list(range(3, 27))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    return {shape: write_tiny_model(base / shape, shape=shape, seed=0) for shape in ("2b", "gemma3")}


# ---------------------------------------------------------------------------------------------
# Gemma 3 in float16: a residual stream past float16's range, as real Gemma 3 models have


def overflowing_gemma3(model_dir: Path, dtype: str):
    """The tiny Gemma 3 with every post-norm at gain 1e4: each block adds < 40000, the sum reaches ~1e5."""
    weights = read_weights(model_dir)
    for name in weights:
        if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
            weights[name] = mx.full(weights[name].shape, 1e4 - 1.0)
    return build_model(read_config(model_dir), weights, dtype, None)[0]


def clipped_reference(model, ids: list[int]) -> np.ndarray:
    """Float32 forward with each residual add clipped to float16's range, written out here."""
    h = model.model.embed_tokens(mx.array([ids])) * model.args.hidden_size**0.5
    for layer in model.layers:
        h = mx.clip(h + layer.post_attention_layernorm(layer.self_attn(layer.input_layernorm(h))),
                    -FLOAT16_MAX, FLOAT16_MAX)
        h = mx.clip(h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h))),
                    -FLOAT16_MAX, FLOAT16_MAX)
    return np.array(model.model.embed_tokens.as_linear(model.model.norm(h))[0])


def test_gemma3_float16_residual_past_float16_range_stays_finite(dirs):
    model32, model16 = (overflowing_gemma3(dirs["gemma3"], dtype) for dtype in ("float32", "float16"))
    h = model32.model.embed_tokens(mx.array([IDS])) * model32.args.hidden_size**0.5
    for layer in model32.layers:
        h = layer(h)
    assert mx.abs(h).max().item() > 1.2 * FLOAT16_MAX  # the unclipped float32 stream does leave the range
    ours = np.array(model16(mx.array([IDS]))[0].astype(mx.float32))
    assert np.isfinite(ours).all()
    expected = clipped_reference(model32, IDS)
    np.testing.assert_allclose(ours, expected, atol=0.05, rtol=0)
    assert (ours.argmax(-1) == expected.argmax(-1)).all()


# ---------------------------------------------------------------------------------------------
# The LM head: tied to the embedding unless the config says untied and the checkpoint has one


def with_head(model_dir: Path, tie: bool | None, head: bool) -> tuple[dict, dict, np.ndarray]:
    config, weights = read_config(model_dir), read_weights(model_dir)
    config.pop("tie_word_embeddings", None)
    if tie is not None:
        config["tie_word_embeddings"] = tie
    lm_head = np.random.default_rng(1).standard_normal(np.array(weights["model.embed_tokens.weight"]).shape)
    if head:
        weights["lm_head.weight"] = mx.array(lm_head.astype(np.float32))
    return config, weights, lm_head.astype(np.float32)


def hidden_and_logits(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(model.model(mx.array([ids]))[0]), np.array(model(mx.array([ids]))[0])


@pytest.mark.parametrize("shape", ["2b", "gemma3"])
def test_untied_head_is_used(dirs, shape):
    config, weights, lm_head = with_head(dirs[shape], tie=False, head=True)
    model, _ = build_model(config, weights, "float32", None)
    hidden, logits = hidden_and_logits(model, IDS)
    np.testing.assert_allclose(logits, hidden @ lm_head.T, atol=1e-3, rtol=1e-4)
    last = np.array(model(mx.array([IDS]), last_only=True)[0])
    np.testing.assert_allclose(last, (hidden @ lm_head.T)[-1:], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("tie, head", [(True, True), (None, True), (False, False)])
def test_tied_head_is_the_embedding(dirs, tie, head):
    """A stray lm_head of a tied config is dropped; an untied config without one ties, as mlx-lm does."""
    config, weights, _ = with_head(dirs["2b"], tie=tie, head=head)
    embedding = np.array(weights["model.embed_tokens.weight"])
    model, _ = build_model(config, weights, "float32", None)
    hidden, logits = hidden_and_logits(model, IDS)
    assert "lm_head" not in model
    np.testing.assert_allclose(logits, hidden @ embedding.T, atol=1e-3, rtol=1e-4)


def test_untied_head_is_quantized_with_the_rest(dirs):
    config, weights, _ = with_head(dirs["2b"], tie=False, head=True)
    model, _ = build_model(config, weights, "float32", 8)
    assert model.lm_head.bits == 8
