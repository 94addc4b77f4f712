"""Gemma 1 (2B multi-query, 7B multi-head) in pure MLX, with Hugging Face weight names.

Numerics follow transformers' GemmaForCausalLM:
- the embedding is scaled by sqrt(hidden_size), the scale cast to the activation dtype first;
- RMSNorm computes in float32 as x * rsqrt(mean(x^2) + eps) * (1 + w), then casts back;
- the MLP is down(gelu_tanh(gate(x)) * up(x)): transformers uses the tanh approximation even
  where a config says `hidden_act: "gelu"`;
- attention uses rotate-half RoPE (theta from the config, 10000 for Gemma), scale
  head_dim ** -0.5, and as many KV heads as the config has (1 on 2B);
- the LM head is the embedding, tied, unless the config says `tie_word_embeddings: false` and
  the checkpoint holds its own `lm_head.weight` (as transformers and mlx-lm read it); an untied
  config without that weight ties (as mlx-lm does), and a tied one ignores a stray lm_head.

The module takes token ids (B, L) and an optional list of per-layer KV caches and returns
logits (B, L, vocab), or (B, 1, vocab) with `last_only=True`, which skips the vocabulary
projection of every prompt position but the last during prefill.
This file imports nothing but mlx.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        """Build from a Hugging Face config.json, ignoring keys this model does not use."""
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in config.items() if k in names})


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        scale = 1.0 + self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), scale, self.eps).astype(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, head_dim = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)
        self.rope = nn.RoPE(head_dim, traditional=False, base=args.rope_theta)

    def __call__(self, x: mx.array, cache: Any | None = None) -> mx.array:
        batch, length, _ = x.shape
        queries = self.q_proj(x).reshape(batch, length, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = self.k_proj(x).reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = 0 if cache is None else cache.offset
        queries = self.rope(queries, offset=offset)
        keys = self.rope(keys, offset=offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        mask = cache.mask() if getattr(cache, "batched", False) else ("causal" if length > 1 else None)
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, x: mx.array, cache: Any | None = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class GemmaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.hidden_size = args.hidden_size
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None) -> mx.array:
        h = self.embed_tokens(inputs)
        h = h * mx.array(self.hidden_size**0.5, dtype=mx.float32).astype(h.dtype)
        for layer, layer_cache in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, layer_cache)
        return self.norm(h)


class Model(nn.Module):
    body = GemmaModel  # what a subclass swaps for its own layers

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = self.body(args)
        if not args.tie_word_embeddings:  # sanitize drops it again when the checkpoint has no lm_head
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None, last_only: bool = False) -> mx.array:
        h = self.model(inputs, cache)
        if last_only:
            h = h[:, -1:, :]
        return self.lm_head(h) if "lm_head" in self else self.model.embed_tokens.as_linear(h)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop rotary buffers, and lm_head unless the model is untied; untied with no lm_head.weight: tie."""
        if "lm_head" in self and "lm_head.weight" not in weights:
            self.pop("lm_head")
        untied = "lm_head" in self
        return {k: v for k, v in weights.items()
                if "rotary_emb" not in k and (untied or not k.startswith("lm_head."))}
