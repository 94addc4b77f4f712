"""The HTTP server through Starlette's TestClient: exact bodies, events and error envelopes.

A server runtime of its own (the tiny checkpoint) keeps fine-tune adapters out of the
session runtime; `reference` is a second runtime that loads the same adapter directly, to
show the server serves exactly what the Python API gives.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest
from starlette.testclient import TestClient

import mlx_gemma
from mlx_gemma.engine import Request
from mlx_gemma.sampler import GenerationParams
from mlx_gemma.server.app import build_app
from mlx_gemma.server.openai import StopWatcher
from mlx_gemma.server.schema import finetune_not_found
from mlx_gemma.server.service import Settings

from conftest import FIXTURES
from serving import asgi_post

ADAPTER = FIXTURES / "adapters" / "all7_r8"
ACCOUNT = "/client/v4/accounts/0123abcd/ai"
RUN = f"{ACCOUNT}/run/@cf/google/gemma-2b-it-lora"
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def server_runtime(tiny_dir: Path) -> mlx_gemma.Runtime:
    return mlx_gemma.load(tiny_dir, max_queue=2)


@pytest.fixture(scope="module")
def reference(tiny_dir: Path) -> mlx_gemma.Runtime:
    return mlx_gemma.load(tiny_dir, adapters={"all7": str(ADAPTER)})


@pytest.fixture()
def client(server_runtime: mlx_gemma.Runtime, tmp_path: Path) -> TestClient:
    app = build_app(server_runtime, Settings(data_dir=tmp_path / "data"))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def envelope(result: object) -> dict:
    return {"result": result, "success": True, "errors": [], "messages": []}


def error(code: int, message: str) -> dict:
    return {"result": {}, "success": False, "errors": [{"code": code, "message": message}], "messages": []}


def expected_run(rt: mlx_gemma.Runtime, **request: object) -> dict:
    result = rt.generate(**request)
    return envelope({"response": result.text, "usage": result.usage.to_dict()})


def events(response) -> list[str]:
    return [block.removeprefix("data: ") for block in response.text.split("\n\n") if block]


def upload(client: TestClient, finetune: str, file_name: str, content: bytes):
    return client.post(f"{ACCOUNT}/finetunes/{finetune}/finetune-assets",
                       data={"file_name": file_name}, files={"file": (file_name, content)})


def create_finetune(client: TestClient, name: str, files: dict[str, bytes] | None = None) -> dict:
    created = client.post(f"{ACCOUNT}/finetunes", json={"model": "@cf/google/gemma-2b-it-lora", "name": name,
                                                          "description": "test", "public": name.startswith("pub")})
    assert created.status_code == 200, created.text
    files = {f: (ADAPTER / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")} \
        if files is None else files
    for file_name, content in files.items():
        assert upload(client, name, file_name, content).json()["success"] is True
    return created.json()["result"]


def test_run_prompt_matches_the_python_api(client: TestClient, server_runtime: mlx_gemma.Runtime) -> None:
    response = client.post(RUN, json={"prompt": "Hello there", **GREEDY})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == expected_run(server_runtime, prompt="Hello there", **GREEDY)


def test_run_routes_the_percent_encoded_model_name(client: TestClient, server_runtime: mlx_gemma.Runtime) -> None:
    response = client.post(f"{ACCOUNT}/run/@cf%2Fgoogle%2Fgemma-2b-it-lora", json={"prompt": "Hi", **GREEDY})
    assert response.json() == expected_run(server_runtime, prompt="Hi", **GREEDY)


def test_run_messages_and_boolean_strings(client: TestClient, server_runtime: mlx_gemma.Runtime) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]
    response = client.post(RUN, json={"messages": messages, "stream": "false", **GREEDY})
    assert response.json() == expected_run(server_runtime, messages=messages, **GREEDY)
    raw = client.post(RUN, json={"prompt": "Once upon", "raw": "true", **GREEDY})
    assert raw.json() == expected_run(server_runtime, prompt="Once upon", raw=True, **GREEDY)


def test_stream_events_join_to_the_text_then_usage_then_done(client: TestClient,
                                                             server_runtime: mlx_gemma.Runtime) -> None:
    response = client.post(RUN, json={"prompt": "Tell me", "stream": True, **GREEDY})
    assert response.headers["content-type"].startswith("text/event-stream")
    data = events(response)
    expected = server_runtime.generate(prompt="Tell me", **GREEDY)
    pieces = [json.loads(event) for event in data[:-2]]
    assert "".join(piece["response"] for piece in pieces) == expected.text
    assert all(set(piece) == {"response"} for piece in pieces) and len(pieces) > 1
    assert json.loads(data[-2]) == {"response": "", "usage": expected.usage.to_dict()}
    assert data[-1] == "[DONE]"
    assert response.text.startswith('data: {"response":')



LINE_BREAKING_TEXT = "a\u2028b\u2029c\x85d"  # str.splitlines breaks lines at each; SSE does not


@pytest.mark.parametrize("url, body, text_of", [
    (RUN, {"prompt": "Tell me"}, lambda event: event["response"]),
    ("/v1/chat/completions", {"model": "@cf/google/gemma-2b-it-lora", "messages": [{"role": "user", "content": "Hi"}]},
     lambda event: "".join(choice["delta"].get("content", "") for choice in event["choices"])),
])
def test_each_event_stays_one_line_for_line_readers(client: TestClient, monkeypatch, url, body, text_of) -> None:
    """httpx's iter_lines (httpx-sse, the cloudflare SDK) splits at U+2028, U+2029 and U+0085."""
    feed = mlx_gemma.runtime.Pieces.feed
    monkeypatch.setattr(mlx_gemma.runtime.Pieces, "feed",
                        lambda pieces, step: feed(pieces, step) + (LINE_BREAKING_TEXT if len(pieces.token_ids) == 2 else ""))
    with client.stream("POST", url, json={**body, "stream": True, **GREEDY}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    text = "".join(text_of(json.loads(line.removeprefix("data: "))) for line in lines[:-1])
    assert LINE_BREAKING_TEXT in text and "\\u2028" in "".join(lines)


BAD_BODIES = [
    ({}, 'the body needs prompt (a string) or messages (a list of {"role", "content"}), for example {"prompt": "Hello"}'),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "send either prompt or messages, not both"),
    ({"prompt": "a", "temperature": 9}, "temperature: 9 is greater than the maximum of 5"),
    ({"prompt": "a", "top_k": 0}, "top_k: 0 is less than the minimum of 1"),
    ({"prompt": ""}, "prompt: '' should be non-empty"),
    ({"messages": [{"role": "user"}]}, "messages[0]: 'content' is a required property"),
    ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty=0 is out of range: use a number greater than 0 and at most 2 (1 means off)"),
    ({"prompt": "a", "lora": 5}, "lora: 5 is not of type 'string'"),  # once, though two checks find it
    ({"prompt": "x" * 131073}, f"prompt: '{'x' * 59}... (131073 characters) is too long"),  # no echo of megabytes
    ({"prompt": "a", "seed": 1e300}, f"seed: {int(1e300)!s:.60}... (301 characters) is greater than the maximum of 9999999999"),
]


