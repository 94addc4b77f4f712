"""KV cache for one decoder layer.

Contract: `update_and_fetch(keys, values)` appends (B, n_kv_heads, L, head_dim) keys and
values at position `offset` and returns every cached key and value so far. Storage grows in
blocks of `step` positions so that a decode step writes in place instead of concatenating.
All rows of a batch share one offset. `BatchKVCache` holds rows of different lengths for
batched decoding; models ask it for the attention mask (`batched` tells the two apart).
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    batched = False
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


class BatchKVCache:
    """The KV cache of one layer for rows of different lengths, decoded together one token a step.

    Row r holds its keys at positions [0, lengths[r]); the positions after that are padding,
    hidden by `mask`. `offset` is the (B,) array of lengths: each row's RoPE position for its
    next token. Rows join after a solo prefill (`add`, from a KVCache) and leave between steps
    (`keep`, which also shrinks the storage to what the remaining rows need); either copies the
    cache once, a step never does.
    """

    batched = True
    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self._set_lengths([])

    def _set_lengths(self, lengths: list[int]) -> None:
        """Lengths change once per step; the arrays built from them are made once per change."""
        self.lengths = lengths
        self._offset: mx.array | None = None
        self._masks: dict[int | None, mx.array] = {}

    @property
    def offset(self) -> mx.array:
        if self._offset is None:
            self._offset = mx.array(self.lengths, dtype=mx.int32)
        return self._offset

    def add(self, cache: KVCache) -> None:
        keys, values = cache.keys[..., : cache.offset, :], cache.values[..., : cache.offset, :]
        capacity = _round_up(max([cache.offset + 1, *[n + 1 for n in self.lengths]]), self.step)
        parts = [(keys, values)]
        if self.keys is not None:  # it may already be longer than the rows need (it grows a block at a time)
            capacity = max(capacity, self.keys.shape[2])
            parts.insert(0, (self.keys, self.values))
        self.keys = mx.concatenate([_pad_to(k, capacity) for k, _ in parts], axis=0)
        self.values = mx.concatenate([_pad_to(v, capacity) for _, v in parts], axis=0)
        self._set_lengths([*self.lengths, cache.offset])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order."""
        if not rows:
            self.keys = self.values = None
            self._set_lengths([])
            return
        lengths = [self.lengths[i] for i in rows]
        # Copy only the positions the kept rows need, so a long row that left frees its memory.
        capacity = min(self.keys.shape[2], _round_up(max(lengths) + 1, self.step))
        index = mx.array(rows, dtype=mx.int32)
        self.keys = mx.take(self.keys[..., :capacity, :], index, axis=0)
        self.values = mx.take(self.values[..., :capacity, :], index, axis=0)
        self._set_lengths(lengths)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write each row's one new key and value at its own position; return the visible span."""
        if max(self.lengths) + 1 > self.keys.shape[2]:
            capacity = self.keys.shape[2] + self.step
            self.keys, self.values = _pad_to(self.keys, capacity), _pad_to(self.values, capacity)
        where = self.offset[:, None, None, None]
        self.keys = mx.put_along_axis(self.keys, mx.broadcast_to(where, keys.shape), keys, axis=2)
        self.values = mx.put_along_axis(self.values, mx.broadcast_to(where, values.shape), values, axis=2)
        self._set_lengths([n + 1 for n in self.lengths])
        end = max(self.lengths)
        return self.keys[..., :end, :], self.values[..., :end, :]

    def mask(self, window: int | None = None) -> mx.array:
        """(B, 1, 1, T) bool for one query per row: its own keys, the last `window` of them if set."""
        if window not in self._masks:
            lengths = self.offset[:, None]
            positions = mx.arange(max(self.lengths))[None, :]
            visible = positions < lengths
            if window is not None:
                visible = visible & (positions >= lengths - window)
            self._masks[window] = visible[:, None, None, :]
        return self._masks[window]

    @property
    def state(self) -> list[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


def _round_up(n: int, step: int) -> int:
    return (n + step - 1) // step * step


def _pad_to(array: mx.array, length: int) -> mx.array:
    missing = length - array.shape[2]
    if missing <= 0:
        return array
    shape = (array.shape[0], array.shape[1], missing, array.shape[3])
    return mx.concatenate([array, mx.zeros(shape, array.dtype)], axis=2)
