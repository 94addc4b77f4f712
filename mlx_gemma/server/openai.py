"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Contract: the shapes of OpenAI's API as the `openai` SDK reads them. `model` names the base
(any of its served names) or a fine-tune (id or name) or an adapter loaded with `--adapter`
(or fused with `--fuse`); it is optional and defaults to the base. With the base (or no
`model`), a `lora` field (a string, as on the Workers AI route) picks the adapter instead: the
answer is the one `model` set to that adapter gives; `lora` beside a `model` that names an
adapter, or a `lora` that is not a string, is refused (400). Sampling fields: max_tokens (or
max_completion_tokens), temperature, top_p, seed, frequency_penalty, presence_penalty, and as
in vLLM top_k and repetition_penalty. Without max_tokens a chat completion runs until it stops or
fills the context (as vLLM) and a completion stops at 16 tokens (as OpenAI); a max_tokens that
does not fit in the context beside the prompt is refused (400, as OpenAI and vLLM). As in vLLM, a
top_k of 0 or less means no top-k; integral numbers such as 8.0 count as integers. Any integer
seed is taken (`sampler_seed`): 1 to 2**32 is the same seed as on the Workers AI route, and
distinct seeds from -(2**32 - 1) to 5705032703 give distinct samples; larger ones fold into the
sampler's range. Other values outside the Workers AI schema's limits are refused (penalties below
0 among them). Fields sent as null count as unset. `developer` messages are system messages; a
message's text parts are joined with newlines (other parts are refused); an assistant message's
null content is empty text. echo, suffix, logprobs, n or best_of other than 1, a response_format
other than text, and a tool_choice or function_call other than "none" or "auto" are refused rather
than ignored, and so are stream_options without stream and modalities other than ["text"]; so are
vLLM's own fields that are not applied (min_p, min_tokens, ignore_eos, stop_token_ids, guided
decoding, a chat_template, add_special_tokens, ...: `VLLM_DEFAULTS`) unless sent with the value
that changes nothing; chat_template_kwargs is taken and unused, as Gemma's template reads none. As
in vLLM, chat completions take continue_final_message (the answer continues the last, assistant,
message) and add_generation_prompt (default true).
`/v1/completions` tokenizes the prompt as given (no chat template). `stop` strings end
the text before the stop string. Streams end with `data: [DONE]`; with
`stream_options.include_usage` a last chunk carries the usage; a stream that fails part way
sends `data: {"error": {...}}` before `[DONE]`, which the SDK raises as an `APIError`.
`GET /v1/models` lists every name `model` takes but fine-tunes' ids; `GET /v1/models/{id}`
returns one row of it (a fine-tune's id finds its row). The same routes are mounted under
/client/v4/accounts/{account_id}/ai/v1/. Errors: OpenAI's `{"error": {...}}` (`error_body`,
used by app.py). A refused field raises a `FieldError`, answered here with that field as
`param`; an unknown model (or lora) is 404 with type invalid_request_error and code
model_not_found, as OpenAI answers.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route

from ..lora.store import FinetuneNotFound
from ..sampler import GenerationParams, InvalidParams
from .schema import ApiError, bad_input, integral, shortened
from .service import AsyncTextStream, Service
from .workers_ai import (PREFIX, SSE_HEADERS, read_json, service_of, sse, started, unless_gone, until_error,
                         while_connected)

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "frequency_penalty", "presence_penalty",
                   "repetition_penalty")
NOT_SUPPORTED = {"tools": "tool calling", "functions": "function calling", "logit_bias": "logit_bias",
                 "echo": "echo (returning the prompt with the completion)", "suffix": "suffix (text after the completion)"}
