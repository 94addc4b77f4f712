"""KV cache for one decoder layer.

Contract: `update_and_fetch(keys, values)` appends (B, n_kv_heads, L, head_dim) keys and
values at position `offset` and returns every cached key and value so far. Storage grows in
blocks of `step` positions so that a decode step writes in place instead of concatenating.
All rows of a batch share one offset.
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def _grow(self, keys: mx.array, values: mx.array) -> None:
        batch, n_kv_heads, _, k_dim = keys.shape
        n_new = (keys.shape[2] + self.step - 1) // self.step * self.step
        new_k = mx.zeros((batch, n_kv_heads, n_new, k_dim), keys.dtype)
        new_v = mx.zeros((batch, n_kv_heads, n_new, values.shape[3]), values.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
            return
        self.keys = mx.concatenate([self.keys[..., : self.offset, :], new_k], axis=2)
        self.values = mx.concatenate([self.values[..., : self.offset, :], new_v], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        end = self.offset + keys.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            self._grow(keys, values)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    @property
    def state(self) -> list[mx.array]:
        """The arrays to evaluate with a step, so the cache never builds a long lazy graph."""
        return [] if self.keys is None else [self.keys, self.values]


def make_cache(num_layers: int) -> list[KVCache]:
    return [KVCache() for _ in range(num_layers)]
