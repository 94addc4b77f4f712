"""Runtime: a loaded model + tokenizer + chat template + engine, as one Python object.

Contract (the public Python API; other code relies on these names):
- `Runtime.generate(prompt=None, messages=None, raw=False, lora=None, max_tokens=256,
  temperature=0.6, top_p=None, top_k=None, seed=None, repetition_penalty=None,
  frequency_penalty=None, presence_penalty=None) -> GenerationResult` with `.text`,
  `.usage` (prompt_tokens, completion_tokens, total_tokens) and `.finish_reason`.
- `Runtime.stream(...)`, same arguments: a `TextStream` yielding text pieces; its `.usage` and
  `.finish_reason` are set once it is exhausted. A stream holds the runtime while it runs:
  exhaust it or `close()` it.
- `Runtime.generate_many([{...generate kwargs...}, ...])`: the requests run together in the
  engine's continuous batch (rows with different adapters share each forward pass); results
  come back in order, each the same as `generate` alone would give.
- `Runtime.logits(token_ids, lora=None)`: float32 numpy array (len(token_ids), vocab_size).
- `Runtime.add_adapter(name, path)`, `remove_adapter(name)`, `adapters()`: LoRA adapters
  (PEFT or mlx-lm files) kept resident beside the shared base weights; `lora="name"` picks
  one per call with no reload. `fuse_adapter(name, path)` merges one into the weights.
- `Runtime(loaded, max_resident_adapters=8, max_queue=64, max_batch=8, adapter_limits,
  adapters=None, fuse=None)`: each capacity must be an integer >= 1. The `adapters` are read
  and validated before the engine thread starts, so a bad one leaves no thread behind; a
  constructor that fails after that closes the runtime (no reference to the model is kept).
Arguments are validated before any compute; a bad one raises ValueError naming it. All MLX
work runs on the runtime's one engine thread (`Runtime.engine`), so a Runtime may be shared
between threads; `submit(ids, params, lora, emit)` is the non-blocking entry the server uses.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from .chat import prompt_ids
from .engine import EngineThread, QueueFullError, Request, StepOutput, check_prompt_length
from .loading import LoadedModel
from .lora import layers
from .lora.adapters import FAMILIES, AdapterLimits
from .lora.store import AdapterRegistry
from .sampler import GenerationParams


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_tokens": self.total_tokens}


@dataclass(frozen=True)
class GenerationResult:
    text: str
    usage: Usage
    finish_reason: str
    token_ids: list[int] = field(repr=False)


class Pieces:
    """Turns a request's StepOutputs into text pieces; records its token ids and finish reason."""

    def __init__(self, detokenizer: Any, stop_ids: frozenset[int]):
        self._detokenizer = detokenizer
        self._stop_ids = stop_ids
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None

    def take(self, item: StepOutput | BaseException) -> str:
        """`feed` a step; an exception from the engine ends the request and is raised here."""
        if isinstance(item, BaseException):
            self.finish_reason = "error"
            raise item
        return self.feed(item)

    def feed(self, step: StepOutput) -> str:
        self.token_ids.append(step.token)
        piece = "" if step.token in self._stop_ids else self._detokenizer.add(step.token)
        if step.finish_reason:
            self.finish_reason = step.finish_reason
            piece += self._detokenizer.flush()
        return piece


_CLOSED: Any = object()  # put in a TextStream's queue by close(), to wake a reader waiting on it


class TextStream:
    """Iterator of text pieces for one request; usage and finish_reason are set at the end."""

    def __init__(self, runtime: "Runtime", ids: list[int], params: GenerationParams, lora: str | None):
        self._items: queue.SimpleQueue[StepOutput | BaseException] = queue.SimpleQueue()
        self._pieces = Pieces(runtime.tokenizer.detokenizer(), runtime.tokenizer.stop_ids)
        self._n_prompt = len(ids)
        self._request = runtime.submit(ids, params, lora, self._items.put)

    @property
    def token_ids(self) -> list[int]:
        return self._pieces.token_ids

    @property
    def finish_reason(self) -> str | None:
        return self._pieces.finish_reason

    @property
    def usage(self) -> Usage:
        return Usage(self._n_prompt, len(self.token_ids))

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        while self._pieces.finish_reason is None:
            item = self._items.get()
            if item is _CLOSED:
                break
            if piece := self._pieces.take(item):
                return piece
        raise StopIteration

    def close(self) -> None:
        """Stop generating now and free the engine for others (also done when garbage-collected,
        and on leaving a `with` block). A thread reading the stream meanwhile ends it after the pieces
        already on their way, if any; finish_reason is "cancelled" unless the last of them ended it."""
        self._request.cancel()
        self._pieces.finish_reason = self._pieces.finish_reason or "cancelled"
        self._items.put(_CLOSED)  # the engine sends nothing to a request it drops: wake the reader

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        request = getattr(self, "_request", None)
        if request is not None:
            request.cancel()