@pytest.fixture()
def still_serving(client: TestClient, server_runtime: mlx_gemma.Runtime):
    """After the test's bad request: the server still answers and the fine-tune store is unchanged."""
    create_finetune(client, "bystander")
    before = store_state(client)
    yield
    assert client.post(RUN, json={"prompt": "still there?", **GREEDY}).json() == \
        expected_run(server_runtime, prompt="still there?", **GREEDY)
    assert store_state(client) == before and before[1] == []


@pytest.mark.parametrize("body,message", BAD_BODIES)
def test_bad_bodies_get_the_error_envelope(client: TestClient, still_serving: None, body: dict, message: str) -> None:
    response = client.post(RUN, json=body)
    assert response.status_code == 400
    assert response.json() == error(5006, f"AiError: Bad input: {message}")


def test_non_json_body(client: TestClient, still_serving: None) -> None:
    response = client.post(RUN, content=b"prompt=hello", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json() == error(5006, "AiError: Bad input: the body is not valid JSON (Expecting value: line 1 "
                                          'column 1 (char 0)): send a JSON object such as {"prompt": "Hello"}')


def test_unknown_model(client: TestClient, still_serving: None, server_runtime: mlx_gemma.Runtime) -> None:
    response = client.post(f"{ACCOUNT}/run/@cf/meta/llama-3-8b-instruct", json={"prompt": "a"})
    assert response.status_code == 400
    served = f"@cf/google/gemma-2b-it-lora, {server_runtime.name}"
    assert response.json() == error(5007, f"AiError: No such model '@cf/meta/llama-3-8b-instruct': this server serves {served}")


def test_unknown_lora(client: TestClient, still_serving: None) -> None:
    response = client.post(RUN, json={"prompt": "a", "lora": "nobody"})
    assert response.status_code == 404
    assert response.json() == error(3037, "AiError: Finetune not found: no fine-tune has the id or name 'nobody' "
                                          "(list them with GET /client/v4/accounts/{account_id}/ai/finetunes)")


def test_body_over_the_limit_is_413(server_runtime: mlx_gemma.Runtime, tmp_path: Path) -> None:
    app = build_app(server_runtime, Settings(data_dir=tmp_path, max_body_bytes=1000))
    with TestClient(app) as small:
        response = small.post(RUN, json={"prompt": "x" * 2000})
    assert response.status_code == 413
    assert response.json()["errors"][0]["code"] == 3006


def test_the_server_limits_reach_adapter_validation(tiny_dir: Path, tmp_path: Path) -> None:
    runtime = mlx_gemma.load(tiny_dir, max_adapter_rank=4)
    app = build_app(runtime, Settings(data_dir=tmp_path, max_upload_bytes=400 * 1024 * 1024))
    assert runtime.registry.limits.max_file_bytes == 400 * 1024 * 1024  # the default 300 MB no longer applies
    with TestClient(app) as small:
        create_finetune(small, "rank8", files={"adapter_config.json": (ADAPTER / "adapter_config.json").read_bytes()})
        response = upload(small, "rank8", "adapter_model.safetensors", (ADAPTER / "adapter_model.safetensors").read_bytes())
    assert response.status_code == 400
    assert response.json()["errors"][0]["message"] == (  # once, though every module is over it
        "AiError: Bad input: adapter_model.safetensors for fine-tune 'rank8' refused: rank 8 is over the limit of 4: "
        "train with r <= 4 (Workers AI's limit is 32), or raise the limit (--max-adapter-rank of mlx-gemma serve, "
        "generate, fuse and finetune create; max_adapter_rank= in Python)")


def test_an_upload_over_the_limit_names_the_file_limit_and_the_flag(server_runtime: mlx_gemma.Runtime,
                                                                    tmp_path: Path) -> None:
    app = build_app(server_runtime, Settings(data_dir=tmp_path, max_upload_bytes=1024 * 1024))
    with TestClient(app) as small:
        create_finetune(small, "big", files={})
        response = upload(small, "big", "adapter_model.safetensors", b"\0" * (1024 * 1024 + 70 * 1024))
    assert response.status_code == 413
    body = response.json()["errors"][0]["message"]
    assert body.startswith("AiError: Request too large: the upload is ")
    assert body.endswith(" bytes and a fine-tune file may be at most 1048576 bytes: upload a smaller adapter "
                         "(a lower rank), or start the server with a larger --max-upload-mb")


def test_finetune_lifecycle_and_lora_by_name_and_id(client: TestClient, reference: mlx_gemma.Runtime) -> None:
    created = create_finetune(client, "sql-helper")
    assert set(created) == {"id", "name", "model", "description", "public", "created_at", "modified_at"}
    assert (created["name"], created["model"], created["public"]) == ("sql-helper", "@cf/google/gemma-2b-it-lora", False)
    expected = expected_run(reference, prompt="Hello there", lora="all7", **GREEDY)
    base = client.post(RUN, json={"prompt": "Hello there", **GREEDY}).json()
    for lora in ("sql-helper", created["id"]):
        assert client.post(RUN, json={"prompt": "Hello there", "lora": lora, **GREEDY}).json() == expected
    assert expected != base
    listed = client.get(f"{ACCOUNT}/finetunes").json()["result"]
    assert [f["id"] for f in listed] == [created["id"]]
    assert client.get(f"{ACCOUNT}/finetunes/public").json() == envelope([])
    got = client.get(f"{ACCOUNT}/finetunes/sql-helper").json()["result"]
    assert got["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert client.delete(f"{ACCOUNT}/finetunes/sql-helper").json()["result"]["id"] == created["id"]
    assert client.get(f"{ACCOUNT}/finetunes").json() == envelope([])
    assert client.post(RUN, json={"prompt": "a", "lora": "sql-helper"}).status_code == 404


def test_lora_with_messages_and_public_listing(client: TestClient, reference: mlx_gemma.Runtime) -> None:
    created = create_finetune(client, "pub-chat")
    messages = [{"role": "user", "content": "Hi"}]
    response = client.post(RUN, json={"messages": messages, "lora": "pub-chat", **GREEDY})
    assert response.json() == expected_run(reference, messages=messages, lora="all7", **GREEDY)
    assert [f["id"] for f in client.get(f"{ACCOUNT}/finetunes/public").json()["result"]] == [created["id"]]


def test_lora_with_messages_and_raw_as_in_cloudflares_example(client: TestClient, reference: mlx_gemma.Runtime) -> None:
    create_finetune(client, "doc-tune")
    messages = [{"role": "user", "content": "Hello world"}]
    response = client.post(RUN, json={"messages": messages, "raw": "true", "lora": "doc-tune", **GREEDY})
    assert response.json() == expected_run(reference, messages=messages, lora="all7", **GREEDY)


def test_public_finetunes_page_and_order_as_cloudflares_query(client: TestClient) -> None:
    for name in ("pub-c", "pub-a", "pub-b"):
        create_finetune(client, name, files={})
    listed = lambda query: [f["name"] for f in client.get(f"{ACCOUNT}/finetunes/public?{query}").json()["result"]]  # noqa: E731
    assert listed("orderBy=name") == ["pub-a", "pub-b", "pub-c"]
    assert listed("orderBy=name&limit=1&offset=1") == ["pub-b"]
    assert listed("limit=2") == listed("")[:2] and listed("offset=3") == []
    for query, message in [("limit=0", "limit='0': use a whole number of at least 1"),
                           ("offset=-1", "offset='-1': use a whole number of at least 0"),
                           ("orderBy=size", "orderBy='size': order by one of id, name, model, description, "
                                            "created_at, modified_at")]:
        response = client.get(f"{ACCOUNT}/finetunes/public?{query}")
        assert response.status_code == 400 and response.json() == error(5006, f"AiError: Bad input: {message}")


def test_finetune_missing_files_is_3039(client: TestClient) -> None:
    create_finetune(client, "half", files={"adapter_config.json": (ADAPTER / "adapter_config.json").read_bytes()})
    response = client.post(RUN, json={"prompt": "a", "lora": "half"})
    assert response.status_code == 400
    assert response.json() == error(3039, "AiError: Finetune 'half' is missing adapter_model.safetensors: upload "
                                          "it with POST .../ai/finetunes/{id}/finetune-assets")


def test_reupload_serves_the_new_weights(client: TestClient, reference: mlx_gemma.Runtime) -> None:
    create_finetune(client, "swap")
    first = client.post(RUN, json={"prompt": "Hello there", "lora": "swap", **GREEDY}).json()
    second_dir = FIXTURES / "adapters" / "second_all7_r8"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert upload(client, "swap", name, (second_dir / name).read_bytes()).status_code == 200
    reference.add_adapter("second", str(second_dir))
    after = client.post(RUN, json={"prompt": "Hello there", "lora": "swap", **GREEDY}).json()
    assert after == expected_run(reference, prompt="Hello there", lora="second", **GREEDY)
    assert after != first


def store_state(client: TestClient) -> tuple:
    service = client.app.state.service
    return [f.to_dict() | {"files": f.files} for f in service.store.list()], service.store.check()


@pytest.mark.parametrize("file_name,content,fragment", [
    ("weights.bin", b"x", "file_name 'weights.bin'"),
    ("adapter_model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage", "adapter_model.safetensors"),
    ("adapter_config.json", json.dumps({"peft_type": "LORA", "use_dora": True, "r": 8}).encode(), "DoRA"),
])
def test_bad_assets_are_refused_and_the_store_is_unchanged(client: TestClient, still_serving: None, file_name: str,
                                                           content: bytes, fragment: str) -> None:
    response = upload(client, "bystander", file_name, content)
    assert response.status_code == 400
    body = response.json()
    assert body["success"] is False and body["errors"][0]["code"] == 5006
    assert fragment in body["errors"][0]["message"]


def test_duplicate_finetune_name_is_refused(client: TestClient) -> None:
    create_finetune(client, "twice", files={})
    response = client.post(f"{ACCOUNT}/finetunes", json={"model": "@cf/google/gemma-2b-it-lora", "name": "twice"})
    assert response.status_code == 409
    assert "twice" in response.json()["errors"][0]["message"]
    response = client.post(f"{ACCOUNT}/finetunes", json={"model": "@cf/meta/llama", "name": "other"})
    assert response.json()["errors"][0]["code"] == 5007


def test_full_queue_answers_429_at_once(client: TestClient, server_runtime: mlx_gemma.Runtime,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before its body is tokenized: another client's long body must not delay the 429."""
    gate = threading.Event()
    engine = server_runtime.engine
    blocker = engine.call(gate.wait)  # the engine is busy until the gate opens
    waiting = [Request([2, 10], GenerationParams(max_tokens=1, temperature=0), lambda item: None)
               for _ in range(engine.max_batch + 2)]
    try:
        for request in waiting:
            engine.submit(request)  # the free rows' requests, then max_queue=2 more: now full
        with monkeypatch.context() as patched:
            patched.setattr(server_runtime, "prepare", lambda *args, **kwargs: pytest.fail("tokenized"))
            response = client.post(RUN, json={"prompt": "a"})
            openai = client.post("/v1/completions", json={"prompt": "a"})
        assert response.status_code == 429
        assert response.json() == error(3040, "AiError: Out of capacity: 2 requests are already waiting (max_queue=2): "
                                              "retry shortly, or raise the limit (--max-queue, max_queue= in Python)")
        assert openai.status_code == 429
    finally:
        gate.set()
        blocker.result(timeout=10)
    assert client.post(RUN, json={"prompt": "a", **GREEDY}).status_code == 200


def test_the_schema_check_of_a_run_body_runs_off_the_event_loop(client: TestClient,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Checking a body of many messages takes seconds: every other client's stream would wait for it."""
    from mlx_gemma.server import workers_ai

    checked_on = []
    check = workers_ai.validate_run_body

    def recording(body: dict) -> dict:
        try:
            asyncio.get_running_loop()
            checked_on.append("the event loop")
        except RuntimeError:
            checked_on.append("a worker thread")
        return check(body)

    monkeypatch.setattr(workers_ai, "validate_run_body", recording)
    assert client.post(RUN, json={"prompt": "a", **GREEDY}).status_code == 200
    assert checked_on == ["a worker thread"]


def test_auth_token(server_runtime: mlx_gemma.Runtime, tmp_path: Path) -> None:
    app = build_app(server_runtime, Settings(data_dir=tmp_path, api_token="s3cret"))
    app.state.service.store.create("@cf/google/gemma-2b-it-lora", "guarded")
    before = [f.to_dict() for f in app.state.service.store.list()]
    with TestClient(app) as authed:
        assert authed.delete(f"{ACCOUNT}/finetunes/guarded").status_code == 401
        assert authed.get("/healthz").status_code == 200
        missing = authed.post(RUN, json={"prompt": "a"})
        assert missing.status_code == 401
        assert missing.json() == error(10000, "Authentication error: send the header Authorization: Bearer <token>")
        wrong = authed.get(f"{ACCOUNT}/finetunes", headers={"Authorization": "Bearer nope"})
        assert wrong.json() == error(10000, "Authentication error: the bearer token is not the server's --api-token")
        elsewhere = authed.get(f"{ACCOUNT}/finetunes", headers={"X-Auth-Key": "s3cret"})
        assert elsewhere.status_code == 401
        openai_style = authed.get("/v1/models")
        assert openai_style.status_code == 401 and openai_style.json()["error"]["code"] == 10000
        ok = authed.post(RUN, json={"prompt": "a", **GREEDY}, headers={"Authorization": "Bearer s3cret"})
        assert ok.json() == expected_run(server_runtime, prompt="a", **GREEDY)
    assert [f.to_dict() for f in app.state.service.store.list()] == before


def test_unknown_route_is_an_envelope(client: TestClient) -> None:
    response = client.get(f"{ACCOUNT}/nothing")
    assert response.status_code == 404
    assert response.json() == error(7000, f"GET {ACCOUNT}/nothing: Not Found")


# --- OpenAI routes ---------------------------------------------------------------------------

def test_openai_chat_completion(client: TestClient, server_runtime: mlx_gemma.Runtime) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    body = client.post("/v1/chat/completions", json={"model": "@cf/google/gemma-2b-it-lora",
                                                      "messages": messages, **GREEDY}).json()
    expected = server_runtime.generate(messages=messages, **GREEDY)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": expected.text},
                                "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == expected.usage.to_dict()


def test_openai_stream_and_mount_under_account(client: TestClient, server_runtime: mlx_gemma.Runtime) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    response = client.post(f"{ACCOUNT}/v1/chat/completions", json={
        "messages": messages, "stream": True, "stream_options": {"include_usage": True}, **GREEDY})
    data = events(response)
    chunks = [json.loads(event) for event in data[:-1]]
    expected = server_runtime.generate(messages=[{"role": "user", "content": "Hello"}], **GREEDY)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == expected.text
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == expected.usage.to_dict() and chunks[-1]["choices"] == []
    assert data[-1] == "[DONE]"


def test_openai_completion_is_raw_and_stop_strings_cut(client: TestClient, server_runtime: mlx_gemma.Runtime) -> None:
    full = server_runtime.generate(prompt="Once upon a time", raw=True, **GREEDY).text
    body = client.post("/v1/completions", json={"prompt": "Once upon a time", **GREEDY}).json()
    assert body["choices"][0]["text"] == full and body["object"] == "text_completion"
    stop = full[3:5]
    cut = client.post("/v1/completions", json={"prompt": "Once upon a time", "stop": [stop], **GREEDY}).json()
    assert cut["choices"][0]["text"] == full[:full.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    at_start = client.post("/v1/completions", json={"prompt": "Once upon a time", "stop": [full[:4]], **GREEDY}).json()
    assert at_start["choices"][0]["text"] == "" and at_start["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(("stops", "pieces", "expected"), [
    (["Human:"], ["Hum", "an:", " hi"], ["", ""]),  # the stop string arrives split, from the first piece
    (["abcd"], ["ab", "cd", "ef"], ["", ""]),
    (["abcd"], ["x", "yab", "cz"], ["", "x", "ya", "bcz"]),  # the held tail never became a stop: flushed
    (["ab", "long stop"], ["0123456789a", "b"], ["012", "3456789"]),
])
def test_stop_watcher_holds_only_what_could_begin_a_stop(stops: list[str], pieces: list[str],
                                                         expected: list[str]) -> None:
    watcher = StopWatcher(stops)
    out = []
    for piece in pieces:
        out.append(watcher.feed(piece))
        if watcher.stopped:
            break
    if not watcher.stopped:
        out.append(watcher.flush())
    assert out == expected


def test_openai_models_and_finetune_by_model(client: TestClient, reference: mlx_gemma.Runtime) -> None:
    create_finetune(client, "oa-tune")
    ids = [row["id"] for row in client.get("/v1/models").json()["data"]]
    assert ids == ["@cf/google/gemma-2b-it-lora", client.app.state.service.runtime.name, "oa-tune"]
    messages = [{"role": "user", "content": "Hello"}]
    body = client.post("/v1/chat/completions", json={"model": "oa-tune", "messages": messages, **GREEDY}).json()
    assert body["choices"][0]["message"]["content"] == reference.generate(messages=messages, lora="all7", **GREEDY).text
    missing = client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": messages})
    assert missing.status_code == 404
    assert {k: missing.json()["error"][k] for k in ("type", "code", "param")} == {
        "type": "invalid_request_error", "code": "model_not_found", "param": "model"}
    bad = client.post("/v1/chat/completions", json={"messages": messages, "temperature": 9})
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]


def test_openai_models_retrieve_by_id_with_slashes(client: TestClient) -> None:
    finetune = create_finetune(client, "oa-one")
    assert client.get(f"/v1/models/{finetune['id']}").json() == {
        "id": "oa-one", "object": "model", "created": 0, "owned_by": "mlx-gemma:finetune"}
    for name in ("@cf/google/gemma-2b-it-lora", "oa-one"):
        assert client.get(f"/v1/models/{name}").json() == next(
            row for row in client.get("/v1/models").json()["data"] if row["id"] == name)
    missing = client.get(f"{ACCOUNT}/v1/models/gpt-4o")
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == (
        "The model 'gpt-4o' does not exist: GET /v1/models lists the served ones")


def test_openai_nulls_are_unset_and_developer_is_system(client: TestClient, server_runtime: mlx_gemma.Runtime) -> None:
    body = client.post("/v1/chat/completions", json={
        "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        "n": None, "best_of": None, "max_completion_tokens": None, "max_tokens": 3, "seed": None,
        "response_format": {"type": "text"}, "temperature": 0}).json()
    expected = server_runtime.generate(messages=[{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hello"}], temperature=0, max_tokens=3)
    assert body["choices"][0]["message"]["content"] == expected.text
    assert body["usage"] == expected.usage.to_dict() and body["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(("extra", "message"), [
    ({"echo": True}, "echo (returning the prompt with the completion) not supported by this server"),
    ({"suffix": "END"}, "suffix (text after the completion) not supported by this server"),
    ({"best_of": 3}, "best_of=3: only 1 is supported; send separate requests"),
    ({"logprobs": 0}, "logprobs not supported by this server"),  # 0 asks for the sampled tokens' logprobs
    ({"top_logprobs": 2}, "logprobs not supported by this server"),
    ({"stream_options": {"include_usage": True}},
     "stream_options is only for streamed answers: send \"stream\": true, or leave it out"),
    ({"response_format": {"type": "json_object"}},
     "response_format={'type': 'json_object'} not supported: only {\"type\": \"text\"}"),
])
def test_openai_fields_that_would_change_the_answer_are_refused(client: TestClient, still_serving: None,
                                                                extra: dict, message: str) -> None:
    response = client.post("/v1/completions", json={"prompt": "Hi", **extra})
    assert response.status_code == 400 and response.json()["error"]["message"] == f"AiError: Bad input: {message}"


def test_openai_unset_max_tokens_follows_openai_and_vllm(client: TestClient, server_runtime: mlx_gemma.Runtime,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    body = client.post("/v1/completions", json={"prompt": "Once upon a time", "temperature": 0}).json()
    expected = server_runtime.generate(prompt="Once upon a time", raw=True, temperature=0, max_tokens=16)
    assert body["choices"][0]["text"] == expected.text and body["usage"] == expected.usage.to_dict()
    limits = []
    prepare = server_runtime.prepare
    monkeypatch.setattr(server_runtime, "prepare", lambda **kw: limits.append(kw["max_tokens"]) or prepare(**kw))
    stream = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "stream": True, "temperature": 0})
    assert stream.status_code == 200 and limits == [server_runtime.loaded.context_length]  # the rest of the context


def test_openai_values_as_vllm_takes_them(client: TestClient, server_runtime: mlx_gemma.Runtime) -> None:
    """top_k <= 0 is no top-k, any integer seed is taken (see openai.sampler_seed), 8.0 is 8."""
    def text(**fields: object) -> str:
        response = client.post("/v1/completions", json={"prompt": "Once upon a time", "temperature": 1.5, **fields})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    def expected(**fields: object) -> str:
        return server_runtime.generate(prompt="Once upon a time", raw=True, temperature=1.5, **fields).text

    assert text(seed=0, max_tokens=12) == expected(seed=2**32 + 1, max_tokens=12)
    assert text(seed=-5, max_tokens=12) == expected(seed=2**32 + 6, max_tokens=12)
    assert text(seed=7, top_k=-1, max_tokens=12) == text(seed=7, top_k=0, max_tokens=12) == expected(seed=7, max_tokens=12)
    assert text(seed=7.0, max_tokens=5.0, top_k=3.0) == expected(seed=7, max_tokens=5, top_k=3)
    for flag in (False, True):  # a boolean is no number, as before
        for field in ("seed", "top_k"):
            refused = client.post("/v1/completions", json={"prompt": "Hi", field: flag})
            assert refused.status_code == 400 and f"{field}={flag} has type bool" in refused.json()["error"]["message"]


def test_openai_text_parts_are_joined_with_newlines(client: TestClient, server_runtime: mlx_gemma.Runtime) -> None:
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    body = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}], **GREEDY}).json()
    expected = server_runtime.generate(messages=[{"role": "user", "content": "Hi\nthere"}], **GREEDY)
    assert body["choices"][0]["message"]["content"] == expected.text and body["usage"] == expected.usage.to_dict()