# vLLM's own request fields that this server does not apply, with the value that leaves the answer
# as it is: that value (or null) is accepted, any other is refused rather than silently ignored.
# chat_template_kwargs is taken and unused: Gemma's template reads none (as in vLLM).
VLLM_DEFAULTS: dict[str, Any] = {"min_p": 0, "min_tokens": 0, "ignore_eos": False, "stop_token_ids": [],
                                 "include_stop_str_in_output": False, "skip_special_tokens": True,
                                 "use_beam_search": False, "prompt_logprobs": None, "guided_json": None,
                                 "guided_regex": None, "guided_choice": None, "guided_grammar": None,
                                 "structured_outputs": None, "allowed_token_ids": None, "bad_words": [],
                                 "truncate_prompt_tokens": None, "chat_template": None, "logits_processors": None,
                                 "length_penalty": 1.0, "audio": None}
# add_special_tokens: vLLM's chat template adds BOS itself (false), a completion's prompt gets it (true)
ADD_SPECIAL_TOKENS = {True: False, False: True}
NO_TOOL_CHOICES = (None, "none", "auto")  # what tool_choice and function_call may be without tools
INTEGER_FIELDS = ("max_tokens", "max_completion_tokens", "top_k", "seed")
SEED_RANGE = 9999999999  # the sampler's seeds, as the Workers AI schema's: 1..SEED_RANGE
SHARED_SEEDS = 2**32  # seeds 1..SHARED_SEEDS are used as they are, as on the Workers AI route
FOLDED_SEEDS = SEED_RANGE - 2 * SHARED_SEEDS  # sampler seeds left for OpenAI seeds above 2**32 or far below 0
COMPLETION_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error"}


class FieldError(ApiError):
    """An ApiError about one request field, which OpenAI's error object names as `param`. An unknown
    model (or lora) also takes OpenAI's own type and code: invalid_request_error, model_not_found."""

    def __init__(self, error: ApiError, param: str):
        super().__init__(error.status, error.code, error.message)
        self.param = param
        self.not_found = error.status == 404 and error.code == 3037


def bad_field(param: str, message: str) -> FieldError:
    """400 (5006) for the request field `param`."""
    return FieldError(bad_input(message), param)


@contextmanager
def about(param: str) -> Iterator[None]:
    """A bad request (400 or 404) raised inside names `param` as the field at fault, unless it names one."""
    try:
        yield
    except FieldError:
        raise
    except ApiError as exc:
        if exc.status not in (400, 404):
            raise
        raise FieldError(exc, param) from None


def error_body(status: int, code: int | str, message: str, param: str | None = None,
               kind: str | None = None) -> dict[str, Any]:
    """OpenAI's error object, as the `openai` SDK reads it."""
    kind = kind or ERROR_TYPES.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_object(error: ApiError) -> dict[str, Any]:
    """OpenAI's error object for an ApiError: a FieldError names its field (and an unknown model)."""
    if not isinstance(error, FieldError):
        return error_body(error.status, error.code, error.message)
    if error.not_found:
        return error_body(error.status, "model_not_found", error.message, error.param, "invalid_request_error")
    return error_body(error.status, error.code, error.message, error.param)


