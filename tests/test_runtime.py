"""Python API on the tiny model: generate/stream/logits, seeds, usage, and argument errors."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mlx_gemma.chat import prompt_ids


def test_greedy_is_the_argmax_chain_of_logits(runtime):
    result = runtime.generate(prompt="Water boils at", raw=True, temperature=0, max_tokens=12)
    ids = prompt_ids(runtime.tokenizer, prompt="Water boils at", raw=True)
    for token in result.token_ids:
        expected = int(runtime.logits(ids)[-1].argmax())
        assert token == expected
        ids.append(token)
    assert result.text == runtime.tokenizer.decode(result.token_ids)


def test_usage_and_finish_reason(runtime):
    result = runtime.generate(prompt="Hi there", temperature=0, max_tokens=5)
    n_prompt = len(prompt_ids(runtime.tokenizer, prompt="Hi there"))
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (n_prompt, len(result.token_ids))
    assert result.usage.total_tokens == n_prompt + len(result.token_ids)
    assert result.usage.to_dict() == {"prompt_tokens": n_prompt, "completion_tokens": len(result.token_ids),
                                      "total_tokens": n_prompt + len(result.token_ids)}
    assert result.finish_reason in ("length", "stop")
    assert result.finish_reason == "length" or result.token_ids[-1] in runtime.tokenizer.stop_ids


def test_same_seed_same_text_and_different_seeds_differ(runtime):
    kwargs = dict(prompt="Tell me a story", temperature=1.5, max_tokens=24)
    first = runtime.generate(seed=1234, **kwargs)
    assert runtime.generate(seed=1234, **kwargs).token_ids == first.token_ids
    others = {tuple(runtime.generate(seed=s, **kwargs).token_ids) for s in (1, 2, 3)}
    assert len(others | {tuple(first.token_ids)}) > 1


def test_stream_pieces_join_to_generate_text(runtime):
    kwargs = dict(prompt="The capital of France", raw=True, temperature=0.9, seed=7, max_tokens=32)
    stream = runtime.stream(**kwargs)
    pieces = list(stream)
    result = runtime.generate(**kwargs)
    assert "".join(pieces) == result.text
    assert stream.usage == result.usage and stream.finish_reason == result.finish_reason


def test_messages_and_prompt_agree(runtime):
    a = runtime.generate(prompt="Hello", temperature=0, max_tokens=6)
    b = runtime.generate(messages=[{"role": "user", "content": "Hello"}], temperature=0, max_tokens=6)
    assert a.token_ids == b.token_ids


def test_logits_shape_dtype(runtime):
    logits = runtime.logits([2, 10, 20])
    assert logits.shape == (3, runtime.model.args.vocab_size) and logits.dtype == np.float32


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": "x", "temperature": 9}, "temperature=9"),
    ({"prompt": "x", "top_k": 0}, "top_k=0"),
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "got both"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens=0"),
    ({"prompt": "x", "lora": "nope"}, "lora='nope'"),
    ({"prompt": "a\ud800b"}, "prompt 'a\\ud800b' holds a lone UTF-16 surrogate '\\ud800' at index 1"),
    ({"prompt": "a\udc00", "raw": True}, "prompt 'a\\udc00' holds a lone UTF-16 surrogate '\\udc00' at index 1"),
    ({"messages": [{"role": "user", "content": "\ud83d!"}]},
     "messages[0].content '\\ud83d!' holds a lone UTF-16 surrogate '\\ud83d' at index 0: pass valid Unicode"),
])
def test_bad_arguments_raise_naming_the_value(runtime, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        runtime.generate(**kwargs)


def test_bad_token_ids(runtime):
    with pytest.raises(ValueError, match="token id 99999 is out of range"):
        runtime.logits([2, 99999])
    with pytest.raises(ValueError, match="token_ids is empty"):
        runtime.logits([])


def test_runtime_is_usable_after_errors(runtime):
    with pytest.raises(ValueError):
        runtime.generate(prompt="x", temperature=-1)
    assert runtime.generate(prompt="x", temperature=0, max_tokens=2).usage.completion_tokens >= 1


def test_closing_a_stream_releases_the_runtime(runtime):
    stream = runtime.stream(prompt="Tell me a story", temperature=0, max_tokens=50)
    next(stream)
    stream.close()
    assert stream.finish_reason == "cancelled"
    assert runtime.generate(prompt="Hi", temperature=0, max_tokens=2).usage.completion_tokens >= 1


def engine_threads():
    import threading

    return sorted(t.name for t in threading.enumerate() if t.name == "mlx-gemma-engine")


@pytest.mark.parametrize("kwargs, message", [
    ({"adapters": {"bad": "/nonexistent"}}, "/nonexistent"),
    ({"adapters": {"bad": "/nonexistent"}, "fuse": "bad"}, "/nonexistent"),
])
def test_a_failed_load_leaves_no_engine_thread(tiny_dir, runtime, kwargs, message):
    import mlx_gemma

    before = engine_threads()
    with pytest.raises(ValueError, match=re.escape(message)):
        mlx_gemma.load(tiny_dir, **kwargs)
    assert engine_threads() == before


@pytest.mark.parametrize("kwargs, message", [
    ({"max_batch": 0}, "max_batch=0 is out of range: use an integer >= 1 (requests decoded together)"),
    ({"max_batch": -1}, "max_batch=-1 is out of range: use an integer >= 1"),
    ({"max_queue": 0}, "max_queue=0 is out of range: use an integer >= 1 (requests that may wait for the engine)"),
    ({"max_resident_adapters": 0},
     "max_resident_adapters=0 is out of range: use an integer >= 1 (adapters kept in memory at once)"),
    ({"max_resident_adapters": -1}, "max_resident_adapters=-1 is out of range"),
    ({"max_batch": 2.5}, "max_batch=2.5 is out of range"),
])
def test_capacities_below_one_are_refused(tiny_dir, runtime, kwargs, message):
    import mlx_gemma
    from mlx_gemma import Runtime

    before = engine_threads()
    with pytest.raises(ValueError, match=re.escape(message)):
        mlx_gemma.load("/not/loaded/first", **kwargs)  # refused before the model is looked for
    with pytest.raises(ValueError, match=re.escape(message)):
        Runtime(runtime.loaded, **kwargs)
    assert engine_threads() == before
