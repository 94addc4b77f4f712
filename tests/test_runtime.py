"""Python API on the tiny model: generate/stream/logits, seeds, usage, and argument errors."""

from __future__ import annotations

import re
import time

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


def test_numpy_numbers_count_as_the_python_numbers_they_hold(runtime):
    kwargs = dict(prompt="Tell me a story", max_tokens=8, top_k=20)
    plain = runtime.generate(seed=1234, temperature=1.5, **kwargs)
    numpy = runtime.generate(seed=np.int64(1234), temperature=np.float32(1.5), **{**kwargs, "top_k": np.int32(20)})
    assert numpy.token_ids == plain.token_ids
    with pytest.raises(ValueError, match=re.escape("seed=np.float64(2.5) has type float64: use an integer")):
        runtime.generate(seed=np.float64(2.5), **kwargs)


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


def test_a_prompt_token_the_model_has_no_embedding_for_is_refused(tiny_dir, runtime, monkeypatch):
    """A tokenizer may hold more tokens than the model has rows (Gemma 3 text models and
    <image_soft_token>): MLX would read past the embedding table, so the request is refused."""
    from tokenizers import Tokenizer

    from mlx_gemma.tokenizer import GemmaTokenizer
    raw = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    raw.add_special_tokens(["<image_soft_token>"])
    monkeypatch.setattr(runtime, "tokenizer", GemmaTokenizer(raw))
    vocab_size = runtime.model.args.vocab_size
    assert runtime.tokenizer.token_to_id("<image_soft_token>") == vocab_size
    with pytest.raises(ValueError, match=re.escape(f"the prompt holds the token '<image_soft_token>' (id {vocab_size}), "
                                                   f"which this model has no embedding for (its ids are "
                                                   f"0..{vocab_size - 1}): take it out of the prompt")):
        runtime.generate(prompt="<image_soft_token>Hi", raw=True, max_tokens=2)
    assert runtime.generate(prompt="<image_soft_token>Hi", max_tokens=2, temperature=0).usage.completion_tokens


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


def test_a_runtime_dropped_without_close_lets_go_of_its_model(tiny_dir):
    import gc
    import weakref

    import mlx_gemma

    rt = mlx_gemma.load(tiny_dir)
    assert rt.generate(prompt="Hi", temperature=0, max_tokens=3).usage.completion_tokens == 3
    model, engine = weakref.ref(rt.model), rt.engine
    del rt
    gc.collect()
    assert engine._closed.wait(timeout=30)  # the engine wound down and released the model
    gc.collect()
    assert model() is None
    with pytest.raises(RuntimeError, match="this runtime is closed"):
        engine.submit(None)


class InterruptAfter:
    """A detokenizer that raises KeyboardInterrupt at its n-th token, as Ctrl-C would in a loop."""

    def __init__(self, inner, n: int):
        self.inner, self.left = inner, n

    def add(self, token: int) -> str:
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt
        return self.inner.add(token)

    def flush(self) -> str:
        return self.inner.flush()


@pytest.mark.parametrize("call", ["generate", "generate_many"])
def test_an_interrupt_while_reading_stops_every_request_of_the_call(tiny_dir, monkeypatch, call):
    import mlx_gemma

    rt = mlx_gemma.load(tiny_dir)
    make = rt.tokenizer.detokenizer
    monkeypatch.setattr(rt.tokenizer, "detokenizer", lambda: InterruptAfter(make(), 3))
    request = {"prompt": "Tell me a long story", "temperature": 0, "max_tokens": 4000}
    with pytest.raises(KeyboardInterrupt) as interrupted:  # kept, as a REPL keeps sys.last_traceback
        rt.generate(**request) if call == "generate" else rt.generate_many([request] * 3)
    stats = rt.engine.stats
    deadline = time.monotonic() + 30
    while rt.engine.active or rt.engine.waiting:
        assert time.monotonic() < deadline, "the interrupted requests kept decoding"
        time.sleep(0.01)
    assert stats.requests["cancelled"] == (1 if call == "generate" else 3)
    assert stats.generated_tokens < 1000  # stopped long before max_tokens
    assert interrupted.traceback  # the frames that hold the streams were alive all along
    rt.close()