def naming_fields(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """An endpoint whose FieldErrors are answered here, with their `param`; app.py renders other errors."""
    @functools.wraps(endpoint)
    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except FieldError as exc:
            return JSONResponse(error_object(exc), exc.status)
    return answer


async def resolve_model(service: Service, model: Any) -> str | None:
    """The lora key for an OpenAI `model` value: None for the base."""
    if model is None or model in service.served_models():
        return None
    if not isinstance(model, str):
        raise bad_field("model", f"model must be a string, got {shortened(model)}")
    with about("model"):
        try:
            return await service.resolve_lora(model)
        except ApiError as exc:
            if exc.status != 404:
                raise
            raise ApiError(404, 3037, f"The model {shortened(model)} does not exist: use one of "
                                      f"{', '.join(service.served_models())} or a fine-tune's name") from None


async def resolve_adapter(service: Service, body: dict[str, Any]) -> str | None:
    """The lora key of a request: `model`'s, or with the base model, `lora`'s (as the Workers AI route reads it)."""
    lora = await resolve_model(service, body.get("model"))
    named = body.get("lora")
    if named is None:
        return lora
    if not isinstance(named, str):
        raise bad_field("lora", f"lora: {shortened(named)} is not of type 'string'")
    if lora is not None:
        raise bad_field("lora", f"lora={named!r:.80} and model={body['model']!r:.80} both name an adapter: "
                                "name it in model, or send the base model with lora")
    with about("lora"):
        return await service.resolve_lora(named)


def sampler_seed(seed: int) -> int:
    """The sampler's seed (1..9999999999) for any integer seed, one to one from -(2**32 - 1) to
    2**32 + FOLDED_SEEDS: 1..2**32 stay as they are (as on the Workers AI route), 0 and the negatives
    down to -(2**32 - 1) take 2**32 + 1 - seed, and any other seed folds into 2**33 + 1..9999999999."""
    if 1 <= seed <= SHARED_SEEDS:
        return seed
    if -SHARED_SEEDS < seed <= 0:
        return SHARED_SEEDS + 1 - seed
    return 2 * SHARED_SEEDS + 1 + (seed - SHARED_SEEDS - 1) % FOLDED_SEEDS


def sampling(body: dict[str, Any], default_max_tokens: int, chat: bool = True) -> dict[str, Any]:
    """Sampler arguments from the body; null means unset, as in OpenAI's API. A bad value is a FieldError."""
    _refuse_unsupported(body, chat)
    body = {key: integral(body[key]) if key in INTEGER_FIELDS else body[key] for key in body}
    args = {key: body[key] for key in SAMPLING_FIELDS if body.get(key) is not None}
    if _is_int(args.get("top_k")) and args["top_k"] <= 0:
        del args["top_k"]  # vLLM's -1 (and 0): no top-k
    if _is_int(args.get("seed")):
        args["seed"] = sampler_seed(args["seed"])  # OpenAI takes any integer seed
    given = max_tokens_field(body)
    args["max_tokens"] = default_max_tokens if given is None else body[given]
    args.setdefault("temperature", 1.0)  # OpenAI's default
    _check_sampling(args, given or "max_tokens")
    return args


def max_tokens_field(body: dict[str, Any]) -> str | None:
    """The field that sets max_tokens: max_completion_tokens wins over max_tokens; None when neither is set."""
    return next((key for key in ("max_completion_tokens", "max_tokens") if body.get(key) is not None), None)


def _check_sampling(args: dict[str, Any], max_tokens_field: str) -> None:
    """Refuse what GenerationParams refuses, with its message, naming the first bad field as `param`."""
    try:
        GenerationParams(**args).validate()
    except InvalidParams as exc:
        first = exc.names[0]
        raise bad_field(max_tokens_field if first == "max_tokens" else first, str(exc)) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # false is no seed 0, nor a top_k


def _refuse_unsupported(body: dict[str, Any], chat: bool) -> None:
    unsupported = {key: label for key, label in NOT_SUPPORTED.items() if body.get(key)}
    logprobs = body.get("logprobs")
    asked = logprobs is not None and logprobs is not False  # logprobs: 0 on /v1/completions asks for them too
    if asked or body.get("top_logprobs") is not None:
        unsupported["logprobs" if asked else "top_logprobs"] = "logprobs"
    if unsupported:
        raise bad_field(next(iter(unsupported)), f"{', '.join(unsupported.values())} not supported by this server")
    _refuse_tool_choice(body)
    _refuse_vllm_extras(body, chat)
    _refuse_modalities(body)
    for count in ("n", "best_of"):
        value = body.get(count)
        if value is not None and not (_is_int(integral(value)) and integral(value) == 1):
            raise bad_field(count, f"{count}={shortened(value)}: only 1 is supported; send separate requests")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise bad_field("response_format",
                        f"response_format={response_format!r:.80} not supported: only {{\"type\": \"text\"}}")


def _refuse_vllm_extras(body: dict[str, Any], chat: bool) -> None:
    for key, default in {**VLLM_DEFAULTS, "add_special_tokens": ADD_SPECIAL_TOKENS[chat]}.items():
        if body.get(key) not in (None, default):
            raise bad_field(key, f"{key}={body[key]!r:.80} is not supported by this server: leave it out "
                                 f"(or send {json.dumps(default)})")


def _refuse_modalities(body: dict[str, Any]) -> None:
    """OpenAI's output modalities: text is the only one this model writes."""
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise bad_field("modalities", f"modalities={modalities!r:.80} not supported: this model writes text only; "
                                      'send ["text"], or leave it out')


def _refuse_tool_choice(body: dict[str, Any]) -> None:
    """tool_choice or function_call asking for a tool: there are no tools to call (OpenAI refuses it too)."""
    for key in ("tool_choice", "function_call"):
        if body.get(key) not in NO_TOOL_CHOICES:
            raise bad_field(key, f"{key}={body[key]!r:.80} not supported: this server calls no tools; "
                                 "send \"none\" or \"auto\", or leave it out")


def stop_strings(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise bad_field("stop", f"stop={shortened(stop)}: give a string or a list of at most 4 non-empty strings")
    return stops


def stream_options(body: dict[str, Any], streaming: bool) -> dict[str, Any]:
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_field("stream_options",
                        f"stream_options={options!r:.80}: give an object such as {{\"include_usage\": true}}, or null")
    if options is not None and not streaming:
        raise bad_field("stream_options",
                        "stream_options is only for streamed answers: send \"stream\": true, or leave it out")
    return options or {}


def flag(holder: dict[str, Any], name: str, param: str | None = None) -> bool:
    """A boolean field: true, false, null or absent. A string such as "false" is refused, as OpenAI does,
    rather than read as truthy; the error names `param` (default: `name`)."""
    value = holder.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_field(param or name, f"{name}={value!r:.80}: give true or false (a JSON boolean), or leave it out")
    return bool(value)


class StopWatcher:
    """Holds back just enough text to cut it before the first stop string."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        self.held += piece
        cut = min((i for i in (self.held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.held = self.held[:cut], ""
            return out
        keep = max((len(s) - 1 for s in self.stops), default=0)
        ready = max(0, len(self.held) - keep)  # all but the tail that could still begin a stop string
        out, self.held = self.held[:ready], self.held[ready:]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


async def stopped_text(stream: AsyncTextStream, pieces: AsyncIterator[str], stops: list[str]) -> AsyncIterator[str]:
    watcher = StopWatcher(stops)
    async for piece in pieces:
        if out := watcher.feed(piece):
            yield out
        if watcher.stopped:
            stream.stop()
            return
    if out := watcher.flush():
        yield out


def finish_reason(stream: AsyncTextStream) -> str:
    return "length" if stream.finish_reason == "length" else "stop"


def usage(stream: AsyncTextStream) -> dict[str, int]:
    return stream.usage.to_dict()


async def generate(request: Request, chat: bool) -> Response:
    service = service_of(request)
    service.check_room()
    body = await read_json(request)
    lora = await resolve_adapter(service, body)
    model = body.get("model") or service.served_models()[0]
    ids, params = await _prepared(service, lora, body, chat)
    stops = stop_strings(body)
    streaming = flag(body, "stream")
    include_usage = flag(stream_options(body, streaming), "include_usage", "stream_options")
    stream = service.open_stream(ids, params, lora, stop_strings=bool(stops))
    pieces = stopped_text(stream, await while_connected(request, stream, started(stream)), stops)
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
    if streaming:
        events = (chat_events if chat else completion_events)(stream, pieces, meta, include_usage)
        return StreamingResponse(until_error(events, error_object), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    try:
        text = await while_connected(request, stream, _joined(pieces))
    finally:
        stream.cancel()
    return JSONResponse((chat_body if chat else completion_body)(text, stream, meta))


async def _prepared(service: Service, lora: str | None, body: dict[str, Any],
              chat: bool) -> tuple[list[int], GenerationParams]:
    """Prompt ids and generation parameters. Unset max_tokens: a chat runs to a stop or a full context
    (as vLLM), a completion stops at 16 tokens (as OpenAI)."""
    text_args = _text_args(body, chat)
    default_max_tokens = service.runtime.loaded.context_length if chat else COMPLETION_MAX_TOKENS
    args = sampling(body, default_max_tokens, chat)
    with about("messages" if chat else "prompt"):  # the sampling values are checked: what is left is the text
        ids, params = await service.prepare(lora, **text_args, **args)
    given = max_tokens_field(body)
    if given is not None:
        _check_fits(len(ids), args["max_tokens"], service.runtime.loaded.context_length, given,
                    "messages" if chat else "prompt")
    return ids, params


def _check_fits(prompt_tokens: int, max_tokens: int, context_length: int, field: str, text: str) -> None:
    """A max_tokens the context cannot hold is refused, as OpenAI and vLLM do (unset, it fills the context)."""
    if prompt_tokens + max_tokens > context_length:
        raise bad_field(field, f"This model's maximum context length is {context_length} tokens. However, you "
                               f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
                               f"{text}, {max_tokens} in the completion): lower "
                               f"{field} to at most {max(context_length - prompt_tokens, 0)}, or shorten the prompt")


async def _joined(pieces: AsyncIterator[str]) -> str:
    return "".join([piece async for piece in pieces])


def _text_args(body: dict[str, Any], chat: bool) -> dict[str, Any]:
    template = _template_args(body, chat)
    if chat:
        if "messages" not in body:
            raise bad_field("messages", 'messages is required: a list of {"role", "content"} objects')
        messages = body["messages"]
        return {"messages": [_flatten_content(i, m) for i, m in enumerate(messages)] if isinstance(messages, list) else messages,
                **template}
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_field("prompt", f"prompt must be a string (or a list of one string), got {prompt!r:.80}")
    return {"prompt": prompt, "raw": True}


def _template_args(body: dict[str, Any], chat: bool) -> dict[str, bool]:
    """vLLM's chat template fields: continue_final_message (default false), add_generation_prompt (true)."""
    continued = flag(body, "continue_final_message")
    opened = body.get("add_generation_prompt") is None or flag(body, "add_generation_prompt")
    if not chat and (continued or not opened):
        field = "continue_final_message" if continued else "add_generation_prompt"
        raise bad_field(field, f"{field} shapes the chat template, which /v1/completions does not use: "
                               "send it to /v1/chat/completions, or leave it out")
    if continued and opened:  # as vLLM: add_generation_prompt defaults to true, so it must be sent false
        raise bad_field("continue_final_message", "continue_final_message=true continues the assistant's last "
                                                  "message, which a generation prompt would close: send "
                                                  "add_generation_prompt=false with it")
    return {"continue_final_message": continued, "add_generation_prompt": opened}


def _flatten_content(index: int, message: Any) -> Any:
    """OpenAI content parts [{"type": "text", "text": ...}] -> one string, the parts joined with newlines
    (as vLLM does); an assistant message's null or missing content -> "" (as OpenAI takes it, say beside
    a refusal); other shapes pass to validation. A part that is not text is refused by its index."""
    if not isinstance(message, dict):
        return message
    if message.get("role") == "assistant" and message.get("content") is None:
        return {**message, "content": ""}
    parts = message.get("content")
    if not isinstance(parts, list):
        return message
    for part_index, part in enumerate(parts):
        _check_text_part(f"messages[{index}].content[{part_index}]", part)
    return {**message, "content": "\n".join(p["text"] for p in parts)}


def _check_text_part(where: str, part: Any) -> None:
    """A content part this model reads: {"type": "text", "text": "..."}."""
    if not isinstance(part, dict):
        raise bad_field("messages", f"{where} is {shortened(part, 40)}: send an object such as "
                                    '{"type": "text", "text": "..."}')
    if part.get("type") != "text":
        raise bad_field("messages", f"{where} is of type {shortened(part.get('type'), 40)}: this model reads "
                                    'text only; send {"type": "text", "text": ...} parts')
    if not isinstance(part.get("text"), str):
        raise bad_field("messages", f"{where}.text is {shortened(part.get('text'), 40)}: give the text as a string")


def chat_body(text: str, stream: AsyncTextStream, meta: dict[str, Any]) -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": finish_reason(stream)}
    return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage(stream)}


def completion_body(text: str, stream: AsyncTextStream, meta: dict[str, Any]) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(stream)}
    return {**meta, "object": "text_completion", "choices": [choice], "usage": usage(stream)}


