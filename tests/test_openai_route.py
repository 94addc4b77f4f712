"""The OpenAI routes' own rules through Starlette's TestClient: `lora` beside the base model, seeds,
tool choices, fused adapters in /v1/models, and the `param` of OpenAI's error object.

The server runtime, client and reference fixtures and the fine-tune helpers are test_server.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

import mlx_gemma
from mlx_gemma.server.app import build_app
from mlx_gemma.server import openai
from mlx_gemma.server.schema import finetune_not_found
from mlx_gemma.server.service import Settings

from test_server import ACCOUNT, ADAPTER, GREEDY, RUN, client, create_finetune, events, reference, server_runtime

FIXTURES = (client, reference, server_runtime)  # test_server.py's, requested by name below

MODEL = "@cf/google/gemma-2b-it-lora"
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello"}]


def openai_error(status: int, message: str, param: str | None, code: int | str = 5006) -> tuple[int, dict]:
    kind = "invalid_request_error" if status in (400, 404) else "server_error"
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad(message: str, param: str) -> tuple[int, dict]:
    return openai_error(400, f"AiError: Bad input: {message}", param)


def answer(response) -> tuple[int, dict]:
    return response.status_code, response.json()


def choices_and_usage(response) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    return {"choices": body["choices"], "usage": body["usage"]}


# --- lora beside the base model -----------------------------------------------------------------

def test_lora_with_the_base_model_answers_as_model_set_to_the_adapter(client: TestClient,
                                                                      reference: mlx_gemma.Runtime) -> None:
    create_finetune(client, "oa-lora")
    by_model = client.post(CHAT, json={"model": "oa-lora", "messages": HELLO, **GREEDY})
    expected = reference.generate(messages=HELLO, lora="all7", **GREEDY)
    assert by_model.json()["choices"][0]["message"]["content"] == expected.text
    assert expected.text != reference.generate(messages=HELLO, **GREEDY).text  # the adapter changes the answer
    for model in ({"model": MODEL}, {"model": None}, {}):
        by_lora = client.post(CHAT, json={**model, "lora": "oa-lora", "messages": HELLO, **GREEDY})
        assert choices_and_usage(by_lora) == choices_and_usage(by_model)
        assert by_lora.json()["model"] == (model.get("model") or MODEL)
    completion = {"prompt": "Once upon a time", **GREEDY}
    assert choices_and_usage(client.post("/v1/completions", json={**completion, "lora": "oa-lora"})) == \
        choices_and_usage(client.post("/v1/completions", json={**completion, "model": "oa-lora"}))
    stream = client.post(f"{ACCOUNT}/v1/chat/completions", json={"lora": "oa-lora", "messages": HELLO, "stream": True,
                                                                 **GREEDY})
    chunks = [json.loads(event) for event in events(stream)[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected.text


def test_lora_beside_an_adapter_model_or_not_a_string_is_refused(client: TestClient) -> None:
    create_finetune(client, "oa-both")
    both = client.post(CHAT, json={"model": "oa-both", "lora": "oa-both", "messages": HELLO})
    assert answer(both) == bad("lora='oa-both' and model='oa-both' both name an adapter: name it in model, or "
                               "send the base model with lora", "lora")
    for value, shown in ((7, "7"), (["oa-both"], "['oa-both']"), (True, "True")):
        refused = client.post(CHAT, json={"model": MODEL, "lora": value, "messages": HELLO})
        assert answer(refused) == bad(f"lora: {shown} is not of type 'string'", "lora")
    unknown = client.post("/v1/completions", json={"prompt": "Hi", "lora": "nope"})
    assert answer(unknown) == openai_error(404, finetune_not_found("nope").message, "lora", "model_not_found")


# --- seeds --------------------------------------------------------------------------------------

def completion_text(client: TestClient, seed: int) -> str:
    response = client.post("/v1/completions", json={"prompt": "Once upon a time", "temperature": 1.5,
                                                    "max_tokens": 12, "seed": seed})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_distinct_seeds_give_distinct_samples(client: TestClient, server_runtime: mlx_gemma.Runtime) -> None:
    def expected(seed: int) -> str:
        return server_runtime.generate(prompt="Once upon a time", raw=True, temperature=1.5, max_tokens=12,
                                       seed=seed).text

    assert completion_text(client, 0) == expected(2**32 + 1) and completion_text(client, 1) == expected(1)
    assert completion_text(client, -1) == expected(2**32 + 2)
    assert completion_text(client, 9999999999) == expected(2**33 + 1 + (9999999999 - 2**32 - 1) % 1410065407)
    pairs = [(0, 1), (-1, 9999999999), (-1, 1), (2**32, 2**32 + 1), (2**63 - 1, 2**63 - 2), (-5, 9999999995)]
    for one, other in pairs:
        assert completion_text(client, one) != completion_text(client, other), (one, other)


def test_a_seed_in_32_bits_samples_as_on_the_workers_ai_route(client: TestClient) -> None:
    for seed in (1, 42, 2**31 - 1, 2**32):
        run = client.post(RUN, json={"prompt": "Once upon a time", "raw": True, "temperature": 1.5,
                                     "max_tokens": 12, "seed": seed})
        assert completion_text(client, seed) == run.json()["result"]["response"], seed


def test_sampler_seed_is_one_to_one_over_the_ranges_people_use() -> None:
    seeds = [*range(-5000, 5000), *range(2**31 - 500, 2**31 + 500), *range(2**32 - 500, 2**32 + 500),
             *range(-2**32 + 1, -2**32 + 500), *range(openai.SEED_RANGE - 500, openai.SEED_RANGE + 500),
             *range(2**63 - 500, 2**63), -2**31, 5705032703]
    mapped = [openai.sampler_seed(seed) for seed in seeds]
    assert len(set(mapped)) == len(seeds) and all(1 <= seed <= openai.SEED_RANGE for seed in mapped)
    assert [openai.sampler_seed(s) for s in (1, 42, 2**32, 0, -1, -(2**32 - 1), 2**32 + 1, 5705032703, 5705032704)] == \
        [1, 42, 2**32, 2**32 + 1, 2**32 + 2, 2**33, 2**33 + 1, openai.SEED_RANGE, 2**33 + 1]


# --- tool_choice and function_call --------------------------------------------------------------

@pytest.mark.parametrize(("field", "value"), [
    ("tool_choice", "required"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("function_call", {"name": "f"}),
    ("function_call", "required"),
])
def test_a_tool_choice_that_asks_for_a_tool_is_refused(client: TestClient, field: str, value: object) -> None:
    refused = client.post(CHAT, json={"messages": HELLO, field: value, **GREEDY})
    assert answer(refused) == bad(f"{field}={value!r} not supported: this server calls no tools; "
                                  "send \"none\" or \"auto\", or leave it out", field)


def test_a_tool_choice_of_none_or_auto_is_taken(client: TestClient, server_runtime: mlx_gemma.Runtime) -> None:
    text = server_runtime.generate(messages=HELLO, **GREEDY).text
    for choice in ("none", "auto", None):
        body = {"messages": HELLO, "tool_choice": choice, "function_call": choice, **GREEDY}
        assert client.post(CHAT, json=body).json()["choices"][0]["message"]["content"] == text


def test_vllm_fields_at_their_no_op_values_are_taken(client: TestClient, server_runtime: mlx_gemma.Runtime) -> None:
    text = server_runtime.generate(messages=HELLO, **GREEDY).text
    body = {"messages": HELLO, **GREEDY, **openai.VLLM_DEFAULTS, "add_generation_prompt": True,
            "continue_final_message": False}
    assert client.post(CHAT, json=body).json()["choices"][0]["message"]["content"] == text


def test_null_assistant_content_and_no_op_modalities_are_taken(client: TestClient,
                                                              server_runtime: mlx_gemma.Runtime) -> None:
    """OpenAI takes an assistant message with null content (a refusal, a tool call) as empty text."""
    history = [*HELLO, {"role": "assistant", "content": ""}, *HELLO]
    text = server_runtime.generate(messages=history, **GREEDY).text
    for assistant in ({"role": "assistant", "content": None}, {"role": "assistant"}):
        body = {"messages": [*HELLO, assistant, *HELLO], "modalities": ["text"], "length_penalty": 1.0,
                "add_special_tokens": False, **GREEDY}
        assert client.post(CHAT, json=body).json()["choices"][0]["message"]["content"] == text
    completion = client.post("/v1/completions", json={"prompt": "Hi", "add_special_tokens": True, **GREEDY})
    assert completion.json()["choices"][0]["text"] == server_runtime.generate(prompt="Hi", raw=True, **GREEDY).text


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_a_max_tokens_past_the_context_is_refused_as_openai_does(client: TestClient, server_runtime: mlx_gemma.Runtime,
                                                                  field: str) -> None:
    context = server_runtime.loaded.context_length
    prompt_tokens = server_runtime.generate(messages=HELLO, **{**GREEDY, "max_tokens": 1}).usage.prompt_tokens
    message = (f"This model's maximum context length is {context} tokens. However, you requested {context + 1} "
               f"tokens ({prompt_tokens} in the messages, {context + 1 - prompt_tokens} in the completion): lower "
               f"{field} to at most {context - prompt_tokens}, or shorten the prompt")
    body = {"messages": HELLO, **GREEDY, field: context + 1 - prompt_tokens}
    assert answer(client.post(CHAT, json=body)) == bad(message, field)
    fits = client.post(CHAT, json={**body, field: context - prompt_tokens, "stop": ["e"]})
    assert fits.status_code == 200, fits.text


def test_continue_final_message_continues_the_assistants_text(client: TestClient,
                                                               server_runtime: mlx_gemma.Runtime) -> None:
    messages = HELLO + [{"role": "assistant", "content": "Water boils"}]
    expected = server_runtime.generate(messages=messages, continue_final_message=True, add_generation_prompt=False,
                                       **GREEDY)
    assert expected.text != server_runtime.generate(messages=messages, **GREEDY).text
    body = {"messages": messages, "continue_final_message": True, "add_generation_prompt": False, **GREEDY}
    reply = client.post(CHAT, json=body).json()
    assert reply["choices"][0]["message"]["content"] == expected.text
    assert reply["usage"]["prompt_tokens"] == expected.usage.prompt_tokens


# --- a fused adapter in /v1/models --------------------------------------------------------------

def test_a_fused_adapter_is_listed_and_retrieved(tiny_dir: Path, tmp_path: Path) -> None:
    runtime = mlx_gemma.load(tiny_dir, adapters={"fz": str(ADAPTER)}, fuse="fz")
    try:
        with TestClient(build_app(runtime, Settings(data_dir=tmp_path / "data"))) as http:
            rows = http.get("/v1/models").json()["data"]
            assert [row["id"] for row in rows] == [MODEL, runtime.name, "fz"]
            assert http.get("/v1/models/fz").json() == {"id": "fz", "object": "model", "created": 0,
                                                        "owned_by": "mlx-gemma:adapter"}
            text = runtime.generate(messages=HELLO, lora="fz", **GREEDY).text
            for body in ({"model": "fz"}, {"lora": "fz"}):
                reply = http.post(CHAT, json={**body, "messages": HELLO, **GREEDY}).json()
                assert reply["choices"][0]["message"]["content"] == text
    finally:
        runtime.close()


# --- param in OpenAI's error object -------------------------------------------------------------

@pytest.mark.parametrize(("path", "body", "expected"), [
    (CHAT, {"model": 5, "messages": HELLO}, bad("model must be a string, got 5", "model")),
    (CHAT, {"model": "gpt-4o", "messages": HELLO},
     openai_error(404, f"The model 'gpt-4o' does not exist: use one of {MODEL}, MODEL_NAME or a fine-tune's name",
                  "model", "model_not_found")),
    (CHAT, {}, bad('messages is required: a list of {"role", "content"} objects', "messages")),
    (CHAT, {"messages": [{"role": "robot", "content": "Hi"}]},
     bad("messages[0].role='robot' is not supported: use user, assistant (or model), system or developer",
         "messages")),
    ("/v1/completions", {"prompt": 5}, bad("prompt must be a string (or a list of one string), got 5", "prompt")),
    ("/v1/completions", {"prompt": ""}, bad("prompt is empty: send at least one character", "prompt")),
    (CHAT, {"messages": HELLO, "seed": True},
     bad("seed=True has type bool: use an integer from 1 to 9999999999", "seed")),
    (CHAT, {"messages": HELLO, "seed": 1.5},
     bad("seed=1.5 has type float: use an integer from 1 to 9999999999", "seed")),
    (CHAT, {"messages": HELLO, "stream": True, "stream_options": [1]},
     bad("stream_options=[1]: give an object such as {\"include_usage\": true}, or null", "stream_options")),
    (CHAT, {"messages": HELLO, "stream": True, "stream_options": {"include_usage": "yes"}},
     bad("include_usage='yes': give true or false (a JSON boolean), or leave it out", "stream_options")),
    (CHAT, {"messages": HELLO, "stream": "false"},
     bad("stream='false': give true or false (a JSON boolean), or leave it out", "stream")),
    (CHAT, {"messages": HELLO, "n": 2}, bad("n=2: only 1 is supported; send separate requests", "n")),
    (CHAT, {"messages": HELLO, "logprobs": True}, bad("logprobs not supported by this server", "logprobs")),
    (CHAT, {"messages": HELLO, "top_logprobs": 2}, bad("logprobs not supported by this server", "top_logprobs")),
    (CHAT, {"messages": HELLO, "tools": [{"type": "function"}]},
     bad("tool calling not supported by this server", "tools")),
    (CHAT, {"messages": HELLO, "max_tokens": 0},
     bad("max_tokens=0 is out of range: use an integer >= 1", "max_tokens")),
    (CHAT, {"messages": HELLO, "max_completion_tokens": 0},
     bad("max_tokens=0 is out of range: use an integer >= 1", "max_completion_tokens")),
    (CHAT, {"messages": HELLO, "temperature": 9},
     bad("temperature=9 is out of range: use a number from 0 to 5 (0 means greedy)", "temperature")),
    (CHAT, {"messages": HELLO, "temperature": 9, "top_p": -1},
     bad("temperature=9 is out of range: use a number from 0 to 5 (0 means greedy); top_p=-1 is out of range: "
         "use a number from 0 to 2 (values >= 1 keep every token, 0 keeps only the top token)", "temperature")),
    (CHAT, {"messages": HELLO, "top_p": 3},
     bad("top_p=3 is out of range: use a number from 0 to 2 (values >= 1 keep every token, 0 keeps only the top "
         "token)", "top_p")),
    (CHAT, {"messages": HELLO, "stop": ["a", ""]},
     bad("stop=['a', '']: give a string or a list of at most 4 non-empty strings", "stop")),
    (CHAT, {"messages": HELLO, "response_format": {"type": "json_object"}},
     bad("response_format={'type': 'json_object'} not supported: only {\"type\": \"text\"}", "response_format")),
    (CHAT, {"messages": HELLO, "min_p": 0.5}, bad("min_p=0.5 is not supported by this server: leave it out (or send 0)",
                                                  "min_p")),
    (CHAT, {"messages": HELLO, "ignore_eos": True},
     bad("ignore_eos=True is not supported by this server: leave it out (or send false)", "ignore_eos")),
    ("/v1/completions", {"prompt": "Hi", "stop_token_ids": [5]},
     bad("stop_token_ids=[5] is not supported by this server: leave it out (or send [])", "stop_token_ids")),
    (CHAT, {"messages": HELLO, "guided_choice": ["a", "b"]},
     bad("guided_choice=['a', 'b'] is not supported by this server: leave it out (or send null)", "guided_choice")),
    (CHAT, {"messages": HELLO, "continue_final_message": True, "add_generation_prompt": False},
     bad("continue_final_message=True needs the last message to be the assistant's (it is 'user'): end messages "
         "with the assistant text to continue", "messages")),
    (CHAT, {"messages": HELLO + [{"role": "assistant", "content": "Hi"}], "continue_final_message": True},
     bad("continue_final_message=true continues the assistant's last message, which a generation prompt would "
         "close: send add_generation_prompt=false with it", "continue_final_message")),
    (CHAT, {"messages": HELLO, "n": True}, bad("n=True: only 1 is supported; send separate requests", "n")),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 0}, bad("logprobs not supported by this server", "logprobs")),
    (CHAT, {"messages": HELLO, "add_special_tokens": True},
     bad("add_special_tokens=True is not supported by this server: leave it out (or send false)",
         "add_special_tokens")),
    ("/v1/completions", {"prompt": "Hi", "add_special_tokens": False},
     bad("add_special_tokens=False is not supported by this server: leave it out (or send true)",
         "add_special_tokens")),
    (CHAT, {"messages": HELLO, "logits_processors": ["my.proc"]},
     bad("logits_processors=['my.proc'] is not supported by this server: leave it out (or send null)",
         "logits_processors")),
    (CHAT, {"messages": HELLO, "length_penalty": 2.0},
     bad("length_penalty=2.0 is not supported by this server: leave it out (or send 1.0)", "length_penalty")),
    (CHAT, {"messages": HELLO, "modalities": ["text", "audio"]},
     bad("modalities=['text', 'audio'] not supported: this model writes text only; send [\"text\"], or leave it out",
         "modalities")),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                      {"type": "image_url", "image_url": {"url": "x"}}]}]},
     bad("messages[0].content[1] is of type 'image_url': this model reads text only; send {\"type\": \"text\", "
         "\"text\": ...} parts", "messages")),
    (CHAT, {"messages": [{"role": "user", "content": ["Hi"]}]},
     bad("messages[0].content[0] is 'Hi': send an object such as {\"type\": \"text\", \"text\": \"...\"}",
         "messages")),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
     bad("messages[0].content[0].text is None: give the text as a string", "messages")),
    (CHAT, {"model": "m" * 1000, "messages": HELLO},
     openai_error(404, f"The model '{'m' * 59}... (1000 characters) does not exist: use one of {MODEL}, MODEL_NAME "
                       "or a fine-tune's name", "model", "model_not_found")),
    (CHAT, {"messages": HELLO, "add_generation_prompt": "no"},
     bad("add_generation_prompt='no': give true or false (a JSON boolean), or leave it out", "add_generation_prompt")),
    ("/v1/completions", {"prompt": "Hi", "continue_final_message": True},
     bad("continue_final_message shapes the chat template, which /v1/completions does not use: send it to "
         "/v1/chat/completions, or leave it out", "continue_final_message")),
])
def test_a_refused_field_is_named_as_param(client: TestClient, server_runtime: mlx_gemma.Runtime, path: str,
                                           body: dict, expected: tuple[int, dict]) -> None:
    status, error = expected
    error["error"]["message"] = error["error"]["message"].replace("MODEL_NAME", server_runtime.name)
    assert answer(client.post(path, json=body)) == (status, error)
    assert answer(client.post(f"{ACCOUNT}{path}", json=body)) == (status, error)


def test_an_unknown_model_is_model_not_found_on_every_route(client: TestClient) -> None:
    for path in ("/v1/models/gpt-4o", f"{ACCOUNT}/v1/models/gpt-4o"):
        assert answer(client.get(path)) == openai_error(
            404, "The model 'gpt-4o' does not exist: GET /v1/models lists the served ones", "model", "model_not_found")


def test_an_error_of_no_field_keeps_param_null(client: TestClient) -> None:
    response = client.post(CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] is None and response.json()["error"]["code"] == 5006
