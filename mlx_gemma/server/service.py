"""What the routes share: the runtime, the fine-tune store, served model names, `lora`
resolution, and the async bridge to the runtime's engine thread.

Contract:
- `Service.served_models()`: the Workers AI names this base answers to, then its own name.
- `await service.resolve_lora(value)`: None for the base; the name of an adapter loaded with
  `--adapter`, or of the fused one; else a fine-tune id or name from the store, made resident
  under a key that changes whenever its files change (so a re-upload is never served stale).
  Unknown: ApiError 3037; missing files: ApiError 3039.
- `service.check_room()`: ApiError 3040 when the engine's queue is full, asked before a body is
  read. `service.open_stream(ids, params, lora)`: an `AsyncTextStream` fed by the engine thread;
  a full engine queue raises ApiError 3040 at once. Iterating it never blocks the event loop;
  `cancel()` (or leaving an `async with`) frees the request's row at the engine's next step.
- Engine errors surface where the stream is read (its first item, `text()`, iteration) as
  ApiErrors: every resident adapter in use when the request starts is 429 (3040, naming the
  limit); its adapter re-uploaded or deleted after `resolve_lora` and before it started is 409
  (3037, "send it again"). Any other engine error is raised as it is (a 500).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from ..engine import QueueFullError, StepOutput
from ..lora.adapters import check_adapter_files
from ..lora.store import AdapterBusyError, Finetune, FinetuneNotFound, FinetuneStore
from ..runtime import Pieces, Runtime, Usage
from ..sampler import GenerationParams
from .schema import ApiError, bad_input, finetune_incomplete, finetune_not_found, out_of_capacity, unknown_model

T = TypeVar("T")
FINETUNE_KEY = "finetune:"
# The thread that validates and tokenizes requests for every server of the process, off the event loop
PREPARING = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-gemma-prepare")


def workers_ai_names(runtime: Runtime) -> list[str]:
    """`@cf/google/gemma-7b-it-lora` for a multi-head (7B-shaped) Gemma 1, else the 2B route."""
    args = runtime.model.args
    is_7b = runtime.loaded.config.get("model_type") == "gemma" and args.num_key_value_heads == args.num_attention_heads
    return ["@cf/google/gemma-7b-it-lora" if is_7b else "@cf/google/gemma-2b-it-lora"]


@dataclass
class Settings:
    data_dir: Path
    api_token: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_upload_bytes: int = 300 * 1024 * 1024
    served_names: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)  # CORS: pages whose scripts may call the server


def adapter_changed(lora: str) -> ApiError:
    """The adapter a request resolved was re-uploaded or deleted before the engine started it."""
    what = f"fine-tune {lora.split(':')[1]!r}" if lora.startswith(FINETUNE_KEY) else f"adapter {lora!r}"
    return ApiError(409, 3037, f"AiError: Finetune changed: {what} was re-uploaded or deleted after this "
                               "request named it and before it started: send the request again")


class AsyncTextStream:
    """Text pieces of one request, read on the event loop from the engine thread's steps."""

    def __init__(self, runtime: Runtime, ids: list[int], params: GenerationParams, lora: str | None,
                 stop_strings: bool = False):
        loop = asyncio.get_running_loop()
        self._items: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()
        self._pieces = Pieces(runtime.tokenizer.detokenizer(), runtime.tokenizer.stop_ids)
        self._registry = runtime.registry
        fused = runtime.fused
        self._adapter = None if lora is None or (fused and lora == fused["name"]) else lora
        self.n_prompt = len(ids)
        emit = lambda item: loop.call_soon_threadsafe(self._items.put_nowait, item)  # noqa: E731
        self._request = runtime.submit(ids, params, lora, emit, reader_may_stop=stop_strings)

    @property
    def usage(self) -> Usage:
        return Usage(self.n_prompt, len(self._pieces.token_ids))

    @property
    def finish_reason(self) -> str | None:
        return self._pieces.finish_reason

    def __aiter__(self) -> "AsyncTextStream":
        return self

    async def __anext__(self) -> str:
        while self._pieces.finish_reason is None:
            item = await self._items.get()
            if isinstance(item, BaseException):
                item = self._api_error(item)
            if piece := self._pieces.take(item):
                return piece
        raise StopAsyncIteration

    def _api_error(self, exc: BaseException) -> BaseException:
        """The ApiError an engine error means for the client, or the error itself (a 500)."""
        if isinstance(exc, AdapterBusyError):
            return out_of_capacity(str(exc))
        adapter = self._adapter
        if isinstance(exc, ValueError) and adapter is not None and not self._pieces.token_ids \
                and adapter not in self._registry.names():
            return adapter_changed(adapter)  # acquire found it gone: a re-upload or delete forgot it
        return exc

    async def text(self) -> str:
        try:
            return "".join([piece async for piece in self])
        finally:
            self.cancel()

    def cancel(self) -> None:
        self._request.cancel()

    def stop(self) -> None:
        """End the request here, as a stop token would (a stop string was found in the text)."""
        self._request.stop()
        self._pieces.finish_reason = "stop"