async def chat_events(stream: AsyncTextStream, pieces: AsyncIterator[str], meta: dict[str, Any],
                      include_usage: bool) -> AsyncIterator[bytes]:
    chunk = {**meta, "object": "chat.completion.chunk"}
    yield sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    async for piece in pieces:
        yield sse({**chunk, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
    yield sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason(stream)}]})
    if include_usage:
        yield sse({**chunk, "choices": [], "usage": usage(stream)})
    yield sse("[DONE]")


async def completion_events(stream: AsyncTextStream, pieces: AsyncIterator[str], meta: dict[str, Any],
                            include_usage: bool) -> AsyncIterator[bytes]:
    chunk = {**meta, "object": "text_completion"}
    async for piece in pieces:
        yield sse({**chunk, "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": None}]})
    yield sse({**chunk, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason(stream)}]})
    if include_usage:
        yield sse({**chunk, "choices": [], "usage": usage(stream)})
    yield sse("[DONE]")


@unless_gone
@naming_fields
async def chat_completions(request: Request) -> Response:
    return await generate(request, chat=True)


@unless_gone
@naming_fields
async def completions(request: Request) -> Response:
    return await generate(request, chat=False)


async def model_rows(service: Service) -> list[dict[str, Any]]:
    finetunes = await asyncio.to_thread(service.store.list)
    rows = [_model_row(name, "mlx-gemma") for name in service.served_models()]
    rows += [_model_row(name, "mlx-gemma:adapter") for name in sorted(service.adapter_names())]
    return rows + [_model_row(f.name, "mlx-gemma:finetune") for f in finetunes if f.complete]


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": await model_rows(service_of(request))})


