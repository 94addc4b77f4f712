"""Engine over token ids, tested with a scripted mock model (no weights)."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import pytest

from mlx_gemma import engine
from mlx_gemma.engine import generate_tokens
from mlx_gemma.sampler import GenerationParams

VOCAB = 32
STOP = frozenset({1, 6})


class ScriptedModel:
    """Predicts script[position] at every position; records the lengths it was called with."""

    def __init__(self, script: list[int], n_layers: int = 2):
        self.script = script
        self.layers = [None] * n_layers
        self.args = SimpleNamespace(vocab_size=VOCAB)
        self.calls: list[int] = []

    def __call__(self, inputs: mx.array, cache=None, last_only: bool = False) -> mx.array:
        batch, length = inputs.shape
        start = cache[0].offset
        for layer_cache in cache:
            layer_cache.update_and_fetch(mx.zeros((batch, 1, length, 2)), mx.zeros((batch, 1, length, 2)))
        self.calls.append(length)
        positions = range(start + length - 1, start + length) if last_only else range(start, start + length)
        rows = [mx.eye(VOCAB)[self.script[p % len(self.script)]] * 10 for p in positions]
        return mx.stack(rows)[None]


def run(model, prompt, **params):
    steps = list(generate_tokens(model, prompt, GenerationParams(temperature=0, **params), STOP, 64))
    return [s.token for s in steps], [s.finish_reason for s in steps]


def test_stops_on_stop_id_and_counts_it():
    tokens, reasons = run(ScriptedModel([9, 9, 9, 10, 11, 6, 12]), [2, 3, 4])
    assert tokens == [9, 10, 11, 6]  # position 2 (the last prompt token) predicts script[2]
    assert reasons == [None, None, None, "stop"]


def test_stops_on_eos_too():
    tokens, reasons = run(ScriptedModel([9, 9, 13, 1]), [2, 3])
    assert (tokens, reasons[-1]) == ([9, 13, 1], "stop")


def test_max_tokens_gives_length_and_no_extra_step():
    model = ScriptedModel([7])
    tokens, reasons = run(model, [2, 3], max_tokens=4)
    assert tokens == [7, 7, 7, 7] and reasons == [None, None, None, "length"]
    assert model.calls == [2, 1, 1, 1]  # one prefill + three decode steps: nothing computed past the limit


def test_context_limit_ends_with_length():
    steps = list(generate_tokens(ScriptedModel([7]), list(range(60)), GenerationParams(temperature=0), STOP, 64))
    assert len(steps) == 4 and steps[-1].finish_reason == "length"


def test_prompt_too_long_is_refused():
    with pytest.raises(ValueError, match="the prompt has 64 tokens but the model's context holds 64"):
        list(generate_tokens(ScriptedModel([7]), list(range(64)), GenerationParams(), STOP, 64))


def test_long_prompt_is_prefilled_in_chunks(monkeypatch):
    monkeypatch.setattr(engine, "PREFILL_CHUNK", 8)
    model = ScriptedModel([7])
    steps = list(generate_tokens(model, list(range(20)), GenerationParams(temperature=0, max_tokens=2), STOP, 64))
    assert model.calls == [8, 8, 4, 1] and [s.token for s in steps] == [7, 7]


def test_the_prefix_cache_reuses_the_longest_stored_prefix_of_the_same_adapter():
    from mlx_gemma.models.cache import KVCache

    def caches(n: int) -> list[KVCache]:
        cache = KVCache()
        cache.update_and_fetch(mx.arange(n, dtype=mx.float32).reshape(1, 1, n, 1), mx.zeros((1, 1, n, 1)))
        return [cache]

    prefixes = engine.PrefixCache()
    prefixes.store("base", list(range(60)), caches(60))
    prefixes.store("base", list(range(30)) + [999] * 30, caches(60))
    reused, (cache,) = prefixes.lookup("base", list(range(60)))  # the same prompt: its last token is read again
    assert reused == 59 and cache.offset == 59 and cache.keys[0, 0, :, 0].tolist() == list(range(59))
    assert prefixes.lookup("base", list(range(41)))[0] == 40
    assert prefixes.lookup("base", list(range(30)) + [999] * 10)[0] == 39
    assert prefixes.lookup("adapter-hash", list(range(60))) is None  # another adapter's prompt
    assert prefixes.lookup("base", list(range(7)) + [5] * 20) is None  # fewer than min_match (8) shared


def test_the_prefix_cache_is_bounded_in_bytes():
    from mlx_gemma.models.cache import KVCache

    def caches(n: int) -> list[KVCache]:
        cache = KVCache()
        cache.update_and_fetch(mx.zeros((1, 1, n, 4)), mx.zeros((1, 1, n, 4)))
        return [cache]

    per_token = 2 * 4 * 4  # keys and values, four float32 each
    prefixes = engine.PrefixCache(max_bytes=100 * per_token)
    prefixes.store("base", list(range(60)), caches(60))
    prefixes.store("base", list(range(100, 160)), caches(60))  # 120 tokens in all: the older one goes
    assert prefixes.lookup("base", list(range(61))) is None
    assert prefixes.lookup("base", list(range(100, 161)))[0] == 60
    prefixes.store("base", list(range(500, 700)), caches(200))  # over the whole budget alone: not kept
    assert prefixes.lookup("base", list(range(500, 701))) is None
    assert prefixes.lookup("base", list(range(100, 161)))[0] == 60