CAPACITIES = {"max_resident_adapters": "adapters kept in memory at once",
              "max_queue": "requests that may wait for the engine", "max_batch": "requests decoded together"}


def check_capacities(**values: Any) -> None:
    """Refuse a capacity (max_resident_adapters, max_queue, max_batch) that is not an integer >= 1."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is out of range: use an integer >= 1 ({CAPACITIES[name]})")


def check_fuse(adapters: Mapping[str, str], fuse: str | None) -> None:
    if fuse is not None and fuse not in adapters:
        raise ValueError(f"fuse={fuse!r} names no adapter: pass adapters={{{fuse!r}: path}} too")


class Runtime:
    def __init__(self, loaded: LoadedModel, max_resident_adapters: int = 8, max_queue: int = 64,
                 max_batch: int = 8, adapter_limits: AdapterLimits = AdapterLimits(),
                 adapters: Mapping[str, str] | None = None, fuse: str | None = None):
        """`adapters` ({name: directory}) are added and the one named `fuse` merged into the weights.
        Each is read and validated before the engine thread starts, so a bad one leaves no thread
        behind; if adding one fails later all the same, the runtime is closed before the error is raised."""
        adapters = dict(adapters or {})
        check_capacities(max_resident_adapters=max_resident_adapters, max_queue=max_queue, max_batch=max_batch)
        check_fuse(adapters, fuse)
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.fused: dict[str, Any] | None = None
        family = FAMILIES[loaded.config["model_type"]]
        self.registry = AdapterRegistry(self.model, family, max_resident=max_resident_adapters, limits=adapter_limits)
        for name, path in adapters.items():
            self.registry.read(name, path)  # installed adapters must be made on the engine thread: only check here
        self.engine = EngineThread(self.model, self.tokenizer.stop_ids, loaded.context_length,
                                   max_queue=max_queue, max_batch=max_batch)
        weakref.finalize(self, self.engine.close)  # a Runtime dropped without close() lets go of its model
        try:
            self._install_adapters(adapters, fuse)
        except BaseException:
            self.close()  # the thread stays (see EngineThread.close) but lets go of the model
            raise

    def _install_adapters(self, adapters: dict[str, str], fuse: str | None) -> None:
        if fuse is not None:
            self.fuse_adapter(fuse, adapters.pop(fuse))
        for name, path in adapters.items():
            self.add_adapter(name, path)

    def close(self) -> None:
        """Stop the engine (see EngineThread.close): running streams end with RuntimeError and
        later calls raise it. Also done at interpreter exit, and when the Runtime is garbage-collected."""
        self.engine.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        fused = f", fused={self.fused['name']!r}" if self.fused else ""
        return f"Runtime(model={self.name!r}, dtype={self.loaded.dtype}, quantization={self.loaded.quantization}{fused})"

    def add_adapter(self, name: str, path: str) -> dict[str, Any]:
        """Validate and load a LoRA adapter directory under `name`; replaces one of that name."""
        return self.engine.run(lambda: self.registry.add(name, path).describe())

    def remove_adapter(self, name: str) -> None:
        try:
            self.engine.run(lambda: self.registry.remove(name))
        except KeyError:
            raise ValueError(f"no adapter named {name!r}: loaded are {self.registry.names()}") from None

    def adapters(self) -> list[dict[str, Any]]:
        return self.registry.describe()

    def fuse_adapter(self, name: str, path: str) -> dict[str, Any]:
        """Merge an adapter into the base weights for zero overhead; it then serves every request."""
        if self.registry.names():
            raise ValueError("fuse before adding resident adapters: they were validated against the unfused base")
        if self.fused:
            raise ValueError(f"{self.fused['name']!r} is already fused into these weights: one adapter is fused per "
                             "load; load the model again to fuse another (or serve both unfused with add_adapter)")
        adapter = self.engine.run(lambda: self.registry.read(name, path))
        dequantized = self.engine.run(lambda: self._fuse(adapter))
        self.fused = {**adapter.describe(), "dequantized_layers": dequantized,
                      "precision": _fused_precision(self.loaded, dequantized)}
        return self.fused

    def _fuse(self, adapter: Any) -> int:
        """On the engine thread: merge the adapter; cached prompt prefixes of the old weights go."""
        dequantized = layers.fuse(self.model, adapter)
        self.engine.prefixes.clear()
        return dequantized

    def _uses_base(self, lora: str | None) -> bool:
        """No adapter, or the one fused into the weights: the base forward pass serves it."""
        return lora is None or bool(self.fused and lora == self.fused["name"])

    def _check_lora(self, lora: str | None) -> None:
        if self._uses_base(lora):
            return
        if not isinstance(lora, str) or lora not in self.registry.names():
            raise ValueError(f"lora={lora!r}: no adapter of that name is loaded "
                             f"(loaded: {', '.join(self.registry.names()) or 'none'})")

    def _acquire(self, lora: str | None) -> int:
        if self._uses_base(lora):
            return 0
        try:
            return self.registry.acquire(lora)
        except KeyError:
            raise ValueError(f"lora={lora!r}: the adapter was removed before the request started") from None

    def _adapter_key(self, lora: str | None) -> str:
        """What the weights of a request are (after acquire), for prefix reuse: "base" (with the
        fused adapter's hash once one is fused), or the adapter's content hash."""
        if self._uses_base(lora):
            return f"base+{self.fused['hash']}" if self.fused else "base"
        return self.registry.get(lora).content_hash

    def _release(self, lora: str | None) -> None:
        if not self._uses_base(lora):
            self.registry.release(lora)

    def prepare(self, prompt: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None,
                raw: bool = False, lora: str | None = None, continue_final_message: bool = False,
                add_generation_prompt: bool = True, **sampling: Any) -> tuple[list[int], GenerationParams]:
        """Validate a request and return its prompt token ids and generation parameters.
        `continue_final_message` and `add_generation_prompt` shape the chat template (see `chat`)."""
        params = GenerationParams(**sampling).validate()
        self._check_lora(lora)
        ids = prompt_ids(self.tokenizer, prompt=prompt, messages=messages, raw=raw,
                         continue_final_message=continue_final_message, add_generation_prompt=add_generation_prompt)
        check_prompt_length(len(ids), self.loaded.context_length)
        self._check_embedded(ids)
        return ids, params

    def _check_embedded(self, ids: list[int]) -> None:
        """Refuse ids the model has no embedding row for: a tokenizer may hold more tokens than the
        model (Gemma 3 text models and `<image_soft_token>`), and MLX would read past the table."""
        vocab_size = self.model.args.vocab_size
        beyond = _out_of_range(ids, vocab_size)
        if beyond is None:
            return
        raise ValueError(f"the prompt holds the token {self.tokenizer.id_to_token(beyond)!r} (id {beyond}), "
                         f"which this model has no embedding for (its ids are 0..{vocab_size - 1}): "
                         "take it out of the prompt")

    def submit(self, ids: list[int], params: GenerationParams, lora: str | None,
               emit: Callable[[StepOutput | BaseException], None], reader_may_stop: bool = False) -> Request:
        """Queue a prepared request on the engine thread; `emit` gets its steps. Raises QueueFullError.
        reader_may_stop: the caller looks for stop strings and ends the request with `stop()` or `cancel()`."""
        request = Request(ids, params, emit, acquire=lambda: self._acquire(lora), release=lambda: self._release(lora),
                          adapter_key=lambda: self._adapter_key(lora), reader_may_stop=reader_may_stop)
        self.engine.submit(request)
        return request

    def stream(self, prompt: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None,
               raw: bool = False, lora: str | None = None, max_tokens: int = 256, temperature: float = 0.6,
               top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
               repetition_penalty: float | None = None, frequency_penalty: float | None = None,
               presence_penalty: float | None = None, *, continue_final_message: bool = False,
               add_generation_prompt: bool = True) -> TextStream:
        ids, params = self.prepare(prompt, messages, raw, lora, continue_final_message, add_generation_prompt,
                                   max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                   seed=seed, repetition_penalty=repetition_penalty,
                                   frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)
        return TextStream(self, ids, params, lora)

    def generate(self, prompt: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None,
                 raw: bool = False, lora: str | None = None, max_tokens: int = 256, temperature: float = 0.6,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                 repetition_penalty: float | None = None, frequency_penalty: float | None = None,
                 presence_penalty: float | None = None, *, continue_final_message: bool = False,
                 add_generation_prompt: bool = True) -> GenerationResult:
        with self.stream(prompt, messages, raw, lora, max_tokens, temperature, top_p, top_k, seed,
                         repetition_penalty, frequency_penalty, presence_penalty,
                         continue_final_message=continue_final_message,
                         add_generation_prompt=add_generation_prompt) as stream:
            text = "".join(stream)  # an exception or Ctrl-C here stops the request, too
        return GenerationResult(text, stream.usage, stream.finish_reason or "length", stream.token_ids)

    def generate_many(self, requests: Sequence[Mapping[str, Any]]) -> list[GenerationResult]:
        """Run requests together in the engine's batch; results in the order given.

        Each request is a dict of `generate`'s keyword arguments. All are validated before any
        runs; a bad one raises ValueError naming its index.
        """
        prepared = []
        for index, request in enumerate(requests):
            try:
                prepared.append((*self.prepare(**request), request.get("lora")))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"requests[{index}]: {exc}") from None
        with contextlib.ExitStack() as running:  # an error in one, or Ctrl-C, stops the others too
            streams: list[TextStream] = []
            top_up = functools.partial(self._submit_more, running, streams, prepared)
            texts = [_read_request(streams, index, top_up) for index in range(len(prepared))]
        return [GenerationResult(text, s.usage, s.finish_reason or "length", s.token_ids)
                for text, s in zip(texts, streams)]

    def _submit_more(self, running: contextlib.ExitStack, streams: list[TextStream],
                     prepared: list[tuple[list[int], GenerationParams, str | None]], reading: int) -> None:
        """For generate_many: submit the request about to be read, and more while the batch has rows for
        them, so that the requests it is not reading yet never take the queue from other callers; as rows
        leave, room comes back."""
        while len(streams) < len(prepared):
            needed = len(streams) <= reading
            if not needed and not self.engine.free_rows:
                return
            try:
                streams.append(running.enter_context(TextStream(self, *prepared[len(streams)])))
            except QueueFullError:
                if needed:
                    raise
                return  # other clients filled the queue: try again after the next piece
            except Exception as exc:
                raise _noted(exc, len(streams))

    def logits(self, token_ids: Sequence[int], lora: str | None = None) -> np.ndarray:
        """Logits of every position for the given ids, in one forward pass without cache."""
        self._check_lora(lora)
        ids = _check_token_ids(token_ids, self.model.args.vocab_size)
        return self.engine.run(lambda: self._forward(ids, lora))

    def _forward(self, ids: list[int], lora: str | None) -> np.ndarray:
        slot = self._acquire(lora)
        try:
            layers.set_rows(self.model, [slot])
            return np.array(self.model(mx.array(ids, dtype=mx.int32)[None])[0].astype(mx.float32))
        finally:
            self._release(lora)


def _fused_precision(loaded: LoadedModel, dequantized: int) -> str:
    if not dequantized:
        return loaded.dtype + (f", {loaded.quantization['bits']}-bit quantized" if loaded.quantization else "")
    return (f"{dequantized} quantized layers were dequantized to {loaded.dtype} to hold the delta exactly; "
            "the other layers keep their quantization")


def _read_request(streams: list[TextStream], index: int, top_up: Callable[[int], None]) -> str:
    """The text of request `index` of generate_many, calling `top_up` before each piece; an error
    raised while reading it says which request it came from."""
    pieces = []
    try:
        top_up(index)
        for piece in streams[index]:
            pieces.append(piece)
            top_up(index)
        return "".join(pieces)
    except Exception as exc:
        raise _noted(exc, index)


def _noted(exc: Exception, index: int) -> Exception:
    """`exc`, noting the request of generate_many it came from (once: the first note is the right one)."""
    if not any("of generate_many" in note for note in getattr(exc, "__notes__", ())):
        exc.add_note(f"raised by requests[{index}] of generate_many")
    return exc


def _check_token_ids(token_ids: Sequence[int], vocab_size: int) -> list[int]:
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ValueError("token_ids is empty: pass at least one id")
    bad = _out_of_range(ids, vocab_size)
    if bad is not None:
        raise ValueError(f"token id {bad} is out of range: ids must be in 0..{vocab_size - 1}")
    return ids


def _out_of_range(ids: Sequence[int], vocab_size: int) -> int | None:
    """The first id outside 0..vocab_size - 1, or None (one pass at C speed when all are in range)."""
    if 0 <= min(ids) and max(ids) < vocab_size:
        return None
    return next(t for t in ids if not 0 <= t < vocab_size)
