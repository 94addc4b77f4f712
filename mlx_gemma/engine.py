"""Generation over token ids: chunked prefill, then a pipelined decode loop.

Contract: `generate_tokens(model, prompt_ids, params, stop_ids, context_length)` yields one
`StepOutput(token, finish_reason)` per generated token; finish_reason is None until the last,
which says "stop" (a stop id was generated; it is counted, not decoded) or "length"
(max_tokens reached, or the model's context is full). The loop is pipelined as mlx-lm's
`generate_step`: step n+1 is built and handed to `mx.async_eval` before step n's token is
read back, so Python's bookkeeping overlaps the model's compute. The engine knows token ids
only, never text.

`EngineThread` is the one thread that owns MLX and runs a continuous batch: requests reach it
through a queue, take the batch's free rows first and then `max_queue` places (`QueueFullError`
beyond them; `check_room()` asks before a request is built); a waiting request's
prompt is read one chunk per engine step, then its row joins the running batch (at most
`max_batch` rows, each with its own adapter slot and sampler, decoded together); each
`Request` streams its steps back through its `emit` callback, and a cancelled request leaves
at its next step (a cancelled one still waiting gives its queue place back at once). An error
in one request's prefill ends that request; an error in the batch's step ends every request
in the batch with it, and the engine goes on with the next. Other MLX work (loading an
adapter, a logits pass) runs on the same thread through `call`/`run`. `close()` (also run at
interpreter exit) stops the thread after the work in flight is evaluated.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .lora.layers import set_rows
from .lora.store import AdapterBusyError
from .models.cache import BatchKVCache, KVCache, make_cache
from .sampler import GenerationParams, RowSampler, sample

PREFILL_CHUNK = 512
T = TypeVar("T")


@dataclass(frozen=True)
class StepOutput:
    token: int
    finish_reason: str | None = None


def check_prompt_length(n_prompt: int, context_length: int) -> None:
    if n_prompt == 0:
        raise ValueError("the prompt has no tokens: send some text")
    if n_prompt >= context_length:
        raise ValueError(f"the prompt has {n_prompt} tokens but the model's context holds {context_length}: "
                         "shorten the prompt or the conversation")


def prefill(model: nn.Module, cache: list[KVCache], prompt_ids: Sequence[int]) -> mx.array:
    """Run the prompt through the model in chunks; return the last position's logits (1, vocab)."""
    ids = mx.array(prompt_ids, dtype=mx.int32)[None]
    while ids.shape[1] > PREFILL_CHUNK:
        model(ids[:, :PREFILL_CHUNK], cache=cache, last_only=True)
        mx.eval([c.state for c in cache])
        ids = ids[:, PREFILL_CHUNK:]
    return model(ids, cache=cache, last_only=True)[:, -1, :]


def decode_step(model: nn.Module, cache: list[KVCache], token: mx.array, row: RowSampler) -> mx.array:
    return sample(model(token[:, None], cache=cache)[:, -1, :], [row])


