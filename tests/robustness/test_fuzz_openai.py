"""Fuzzing the OpenAI routes of a live server: /v1/chat/completions, /v1/completions, /v1/models.

Valid bodies (openai_strategies.py: OpenAI's request shape with the published schema's
sampling limits) get 200 with answers valid against OpenAI's response shapes, streamed or not,
on both mounts. Each refused body carries one mutation whose status and code are fixed in
advance; the answer is OpenAI's error object. Never a 5xx, never a hang.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
from hypothesis import given
from hypothesis import strategies as st

from .conftest import FuzzTarget
from .openai_strategies import MUTATIONS, SHAPES, refused_bodies, valid_bodies
from .support import ACCOUNT_PATH, MODEL, Fuzzer, check_usage, fuzz_settings, openai_error, sse_data

MOUNTS = ["/v1", f"{ACCOUNT_PATH}/v1"]


def route(chat: bool) -> str:
    return "/chat/completions" if chat else "/completions"


def token_limit(body: dict[str, Any]) -> int:
    return body.get("max_completion_tokens") or body["max_tokens"]


def check_answer(response: httpx.Response, body: dict[str, Any], chat: bool) -> None:
    assert response.status_code == 200, response.text[:400]
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    jsonschema.validate(answer, SHAPES["chat.completion" if chat else "text_completion"])
    assert answer["model"] == (body.get("model") or MODEL) and len(answer["choices"]) == 1
    check_usage(answer["usage"], token_limit(body))


def check_stream(response: httpx.Response, body: dict[str, Any], chat: bool) -> None:
    assert response.status_code == 200, response.text[:400]
    data = sse_data(response)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    shape = SHAPES["chat.completion.chunk" if chat else "text_completion"]
    for chunk in chunks:
        jsonschema.validate(chunk, shape)
    wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    if wants_usage:
        check_usage(chunks.pop()["usage"], token_limit(body))
    assert all(len(chunk["choices"]) == 1 and "usage" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])


@fuzz_settings(220)
@given(data=st.data(), mount=st.sampled_from(MOUNTS))
def test_valid_chat_bodies_get_a_completion(fuzzer: Fuzzer, fuzz_target: FuzzTarget, data: st.DataObject,
                                            mount: str) -> None:
    body = data.draw(valid_bodies(True, fuzz_target.models), label="body")
    response = fuzzer.post_json(f"{mount}{route(True)}", body)
    (check_stream if body.get("stream") else check_answer)(response, body, True)


@fuzz_settings(150)
@given(data=st.data(), mount=st.sampled_from(MOUNTS))
def test_valid_completion_bodies_get_a_completion(fuzzer: Fuzzer, fuzz_target: FuzzTarget, data: st.DataObject,
                                                  mount: str) -> None:
    body = data.draw(valid_bodies(False, fuzz_target.models), label="body")
    response = fuzzer.post_json(f"{mount}{route(False)}", body)
    (check_stream if body.get("stream") else check_answer)(response, body, False)


@fuzz_settings(350)
@given(data=st.data(), chat=st.booleans(), mount=st.sampled_from(MOUNTS))
def test_refused_bodies_get_the_openai_error(fuzzer: Fuzzer, fuzz_target: FuzzTarget, data: st.DataObject,
                                            chat: bool, mount: str) -> None:
    body, mutation = data.draw(refused_bodies(chat, fuzz_target.models), label="body and mutation")
    status, code = MUTATIONS[mutation][1]
    fields = set(body) | {"messages" if chat else "prompt"}  # the field at fault is one sent, or the text
    openai_error(fuzzer.post_json(f"{mount}{route(chat)}", body), status, code, fields)


@fuzz_settings(40)
@given(raw=st.binary(max_size=100).filter(lambda raw: not raw.strip().startswith(b"{")), chat=st.booleans())
def test_non_json_bodies_get_the_openai_error(fuzzer: Fuzzer, raw: bytes, chat: bool) -> None:
    response = fuzzer.send("POST", f"/v1{route(chat)}", content=raw, headers={"content-type": "application/json"})
    assert openai_error(response, 400, 5006).startswith("AiError: Bad input: ")


@fuzz_settings(20)
@given(mount=st.sampled_from(MOUNTS), query=st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=5),
                                                            max_size=2))
def test_models_lists_the_served_names_and_fine_tunes(fuzzer: Fuzzer, fuzz_target: FuzzTarget, mount: str,
                                                      query: dict[str, str]) -> None:
    response = fuzzer.send("GET", f"{mount}/models", params=query)
    assert response.status_code == 200
    assert [row["id"] for row in response.json()["data"]] == fuzz_target.models