def fail_after(runtime: mlx_gemma.Runtime, monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """The runtime's next request ends with RuntimeError after `steps` tokens, as when its engine stops."""
    submit = runtime.submit

    def submit_then_fail(ids, params, lora, emit, **options):
        seen, requests = [], []

        def emit_or_fail(item):
            seen.append(item)
            if len(seen) == steps + 1:
                requests[0].cancel()
                emit(RuntimeError("the engine stopped"))
            elif len(seen) <= steps:
                emit(item)
        requests.append(submit(ids, params, lora, emit_or_fail, **options))
        return requests[0]
    monkeypatch.setattr(runtime, "submit", submit_then_fail)


@pytest.mark.parametrize("path", ["/v1/chat/completions", RUN])
def test_a_stream_that_fails_part_way_ends_with_the_error_and_done(client: TestClient, server_runtime: mlx_gemma.Runtime,
                                                                  monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    full = server_runtime.generate(messages=messages, **GREEDY).text
    fail_after(server_runtime, monkeypatch, steps=3)
    data = events(client.post(path, json={"messages": messages, "stream": True, **GREEDY}))
    message = "AiError: Internal server error: RuntimeError: the engine stopped"
    expected_error = ({"error": {"message": message, "type": "server_error", "param": None, "code": 3043}}
                      if path.startswith("/v1") else error(3043, message))
    assert [json.loads(data[-2]), data[-1]] == [expected_error, "[DONE]"]
    chunks = [json.loads(event) for event in data[:-2]]
    text = "".join(c["choices"][0]["delta"].get("content", "") if "choices" in c else c["response"] for c in chunks)
    assert text and full.startswith(text) and text != full
    assert client.get("/healthz").json()["active"] == 0


def test_a_client_gone_before_the_answer_begins_gets_499_and_its_row_leaves(server_runtime: mlx_gemma.Runtime,
                                                                           tmp_path: Path) -> None:
    app = build_app(server_runtime, Settings(data_dir=tmp_path / "data"))
    body = json.dumps({"prompt": "Count forever", "temperature": 0, "max_tokens": 100000}).encode()
    sent = asgi_post(app, RUN, [(b"content-type", b"application/json")], [body], more_body=False)
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
    assert server_runtime.engine.call(lambda: server_runtime.engine.active).result(timeout=5) == 0


def test_versions_in_use_when_replaced_or_deleted_leave_once_released(client: TestClient,
                                                                      server_runtime: mlx_gemma.Runtime) -> None:
    registry, engine = server_runtime.registry, server_runtime.engine
    finetune = create_finetune(client, "held")
    assert client.post(RUN, json={"prompt": "Hi", "lora": "held", **GREEDY}).status_code == 200
    [first] = [name for name in registry.names() if finetune["id"] in name]
    engine.run(lambda: registry.acquire(first))  # a request still decoding with the first version
    second_dir = FIXTURES / "adapters" / "second_all7_r8"
    assert upload(client, "held", "adapter_model.safetensors",
                  (second_dir / "adapter_model.safetensors").read_bytes()).status_code == 200
    assert client.post(RUN, json={"prompt": "Hi", "lora": "held", **GREEDY}).status_code == 200
    [second] = [name for name in registry.names() if finetune["id"] in name]
    assert second != first and first in [row["name"] for row in registry.describe()]  # still loaded, in use
    engine.run(lambda: registry.acquire(second))
    assert client.delete(f"{ACCOUNT}/finetunes/held").status_code == 200
    assert [name for name in registry.names() if finetune["id"] in name] == []
    engine.run(lambda: registry.release(first))
    engine.run(lambda: registry.release(second))
    assert [row["name"] for row in registry.describe() if finetune["id"] in row["name"]] == []


def test_a_finetune_deleted_meanwhile_is_404_under_the_name_the_client_sent(client: TestClient, monkeypatch) -> None:
    create_finetune(client, "twice")
    service = client.app.state.service
    row = service.store.get("twice")
    service.store.delete(row.id)  # a concurrent DELETE got there first
    monkeypatch.setattr(service, "find_finetune", lambda value: row)  # this one found the row before that
    for response in (client.delete(f"{ACCOUNT}/finetunes/twice"), upload(client, "twice", "adapter_config.json", b"{}")):
        assert response.status_code == 404
        assert response.json() == error(3037, finetune_not_found("twice").message)


def test_a_finetune_may_not_take_the_name_of_a_static_adapter(tiny_dir: Path, tmp_path: Path) -> None:
    runtime = mlx_gemma.load(tiny_dir, adapters={"sql": str(ADAPTER)})
    with TestClient(build_app(runtime, Settings(data_dir=tmp_path / "data"))) as http:
        response = http.post(f"{ACCOUNT}/finetunes", json={"model": "@cf/google/gemma-2b-it-lora", "name": "sql"})
    assert response.status_code == 409
    assert response.json() == error(5006, "AiError: Bad input: 'sql' is the name of an adapter this server loaded at "
                                          "start (--adapter or --fuse), which lora='sql' serves: pick another name")
    runtime.close()


def test_a_request_that_read_the_row_before_a_reupload_gets_the_newer_version(client: TestClient,
                                                                               server_runtime: mlx_gemma.Runtime) -> None:
    service = client.app.state.service
    create_finetune(client, "racing")
    old_row = service.store.get("racing")
    second_dir = FIXTURES / "adapters" / "second_all7_r8"
    assert upload(client, "racing", "adapter_model.safetensors",
                  (second_dir / "adapter_model.safetensors").read_bytes()).status_code == 200
    newer = asyncio.run(service.resolve_lora("racing"))
    older = f"finetune:{old_row.id}:{old_row.modified_at}"
    assert server_runtime.engine.run(lambda: service._make_resident(older, old_row)) == newer
    assert [name for name in server_runtime.registry.names() if old_row.id in name] == [newer]


def test_serving_raises_when_uvicorn_cannot_start_instead_of_waiting_forever() -> None:
    from mlx_gemma.server.background import serving
    with pytest.raises(RuntimeError, match="the server did not start: uvicorn stopped before serving"):
        with serving("no_such_module_anywhere:app"):
            pass
