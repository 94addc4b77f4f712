"""Hypothesis strategies for the OpenAI routes, and the shapes their answers must have.

Valid bodies: a JSON schema of OpenAI's chat and completion requests whose sampling fields
are the published Workers AI schema's (the server applies the same limits), each also
nullable as in OpenAI's API, with `max_tokens` 1..8, and `stream: true` whenever `stream_options`
is sent. Refused bodies: a valid body with one `MUTATIONS` entry applied, which fixes the
expected status and code. Out-of-range values leave out those the OpenAI routes take as vLLM
does (any integral seed, a top_k of 0 or less).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from .strategies import MAX_TOKENS, ROLES, SAMPLING_FIELDS, SHORT_TEXT, json_values, out_of_range, variants

STOP_TEXT = {"type": "string", "minLength": 1, "maxLength": 3}
TEXT_PART = {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string", "maxLength": 20}},
             "required": ["type", "text"], "additionalProperties": False}
UNSUPPORTED = ("tools", "functions", "logprobs", "top_logprobs", "response_format", "logit_bias")


def nullable(spec: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [spec, {"type": "null"}]}


def sampling_properties() -> dict[str, Any]:
    published = variants()["prompt"]["properties"]
    props = {field: nullable(copy.deepcopy(published[field])) for field in SAMPLING_FIELDS}
    props["repetition_penalty"] = nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 2})
    return props


def text_property(chat: bool) -> dict[str, Any]:
    if not chat:
        prompt = {"type": "string", "minLength": 1, "maxLength": SHORT_TEXT}
        return {"prompt": {"anyOf": [prompt, {"type": "array", "items": prompt, "minItems": 1, "maxItems": 1}]}}
    parts = {"type": "array", "items": TEXT_PART, "maxItems": 3}
    content = {"anyOf": [{"type": "string", "maxLength": SHORT_TEXT}, parts]}
    message = {"type": "object", "properties": {"role": {"enum": ROLES}, "content": content},
               "required": ["role", "content"], "additionalProperties": False}
    return {"messages": {"type": "array", "items": message, "minItems": 1, "maxItems": 3}}


def request_schema(chat: bool, models: list[str]) -> dict[str, Any]:
    tokens = {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}
    options = {"type": "object", "properties": {"include_usage": {"type": "boolean"}}, "additionalProperties": False}
    props = {**sampling_properties(), **text_property(chat), "model": {"enum": models}, "stream": {"type": "boolean"},
             "stream_options": options, "n": {"const": 1}, "user": {"type": "string", "maxLength": 8},
             "stop": {"anyOf": [STOP_TEXT, {"type": "array", "items": STOP_TEXT, "maxItems": 4}]},
             "max_tokens": tokens, "max_completion_tokens": tokens}
    one_limit = [{"required": ["max_tokens"]}, {"required": ["max_completion_tokens"]}]
    return {"type": "object", "properties": props, "required": [next(iter(text_property(chat)))],
            "oneOf": one_limit, "additionalProperties": False}


def valid_bodies(chat: bool, models: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return from_schema(request_schema(chat, models)).map(_streamed_if_options)


def _streamed_if_options(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "stream": True} if "stream_options" in body else body


def accepted_by_openai(field: str, value: Any) -> bool:
    """Values the OpenAI routes take though the Workers AI schema refuses them: an integral seed, a top_k <= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        return False
    return field == "seed" or (field == "top_k" and value <= 0)


def stop_refused(stop: Any) -> bool:
    stops = [stop] if isinstance(stop, str) else stop or []
    return not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops)


def is_prompt(value: Any) -> bool:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return isinstance(value, str) and bool(value)


Mutator = Callable[[st.DrawFn, dict[str, Any], bool, list[str]], None]


def _no_text(draw: st.DrawFn, body: dict[str, Any], chat: bool, models: list[str]) -> None:
    del body["messages" if chat else "prompt"]


def _bad_text(draw: st.DrawFn, body: dict[str, Any], chat: bool, models: list[str]) -> None:
    if chat:
        body["messages"] = draw(json_values().filter(lambda v: not isinstance(v, list) or not v) |
                                json_values().filter(lambda v: not isinstance(v, dict)).map(lambda v: [v]))
    else:
        body["prompt"] = draw(json_values().filter(lambda v: not is_prompt(v)))


def _unknown_role(draw: st.DrawFn, body: dict[str, Any], chat: bool, models: list[str]) -> None:
    if not chat:  # a completion has no roles: a prompt of another type instead
        return _bad_text(draw, body, chat, models)
    body["messages"][0]["role"] = draw(json_values().filter(lambda role: role not in ROLES))


def _out_of_range(draw: st.DrawFn, body: dict[str, Any], chat: bool, models: list[str]) -> None:
    field = draw(st.sampled_from(SAMPLING_FIELDS))
    body[field] = draw(out_of_range(field).filter(lambda v: v is not None and not accepted_by_openai(field, v)))