class Service:
    def __init__(self, runtime: Runtime, settings: Settings, store: FinetuneStore | None = None):
        self.runtime = runtime
        self.settings = settings
        # The upload limit bounds every adapter file this server reads: uploads, and fine-tunes loaded later.
        runtime.registry.limits = replace(runtime.registry.limits, max_file_bytes=settings.max_upload_bytes)
        self.store = store or FinetuneStore(settings.data_dir, validate=self._validate_files,
                                            max_file_bytes=settings.max_upload_bytes)

    @property
    def static_adapters(self) -> set[str]:
        """Adapters loaded by name (`--adapter NAME=PATH`), as opposed to fine-tunes from the store."""
        return {name for name in self.runtime.registry.names() if not name.startswith(FINETUNE_KEY)}

    def adapter_names(self) -> set[str]:
        """What `lora` names before any fine-tune: the static adapters and the fused one."""
        fused = self.runtime.fused
        return self.static_adapters | ({fused["name"]} if fused else set())

    def served_models(self) -> list[str]:
        names = self.settings.served_names or workers_ai_names(self.runtime)
        return [*names, self.runtime.name]

    def check_model(self, model: str) -> None:
        if model not in self.served_models():
            raise unknown_model(model, self.served_models())

    def _validate_files(self, directory: Path) -> None:
        base = self.runtime.registry.base_info()
        limits = self.runtime.registry.limits
        self.runtime.engine.run(lambda: check_adapter_files(directory, base, limits))

    async def on_engine(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.runtime.engine.call(fn))

    def find_finetune(self, value: str) -> Finetune:
        try:
            return self.store.get(value)
        except FinetuneNotFound:
            raise finetune_not_found(value) from None

    async def resolve_lora(self, value: str | None) -> str | None:
        if value is None or value in self.adapter_names():
            return value
        finetune = await asyncio.to_thread(self.find_finetune, value)
        if not finetune.complete:
            raise finetune_incomplete(finetune.name, finetune.missing())
        key = f"{FINETUNE_KEY}{finetune.id}:{finetune.modified_at}"
        if key in self.runtime.registry.names():
            return key
        return await self.on_engine(lambda: self._make_resident(key, finetune))

    def _make_resident(self, key: str, finetune: Finetune) -> str:
        """On the engine thread: load the fine-tune's files under `key` and retire its older versions;
        return the key to serve. A concurrent request may have loaded this version, or a newer one
        (it read the row after a re-upload), meanwhile: that one is served, never replaced by an older."""
        registry = self.runtime.registry
        versions = sorted(self._versions(finetune.id))  # keys end in modified_at, which sorts by time
        if versions and versions[-1] >= key:
            return versions[-1]
        for name in versions:
            registry.retire(name)  # a running request keeps its version until it finishes
        try:
            registry.add(key, finetune.path)
        except AdapterBusyError as exc:
            raise out_of_capacity(str(exc)) from None
        except ValueError as exc:
            raise finetune_incomplete(finetune.name, [f"a valid adapter ({exc})"]) from None
        return key

    def forget_finetune(self, finetune_id: str) -> None:
        """On the engine thread: retire a deleted fine-tune's resident versions."""
        for name in self._versions(finetune_id):
            self.runtime.registry.retire(name)

    def _versions(self, finetune_id: str) -> list[str]:
        return [name for name in self.runtime.registry.names() if name.startswith(f"{FINETUNE_KEY}{finetune_id}:")]

    async def prepare(self, lora: str | None, **request: Any) -> tuple[list[int], GenerationParams]:
        """Validate and tokenize off the event loop: a body of long messages takes a second to tokenize,
        and every other client's stream would wait for it. One thread does it for every request, so
        the process's memory does not spread over one allocator arena per pool thread."""
        prepare = functools.partial(self.runtime.prepare, lora=lora, **request)
        try:
            return await asyncio.get_running_loop().run_in_executor(PREPARING, prepare)
        except ValueError as exc:
            if lora is not None and lora.startswith(FINETUNE_KEY) and lora not in self.runtime.registry.names():
                raise adapter_changed(lora) from None  # re-uploaded or deleted since resolve_lora
            raise bad_input(str(exc)) from None

    def check_room(self) -> None:
        """Refuse at once (429, 3040) when the engine's queue is full: before the body is read, checked and
        tokenized, which for another client's long body can take seconds. `open_stream` checks again."""
        with _queue_full_as_429():
            self.runtime.engine.check_room()

    def open_stream(self, ids: list[int], params: GenerationParams, lora: str | None,
                    stop_strings: bool = False) -> AsyncTextStream:
        """stop_strings: the route looks for them; it ends the stream with `stop()`, or `cancel()` once read."""
        with _queue_full_as_429():
            return AsyncTextStream(self.runtime, ids, params, lora, stop_strings)


@contextlib.contextmanager
def _queue_full_as_429() -> Iterator[None]:
    try:
        yield
    except QueueFullError as exc:
        raise out_of_capacity(str(exc)) from None
