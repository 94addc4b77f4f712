"""Gemma 3 text (270M, 1B) in pure MLX, with Hugging Face weight names.

Numerics follow transformers' Gemma3ForCausalLM:
- the embedding is scaled by sqrt(hidden_size), the scale cast to the activation dtype first;
- RMSNorm is Gemma's float32 x * rsqrt(mean(x^2) + eps) * (1 + w); queries and keys get their
  own per-head RMSNorm (q_norm, k_norm) before RoPE;
- each block is x + post_attention_norm(attn(input_norm(x))), then
  h + post_feedforward_norm(mlp(pre_feedforward_norm(h))), the MLP gelu_tanh-gated;
- attention scale is query_pre_attn_scalar ** -0.5; layers alternate between sliding-window
  ("sliding_attention": a query sees itself and the sliding_window - 1 keys before it, RoPE
  base rope_local_base_freq) and global ("full_attention": causal, RoPE base rope_theta, with
  linear rope_scaling when the config has it) as `layer_types` says (else every
  `sliding_window_pattern`-th layer is global);
- the LM head is tied to the embedding or not as in models/gemma.py; final_logit_softcapping
  applies tanh capping if set;
- in float16 each residual add runs in float32, clipped to float16's range, then cast back (as
  mlx-lm's gemma3_text `clip_residual`): the residual stream of real Gemma 3 models grows past
  float16's max (65504); other dtypes add plainly.

Same interface as models/gemma.py: `Model(inputs (B, L), cache=None, last_only=False)` returns
logits (B, L, vocab). The KV cache keeps every position (exact for any length); sliding layers
mask or slice it to their window. This file imports nothing but mlx.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import gemma
from .gemma import MLP, RMSNorm

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class ModelArgs(gemma.ModelArgs):
    """Gemma 1's arguments, Gemma 3's defaults, and the Gemma 3 additions."""

    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    rope_local_base_freq: float = 10_000.0
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int = 512
    sliding_window_pattern: int = 6
    layer_types: list[str] | None = None
    query_pre_attn_scalar: float = 256.0
    final_logit_softcapping: float | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        """Build from a Hugging Face config.json (either rope layout), ignoring unused keys."""
        return super().from_dict({**config, **_rope_fields(config.get("rope_parameters"))})

    def layer_kinds(self) -> list[str]:
        if self.layer_types:
            return list(self.layer_types)
        pattern = self.sliding_window_pattern
        return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(self.num_hidden_layers)]


def _rope_fields(rope_parameters: dict[str, Any] | None) -> dict[str, Any]:
    """transformers 5 keeps RoPE per layer type: {"full_attention": {...}, "sliding_attention": {...}}."""
    if not rope_parameters or FULL not in rope_parameters:
        return {}
    full, local = rope_parameters[FULL], rope_parameters.get(SLIDING, {})
    fields = {"rope_theta": full["rope_theta"], "rope_local_base_freq": local.get("rope_theta", 10_000.0)}
    if full.get("rope_type", "default") != "default":
        fields["rope_scaling"] = full
    return fields


def _rope(head_dim: int, base: float, scaling: dict[str, Any] | None) -> nn.RoPE:
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "default":
        return nn.RoPE(head_dim, traditional=False, base=base)
    if kind == "linear":
        return nn.RoPE(head_dim, traditional=False, base=base, scale=1.0 / float(scaling["factor"]))
    raise ValueError(f"rope_scaling type {kind!r} is not supported: Gemma 3 text uses default or linear")


def window_mask(n_queries: int, n_keys: int, window: int) -> mx.array:
    """(n_queries, n_keys) bool: the queries are the last n_queries of n_keys positions."""
    query_pos = mx.arange(n_keys - n_queries, n_keys)[:, None]
    distance = query_pos - mx.arange(n_keys)[None, :]
    return (distance >= 0) & (distance < window)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, kind: str):
        super().__init__()
        dim, head_dim = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.scale = args.query_pre_attn_scalar**-0.5
        self.window = args.sliding_window if kind == SLIDING else None
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, args.rms_norm_eps)
        base = args.rope_local_base_freq if kind == SLIDING else args.rope_theta
        self.rope = _rope(head_dim, base, None if kind == SLIDING else args.rope_scaling)

    def _heads(self, x: mx.array, n: int) -> mx.array:
        batch, length, _ = x.shape
        return x.reshape(batch, length, n, -1).transpose(0, 2, 1, 3)

    def __call__(self, x: mx.array, cache: Any | None = None) -> mx.array:
        batch, length, _ = x.shape
        queries = self.q_norm(self._heads(self.q_proj(x), self.n_heads))
        keys = self.k_norm(self._heads(self.k_proj(x), self.n_kv_heads))
        values = self._heads(self.v_proj(x), self.n_kv_heads)
        offset = 0 if cache is None else cache.offset
        queries, keys = self.rope(queries, offset=offset), self.rope(keys, offset=offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        if getattr(cache, "batched", False):
            mask = cache.mask(self.window)
        else:
            keys, values, mask = self._visible(keys, values, length)
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))

    def _visible(self, keys: mx.array, values: mx.array, length: int) -> tuple[mx.array, mx.array, Any]:
        n_keys = keys.shape[2]
        if self.window is None or n_keys <= self.window:
            return keys, values, ("causal" if length > 1 else None)
        if length == 1:  # decode: the window is just the last `window` keys
            return keys[..., -self.window:, :], values[..., -self.window:, :], None
        start = max(0, n_keys - length - self.window + 1)  # keys no query of this chunk can see
        keys, values = keys[..., start:, :], values[..., start:, :]
        return keys, values, window_mask(length, n_keys - start, self.window)


FLOAT16_MAX = float(mx.finfo(mx.float16).max)


def clip_residual(x: mx.array, y: mx.array) -> mx.array:
    """x + y; in float16, summed in float32 and clipped to float16's range so it cannot overflow."""
    if x.dtype != mx.float16:
        return x + y
    return mx.clip(x.astype(mx.float32) + y.astype(mx.float32), -FLOAT16_MAX, FLOAT16_MAX).astype(mx.float16)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, kind: str):
        super().__init__()
        self.self_attn = Attention(args, kind)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        norm = lambda: RMSNorm(args.hidden_size, args.rms_norm_eps)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def __call__(self, x: mx.array, cache: Any | None = None) -> mx.array:
        h = clip_residual(x, self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cache)))
        return clip_residual(h, self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h))))


class Gemma3Model(gemma.GemmaModel):
    """Gemma 1's body (scaled embedding, layers, final norm) with Gemma 3's layers."""

    def __init__(self, args: ModelArgs):
        nn.Module.__init__(self)
        self.hidden_size = args.hidden_size
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, kind) for kind in args.layer_kinds()]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Model(gemma.Model):
    """Gemma 1's wrapper (LM head tied or not) around the Gemma 3 body, with optional final softcapping."""

    body = Gemma3Model

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None, last_only: bool = False) -> mx.array:
        logits = super().__call__(inputs, cache, last_only)
        cap = self.args.final_logit_softcapping
        return logits if not cap else mx.tanh(logits / cap) * cap