def _too_few_tokens(draw: st.DrawFn, body: dict[str, Any], chat: bool, models: list[str]) -> None:
    body["max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"] = draw(st.integers(max_value=0))


def _set(key: str, values: st.SearchStrategy[Any]) -> Mutator:
    def mutate(draw: st.DrawFn, body: dict[str, Any], chat: bool, models: list[str]) -> None:
        body[key] = draw(values)
    return mutate


def _unsupported(draw: st.DrawFn, body: dict[str, Any], chat: bool, models: list[str]) -> None:
    body[draw(st.sampled_from(UNSUPPORTED))] = draw(json_values().filter(bool))


def _unknown_model(draw: st.DrawFn, body: dict[str, Any], chat: bool, models: list[str]) -> None:
    body["model"] = draw(st.text(max_size=20).filter(lambda m: m not in models))


def _bad_stream_options(draw: st.DrawFn, body: dict[str, Any], chat: bool, models: list[str]) -> None:
    body |= {"stream": True, "stream_options": draw(json_values().filter(lambda v: v is not None and
                                                                           not isinstance(v, dict)))}


def _options_without_stream(draw: st.DrawFn, body: dict[str, Any], chat: bool, models: list[str]) -> None:
    body |= {"stream": draw(st.sampled_from([False, None])), "stream_options": {"include_usage": True}}


BAD_INPUT, NOT_FOUND = (400, 5006), (404, 3037)
MUTATIONS: dict[str, tuple[Mutator, tuple[int, int]]] = {  # name -> (mutator, expected status and code)
    "no text": (_no_text, BAD_INPUT), "text of another type": (_bad_text, BAD_INPUT),
    "unknown role": (_unknown_role, BAD_INPUT), "sampling out of range": (_out_of_range, BAD_INPUT),
    "max_tokens below 1": (_too_few_tokens, BAD_INPUT),
    "n other than 1": (_set("n", json_values().filter(lambda n: n not in (None, 1))), BAD_INPUT),  # null: unset
    "bad stop": (_set("stop", json_values().filter(stop_refused)), BAD_INPUT),
    "unsupported feature": (_unsupported, BAD_INPUT),
    "model not a string": (_set("model", json_values().filter(lambda m: m is not None and not isinstance(m, str))),
                           BAD_INPUT),
    "unknown model": (_unknown_model, NOT_FOUND), "stream_options not an object": (_bad_stream_options, BAD_INPUT),
    "stream_options without stream": (_options_without_stream, BAD_INPUT),
}


@st.composite
def refused_bodies(draw: st.DrawFn, chat: bool, models: list[str]) -> tuple[dict[str, Any], str]:
    """A valid body with one mutation applied, and the mutation's name (a key of MUTATIONS)."""
    body = draw(valid_bodies(chat, models))
    mutation = draw(st.sampled_from(sorted(MUTATIONS)))
    MUTATIONS[mutation][0](draw, body, chat, models)
    return body, mutation


USAGE_FIELDS = ["prompt_tokens", "completion_tokens", "total_tokens"]
USAGE = {"type": "object", "required": USAGE_FIELDS, "additionalProperties": False,
         "properties": {field: {"type": "integer", "minimum": 0} for field in USAGE_FIELDS}}
FINISH = {"enum": ["stop", "length"]}
_META = {"id": {"type": "string", "pattern": "^(chatcmpl|cmpl)-[0-9a-f]{32}$"}, "created": {"type": "integer"},
         "model": {"type": "string", "minLength": 1}}


def _answer(kind: str, choice: dict[str, Any], with_usage: bool) -> dict[str, Any]:
    props = {**_META, "object": {"const": kind}, "choices": {"type": "array", "items": choice},
             "usage": USAGE}
    required = ["id", "created", "model", "object", "choices"] + (["usage"] if with_usage else [])
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def _choice(fields: dict[str, Any]) -> dict[str, Any]:
    props = {"index": {"const": 0}, **fields}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


MESSAGE = {"type": "object", "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}},
           "required": ["role", "content"], "additionalProperties": False}
DELTA = {"type": "object", "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}},
         "additionalProperties": False}
SHAPES = {
    "chat.completion": _answer("chat.completion", _choice({"message": MESSAGE, "logprobs": {"type": "null"},
                                                          "finish_reason": FINISH}), True),
    "chat.completion.chunk": _answer("chat.completion.chunk",
                                     _choice({"delta": DELTA, "finish_reason": nullable(FINISH)}), False),
    "text_completion": _answer("text_completion", _choice({"text": {"type": "string"}, "logprobs": {"type": "null"},
                                                          "finish_reason": nullable(FINISH)}), False),
}