def generate_tokens(
    model: nn.Module,
    prompt_ids: Sequence[int],
    params: GenerationParams,
    stop_ids: frozenset[int],
    context_length: int,
    adapter_slot: int = 0,
) -> Iterator[StepOutput]:
    """adapter_slot: the resident LoRA adapter this request uses (0 = the base model alone)."""
    check_prompt_length(len(prompt_ids), context_length)
    set_rows(model, [adapter_slot])
    limit = min(params.max_tokens, context_length - len(prompt_ids))
    cache = make_cache(len(model.layers))
    row = RowSampler(params, prompt_ids, model.args.vocab_size)
    token = sample(prefill(model, cache, prompt_ids), [row])
    mx.async_eval(token)
    for n in range(1, limit + 1):
        if n < limit:
            next_token = decode_step(model, cache, token, row)
            mx.async_eval(next_token)
        token_id = token.item()
        finish = "stop" if token_id in stop_ids else "length" if n == limit else None
        yield StepOutput(token_id, finish)
        if finish:
            return
        token = next_token


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full: the request is refused at once."""


def _no_adapter() -> int:
    return 0


def _base_key() -> str:
    return "base"


def _nothing() -> None:
    return None


@dataclass(eq=False)
class Request:
    """One generation for the engine thread.

    `emit` receives each StepOutput, or the exception that ended the request; it is called on
    the engine thread and must not block. `acquire` runs on the engine thread before prefill and
    returns the adapter slot; `release` runs once the request is over, however it ends. A request
    whose reader looks for stop strings (`reader_may_stop`) and that ends at its length limit is
    counted by that reader, as "stop" by `stop()` or as "length" by `cancel()`: the stop string
    may be in the last token's text, which the engine has not seen decoded.
    """

    prompt_ids: list[int]
    params: GenerationParams
    emit: Callable[[StepOutput | BaseException], None]
    acquire: Callable[[], int] = _no_adapter
    release: Callable[[], None] = _nothing
    adapter_key: Callable[[], str] = _base_key  # after acquire: what the weights are, for prefix reuse
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    reader_may_stop: bool = False  # its reader looks for stop strings, possibly in the last token's text

    stopped: bool = False  # ended by its reader as a stop token would end it (a stop string)
    count_held: Callable[[str], None] | None = field(default=None, init=False, repr=False)  # set by submit
    _held: str | None = field(default=None, init=False, repr=False)  # a finish its reader counts
    _ending: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def cancel(self) -> None:
        """Stop this request at its next step (or before it starts); its slot is freed then."""
        self._end(stopped=False)

    def stop(self) -> None:
        """Stop it as `cancel` does, but count it as finished by "stop" (its reader found a stop string)."""
        self._end(stopped=True)

    def hold_finish(self, reason: str) -> str | None:
        """On the engine thread, at the last token: the finish reason to count now, or None when its
        reader counts it, with `stop` (a stop string in that token's text) or `cancel` (none)."""
        with self._ending:
            if self.stopped:
                return "stop"
            if reason == "length" and self.reader_may_stop and not self.cancelled.is_set():
                self._held = reason
                return None
            return reason

    def _end(self, stopped: bool) -> None:
        """Mark it stopped (before the engine can see it cancelled) and count a finish held for its reader."""
        with self._ending:
            self.stopped = self.stopped or stopped
            held, self._held = self._held, None
        self.cancelled.set()
        if held and self.count_held is not None:
            self.count_held("stop" if stopped else held)

    @property
    def left_as(self) -> str:
        """The finish reason counted when it ends early: "stop" or "cancelled"."""
        return "stop" if self.stopped else "cancelled"


class PrefixCache:
    """KV caches of recent prompts, reused by later prompts that start with the same tokens.

    Keyed by the adapter's content (its hash, or "base") and the prompt's token ids, so a
    re-uploaded adapter under an old name never sees the old adapter's cache. Holds at most
    `max_prompts` prompts and `max_bytes` of keys and values in all (a token costs about 36 KB
    on Gemma-2B and 0.9 MB on Gemma-7B in float32), evicting the least recently used prompt first.
    """

    def __init__(self, max_bytes: int = 512 * 1024 * 1024, max_prompts: int = 32, min_match: int = 8):
        self.max_bytes = max_bytes
        self.max_prompts = max_prompts
        self.min_match = min_match
        # (adapter key, the prompt's ids as bytes) -> those ids as an array, and the prompt's caches. A lookup
        # runs on the engine thread between decode steps: bytes keep their hash (a tuple of ids is hashed
        # again on every visit), and arrays compare without a Python loop.
        self._entries: collections.OrderedDict[tuple[str, bytes], tuple[np.ndarray, list[KVCache]]] = \
            collections.OrderedDict()

    def lookup(self, key: str, ids: Sequence[int]) -> tuple[int, list[KVCache]] | None:
        """The longest stored prefix of ids[:-1] (at least min_match tokens), as fresh caches."""
        best, best_n = None, self.min_match - 1
        wanted = np.asarray(ids[:-1], dtype=np.int64)
        for entry_key, (stored, _) in self._entries.items():
            if entry_key[0] == key:
                n = _common_prefix(stored, wanted)
                best, best_n = (entry_key, n) if n > best_n else (best, best_n)
        if best is None:
            return None
        self._entries.move_to_end(best)
        return best_n, [_cache_prefix(cache, best_n) for cache in self._entries[best][1]]

    def clear(self) -> None:
        self._entries.clear()

    def store(self, key: str, ids: Sequence[int], caches: list[KVCache]) -> None:
        if len(ids) < self.min_match:
            return
        compact = [_cache_prefix(cache, len(ids)) for cache in caches]
        if _nbytes(compact) > self.max_bytes:
            return
        mx.eval([c.state for c in compact])
        stored = np.asarray(ids, dtype=np.int64)
        entry_key = (key, stored.tobytes())
        self._entries[entry_key] = (stored, compact)
        self._entries.move_to_end(entry_key)
        while len(self._entries) > self.max_prompts or \
                sum(_nbytes(caches) for _, caches in self._entries.values()) > self.max_bytes:
            self._entries.popitem(last=False)


def _nbytes(caches: list[KVCache]) -> int:
    return sum(array.nbytes for cache in caches for array in cache.state)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens a and b share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def _cache_prefix(cache: KVCache, n: int) -> KVCache:
    """A new cache holding the first n positions of `cache` (the arrays are not shared for writing)."""
    copy = KVCache()
    copy.keys, copy.values = mx.contiguous(cache.keys[..., :n, :]), mx.contiguous(cache.values[..., :n, :])
    copy.offset = n
    return copy


TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class EngineStats:
    """Counters since the engine started, for /metrics; read them from any thread."""

    requests: collections.Counter = field(default_factory=collections.Counter)  # by finish reason
    rejected: collections.Counter = field(default_factory=collections.Counter)  # refused at once, by reason
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    peak_batch: int = 0
    prefix_reused_tokens: int = 0
    ttft_bucket_counts: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    ttft_sum: float = 0.0
    ttft_count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, reason: str, n: int = 1) -> None:
        """Count n requests ended with this finish reason (from the engine thread, or a reader's)."""
        with self._lock:
            self.requests[reason] += n

    def finished(self) -> dict[str, int]:
        """Ended requests by finish reason, a consistent copy."""
        with self._lock:
            return dict(self.requests)

    def first_token(self, seconds: float) -> None:
        self.ttft_sum += seconds
        self.ttft_count += 1
        for i, bound in enumerate(TTFT_BUCKETS):
            if seconds <= bound:
                self.ttft_bucket_counts[i] += 1