@naming_fields
async def model(request: Request) -> Response:
    """One row of /v1/models, as `client.models.retrieve(id)` reads it; ids may hold slashes."""
    name, service = request.path_params["name"], service_of(request)
    rows = await model_rows(service)
    row = next((row for row in rows if row["id"] == name), None)
    if row is None:  # a fine-tune's id: its row, which names it
        finetune = await asyncio.to_thread(_finetune_or_none, service, name)
        row = next((row for row in rows if finetune and row["id"] == finetune.name), None)  # listed: complete
    if row is None:
        missing = ApiError(404, 3037, f"The model {shortened(name)} does not exist: GET /v1/models lists the served ones")
        raise FieldError(missing, "model")
    return JSONResponse(row)


def _finetune_or_none(service: Service, id_or_name: str) -> Any:
    try:
        return service.store.get(id_or_name)
    except FinetuneNotFound:
        return None


def _model_row(name: str, owner: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": owner}


def v1_routes() -> list[BaseRoute]:
    return [
        Route("/chat/completions", chat_completions, methods=["POST"]),
        Route("/completions", completions, methods=["POST"]),
        Route("/models", models, methods=["GET"]),
        Route("/models/{name:path}", model, methods=["GET"]),
    ]


def routes() -> list[BaseRoute]:
    return [Mount("/v1", routes=v1_routes()), Mount(f"{PREFIX}/v1", routes=v1_routes())]