@dataclass(eq=False)
class _Prefill:
    """A request whose prompt is being read, one chunk per engine step."""

    request: Request
    slot: int
    sampler: RowSampler
    cache: list[KVCache]
    remaining: list[int]
    adapter_key: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.request.release()


@dataclass(eq=False)
class _Row:
    """A request in the running batch: its sampler, adapter slot, last token and count."""

    request: Request
    sampler: RowSampler
    slot: int
    limit: int
    token: int = 0
    count: int = 0
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.request.release()


class EngineThread:
    """The one thread that runs MLX work: a continuous batch of generations, and calls.

    `submit(request)` queues a generation, or raises QueueFullError at once when `max_queue`
    requests are already waiting. Waiting requests are prefilled one at a time, then join the
    running batch of at most `max_batch` rows, which decodes one token per row per step with
    each row's own adapter slot and sampler; finished or cancelled rows leave at the next step.
    `call(fn)` runs `fn` on the thread between steps and returns a Future; `run(fn)` waits for
    it (or calls it directly on the engine thread).
    """

    def __init__(self, model: nn.Module, stop_ids: frozenset[int], context_length: int, max_queue: int = 64,
                 max_batch: int = 8):
        self.model = model
        self.max_batch = max_batch
        self.stop_ids = stop_ids
        self.context_length = context_length
        self.max_queue = max_queue
        self.waiting = 0
        self.stats = EngineStats()
        self._rows: list[_Row] = []
        self._prefilling: _Prefill | None = None
        self._inflight: mx.array | None = None  # the step being evaluated: a token per leading row
        self.prefixes = PrefixCache()
        self._cache: list[BatchKVCache] = [BatchKVCache() for _ in model.layers]
        self._pending: collections.deque[Request] = collections.deque()
        self._jobs: queue.SimpleQueue[Request | tuple[Callable[[], Any], Future] | None] = queue.SimpleQueue()
        self._count_lock = threading.Lock()
        self._closing = False
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlx-gemma-engine", daemon=True)
        self._thread.start()
        _close_at_exit(self)

    @property
    def active(self) -> int:
        """Rows in the running batch."""
        return len(self._rows)

    @property
    def prefilling(self) -> int:
        """Requests whose prompt is being read (they have left the queue, not yet joined the batch)."""
        return 0 if self._prefilling is None else 1

    def submit(self, request: Request) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError("a generation cannot start on the engine thread (inside engine.run or engine.call): "
                               "its reader would wait for the thread it blocks; start it from another thread")
        with self._count_lock:  # with close(): nothing is queued behind the stop
            self._check_open()
            self._refuse_when_full()
            self.waiting += 1
            request.count_held = self.stats.count
            self._jobs.put(request)

    @property
    def free_rows(self) -> int:
        """Batch rows that no request holds, reads its prompt for, or waits to take."""
        return max(0, self._open_rows() - self.waiting)

    def _open_rows(self) -> int:
        """Batch rows that no request holds or reads its prompt for: the first waiting requests start there."""
        return max(0, self.max_batch - len(self._rows) - self.prefilling)

    def check_room(self) -> None:
        """Raise QueueFullError (counted as refused) when a request submitted now would be refused,
        so that a server can answer a full queue at once, before it reads and tokenizes the body."""
        with self._count_lock:
            self._refuse_when_full()

    def _refuse_when_full(self) -> None:
        """Requests beyond the free batch rows wait; `max_queue` of them may."""
        queued = self.waiting - self._open_rows()
        if queued >= self.max_queue:
            self.stats.rejected["queue_full"] += 1
            raise QueueFullError(f"{queued} requests are already waiting (max_queue={self.max_queue}): "
                                 "retry shortly, or raise the limit (--max-queue, max_queue= in Python)")

    def call(self, fn: Callable[[], T]) -> "Future[T]":
        future: Future[T] = Future()
        with self._count_lock:
            self._check_open()
            self._jobs.put((fn, future))
        return future

    def _check_open(self) -> None:
        if self._closing:
            raise RuntimeError("this runtime is closed: load the model again to use it")

    def run(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:
            return fn()
        return self.call(fn).result()

    def close(self) -> None:
        """Stop: the step in flight is evaluated, unfinished requests end with an error, and the
        engine lets go of the model and its caches. Also run at interpreter exit.

        The thread then waits, idle, until the process ends; it never returns. A thread that has
        run MLX must not end while Python shuts down: its MLX thread-local state is released with
        the GIL, which a finalizing interpreter no longer hands out, and the process aborts."""
        with self._count_lock:
            if self._closing:
                return
            self._closing = True
            self._jobs.put(None)
        if threading.current_thread() is not self._thread:  # on it (a dropped Runtime's finalizer): it stops after this job
            self._closed.wait(timeout=60)

    def _loop(self) -> None:
        while self._take_jobs(block=not self._rows and not self._pending and self._prefilling is None):
            self._drop_cancelled_waiting()
            try:
                self._admit()
                if self._rows:
                    self._step()
            except Exception as exc:  # not one request's fault: end every request, keep serving
                self._fail_all(exc)
        self._wind_down()
        threading.Event().wait()  # never returns: see close()

    def _wind_down(self) -> None:
        # MLX must not be evaluating when the interpreter exits. An error of that step is not
        # raised here: its requests end with `closed` below.
        with contextlib.suppress(Exception):
            mx.eval([] if self._inflight is None else self._inflight)
            mx.synchronize()
        closed = RuntimeError("this runtime was closed before the request finished")
        self._fail_all(closed)
        for request in self._pending:
            _emit_quietly(request, closed)
        self._pending.clear()
        self.model, self._cache, self.prefixes = None, [], PrefixCache()
        self._closed.set()

    def _drop_cancelled_waiting(self) -> None:
        """Free the queue places of waiting requests whose clients have gone."""
        kept: collections.deque[Request] = collections.deque()
        cancelled: list[Request] = []
        for request in self._pending:  # one look at each flag: a cancel landing meanwhile waits for the next pass
            (cancelled if request.cancelled.is_set() else kept).append(request)
        if cancelled:
            self._pending = kept
            for request in cancelled:
                self.stats.count(request.left_as)
            with self._count_lock:
                self.waiting -= len(cancelled)

    def _fail_all(self, exc: Exception) -> None:
        """Hand `exc` to every running and prefilling request, release them and start an empty batch."""
        failed = [row.request for row in self._rows]
        for row in self._rows:
            row.release()
        if self._prefilling is not None:
            self._prefilling.release()
            failed.append(self._prefilling.request)
        self.stats.count("error", len(failed))
        self._rows, self._prefilling, self._inflight = [], None, None
        self._cache = [BatchKVCache() for _ in self.model.layers]
        for request in failed:
            _emit_quietly(request, exc)

    def _take_jobs(self, block: bool) -> bool:
        """Move queued requests to pending and run queued calls; False when told to stop."""
        try:
            job = self._jobs.get(block=block)
        except queue.Empty:
            return True
        while job is not None:
            if isinstance(job, Request):
                self._pending.append(job)
            else:
                _run_call(*job)
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return True
        return False

    def _admit(self) -> None:
        """Advance the prompt being prefilled by one chunk, or start the next waiting one.

        One chunk per step keeps running rows moving while a long prompt is read."""
        if self._prefilling is None:
            self._prefilling = self._next_prefill()
        job = self._prefilling
        if job is not None:
            try:
                self._prefill_chunk(job)
            except Exception as exc:  # the request's own failure; the batch goes on
                self.stats.count("error")
                job.release()
                _emit_quietly(job.request, exc)
                self._prefilling = None

    def _next_prefill(self) -> "_Prefill | None":
        """Take waiting requests in order until one can start. One whose adapter needs a resident
        slot that running rows hold waits at the head of the queue until a row leaves (first come,
        first served: later requests wait behind it); it fails only when no row runs."""
        while self._pending and len(self._rows) < self.max_batch:
            request = self._pending[0]
            if request.cancelled.is_set():
                self._leave_queue()
                self.stats.count(request.left_as)
                continue
            try:
                check_prompt_length(len(request.prompt_ids), self.context_length)
                slot = request.acquire()
            except AdapterBusyError as exc:
                if self._rows:
                    return None  # tried again next step: nothing else is built while it waits
                self._fail_waiting(request, exc)
                continue
            except Exception as exc:
                self._fail_waiting(request, exc)
                continue
            try:
                job = self._start_prefill(request, slot)
            except Exception as exc:  # this request's failure (its sampler, its adapter): the others go on
                request.release()
                self._fail_waiting(request, exc)
                continue
            self._leave_queue()
            return job
        return None

    def _leave_queue(self) -> None:
        self._pending.popleft()
        with self._count_lock:
            self.waiting -= 1

    def _fail_waiting(self, request: Request, exc: Exception) -> None:
        """End the request at the head of the queue with `exc`."""
        self._leave_queue()
        self.stats.count("error")
        _emit_quietly(request, exc)

    def _start_prefill(self, request: Request, slot: int) -> "_Prefill":
        sampler = RowSampler(request.params, request.prompt_ids, self.model.args.vocab_size)
        ids = list(request.prompt_ids)
        key = request.adapter_key()
        hit = self.prefixes.lookup(key, ids)
        if hit is None:
            return _Prefill(request, slot, sampler, make_cache(len(self.model.layers)), ids, key)
        reused, cache = hit
        self.stats.prefix_reused_tokens += reused
        return _Prefill(request, slot, sampler, cache, ids[reused:], key)

    def _prefill_chunk(self, job: "_Prefill") -> None:
        if job.request.cancelled.is_set():
            self.stats.count(job.request.left_as)
            job.release()
            self._prefilling = None
            return
        set_rows(self.model, [job.slot])
        chunk, job.remaining = job.remaining[:PREFILL_CHUNK], job.remaining[PREFILL_CHUNK:]
        logits = self.model(mx.array(chunk, dtype=mx.int32)[None], cache=job.cache, last_only=True)
        if job.remaining:
            mx.eval([c.state for c in job.cache])
            return
        self._prefilling = None
        request = job.request
        self.prefixes.store(job.adapter_key, request.prompt_ids, job.cache)
        limit = min(request.params.max_tokens, self.context_length - len(request.prompt_ids))
        row = _Row(request, job.sampler, job.slot, limit, token=sample(logits[:, -1, :], [job.sampler]).item())
        self.stats.prompt_tokens += len(request.prompt_ids)
        self.stats.first_token(time.perf_counter() - request.submitted)
        if self._emit(row):
            self._join(row, job.cache)

    def _join(self, row: _Row, caches: list[KVCache]) -> None:
        """Add a prefilled row to the batch. A failure part way leaves the layers' caches uneven, so
        the whole batch ends with that error rather than decode from mismatched caches."""
        self._rows.append(row)
        try:
            for batch_cache, row_cache in zip(self._cache, caches):
                batch_cache.add(row_cache)
        except Exception as exc:
            self._fail_all(exc)

    def _emit(self, row: _Row) -> bool:
        """Hand the row's new token to its reader; False (and the slot released) when the row is done."""
        row.count += 1
        self.stats.generated_tokens += 1
        finish = "stop" if row.token in self.stop_ids else "length" if row.count >= row.limit else None
        if finish and (counted := row.request.hold_finish(finish)):
            self.stats.count(counted)  # before the reader sees its last token: /metrics then agrees
        delivered = _emit_quietly(row.request, StepOutput(row.token, finish))
        if not finish and delivered and not row.request.cancelled.is_set():
            return True
        if not finish:
            self.stats.count(row.request.left_as)
        row.release()
        return False

    def _step(self) -> None:
        """Hand step n+1 of every row to MLX, then emit step n's tokens while it runs (pipelined).

        The next step is skipped when every row ends with the tokens in flight (its length limit)."""
        self._drop([i for i, row in enumerate(self._rows) if not row.request.cancelled.is_set()])
        if not self._rows:
            return
        in_flight = self._inflight
        self._inflight = self._launch() if self._any_row_goes_on() else None
        keep = self._emit_all([] if in_flight is None else in_flight.tolist())
        self._drop(keep)

    def _any_row_goes_on(self) -> bool:
        pending = self._pending_count()
        return any(row.count + (i < pending) < row.limit for i, row in enumerate(self._rows))

    def _pending_count(self) -> int:
        """How many leading rows have a token in flight (not yet emitted)."""
        return 0 if self._inflight is None else self._inflight.shape[0]

    def _launch(self) -> mx.array:
        """Build one decode step for all rows from their latest tokens and start evaluating it."""
        pending = self._pending_count()
        fresh = mx.array([row.token for row in self._rows[pending:]], dtype=mx.int32)
        inputs = fresh if self._inflight is None else mx.concatenate([self._inflight, fresh])
        set_rows(self.model, [row.slot for row in self._rows])
        logits = self.model(inputs[:, None], cache=self._cache)[:, -1, :]
        next_tokens = sample(logits, [row.sampler for row in self._rows])
        mx.async_eval(next_tokens, [c.state for c in self._cache])
        self.stats.steps += 1
        self.stats.peak_batch = max(self.stats.peak_batch, len(self._rows))
        return next_tokens

    def _emit_all(self, tokens: list[int]) -> list[int]:
        """Emit the tokens of the leading rows; return the indices of the rows that go on."""
        keep = []
        for i, row in enumerate(self._rows):
            if i < len(tokens):
                row.token = tokens[i]
                if not self._emit(row):
                    continue
            keep.append(i)
        return keep

    def _drop(self, keep: list[int]) -> None:
        """Keep only these rows (and their caches and tokens in flight); release the others' slots."""
        if len(keep) == len(self._rows):
            return
        for i, row in enumerate(self._rows):
            if i not in keep and not row.released:
                self.stats.count(row.request.left_as)
                row.release()
        self._rows = [self._rows[i] for i in keep]
        for batch_cache in self._cache:
            batch_cache.keep(keep)
        if self._inflight is not None:
            covered = [i for i in keep if i < self._inflight.shape[0]]
            self._inflight = self._inflight[mx.array(covered, dtype=mx.int32)] if covered else None


def _close_at_exit(engine: EngineThread) -> None:
    """Stop the engine before the interpreter tears down: a script that exits while a request is
    decoding must not leave MLX evaluating on a daemon thread (the process would abort)."""
    try:
        threading._register_atexit(engine.close)  # runs before teardown, as concurrent.futures does
    except (AttributeError, RuntimeError):  # another Python, or already shutting down
        import atexit
        atexit.register(engine.close)


def _emit_quietly(request: Request, item: StepOutput | BaseException) -> bool:
    """Hand an item to the request's reader; a reader that has gone away cancels the request."""
    try:
        request.emit(item)
        return True
    except Exception:
        request.cancel()
        return False


def _run_call(fn: Callable[[], Any], future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as exc:
        future.set_exception(exc)
