"""HTTP details through Starlette's TestClient: trailing slashes, 405's Allow, 401's WWW-Authenticate.

The client never follows redirects, so a 307 would show as one. A path ending in "/" is served
as the same path without it, on Workers AI, OpenAI and fine-tune routes alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

import mlx_gemma
from mlx_gemma.server.app import StripTrailingSlash, build_app
from mlx_gemma.server.service import Settings

from conftest import FIXTURES
from serving import asgi_post

ADAPTER = FIXTURES / "adapters" / "all7_r8"
ACCOUNT = "/client/v4/accounts/0123abcd/ai"
MODEL = "@cf/google/gemma-2b-it-lora"
RUN = f"{ACCOUNT}/run/{MODEL}"
GREEDY = {"temperature": 0, "max_tokens": 8}
TOKEN = "s3cret"
MISSING = "Authentication error: send the header Authorization: Bearer <token>"
WRONG = "Authentication error: the bearer token is not the server's --api-token"


@pytest.fixture(scope="module")
def server_runtime(tiny_dir: Path) -> mlx_gemma.Runtime:
    return mlx_gemma.load(tiny_dir)


def make_client(runtime: mlx_gemma.Runtime, data_dir: Path, token: str | None = None) -> TestClient:
    app = build_app(runtime, Settings(data_dir=data_dir, api_token=token))
    return TestClient(app, raise_server_exceptions=False, follow_redirects=False)


@pytest.fixture()
def client(server_runtime: mlx_gemma.Runtime, tmp_path: Path) -> Iterator[TestClient]:
    with make_client(server_runtime, tmp_path / "data") as test_client:
        yield test_client


@pytest.fixture()
def guarded(server_runtime: mlx_gemma.Runtime, tmp_path: Path) -> Iterator[TestClient]:
    with make_client(server_runtime, tmp_path / "data", TOKEN) as test_client:
        yield test_client


def envelope(result: object) -> dict:
    return {"result": result, "success": True, "errors": [], "messages": []}


def error(code: int, message: str) -> dict:
    return {"result": {}, "success": False, "errors": [{"code": code, "message": message}], "messages": []}


def openai_error(message: str, kind: str, code: int) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def without_id(body: dict) -> dict:
    return {key: value for key, value in body.items() if key not in ("id", "created")}


# --- trailing slashes ---------------------------------------------------------------------------

def test_finetune_created_uploaded_listed_and_fetched_through_slash_urls(client: TestClient) -> None:
    created = client.post(f"{ACCOUNT}/finetunes/", json={"model": MODEL, "name": "slashed", "description": "d"})
    assert created.status_code == 200
    made = created.json()["result"]
    assert {k: made[k] for k in ("name", "model", "description", "public")} == \
        {"name": "slashed", "model": MODEL, "description": "d", "public": False}
    files = ["adapter_config.json", "adapter_model.safetensors"]
    for file_name in files:
        uploaded = client.post(f"{ACCOUNT}/finetunes/slashed/finetune-assets/", data={"file_name": file_name},
                               files={"file": (file_name, (ADAPTER / file_name).read_bytes())})
        assert uploaded.status_code == 200 and uploaded.json()["success"] is True
    fetched = client.get(f"{ACCOUNT}/finetunes/slashed/")
    assert fetched.status_code == 200
    assert fetched.json() == envelope({**made, "modified_at": fetched.json()["result"]["modified_at"], "files": files})
    assert fetched.json() == client.get(f"{ACCOUNT}/finetunes/slashed").json()
    listed = client.get(f"{ACCOUNT}/finetunes/")
    assert listed.status_code == 200
    assert listed.json() == envelope([{k: v for k, v in fetched.json()["result"].items() if k != "files"}])
    assert client.get(f"{ACCOUNT}/finetunes/public/").json() == envelope([])
    assert client.delete(f"{ACCOUNT}/finetunes/slashed/").json()["result"]["id"] == made["id"]
    assert client.get(f"{ACCOUNT}/finetunes/").json() == envelope([])


def test_run_through_a_slash_url_answers_as_without(client: TestClient, server_runtime: mlx_gemma.Runtime) -> None:
    slashed = client.post(f"{RUN}/", json={"prompt": "Hello there", **GREEDY})
    plain = client.post(RUN, json={"prompt": "Hello there", **GREEDY})
    expected = server_runtime.generate(prompt="Hello there", **GREEDY)
    assert (slashed.status_code, plain.status_code) == (200, 200)
    assert slashed.json() == plain.json() == envelope({"response": expected.text, "usage": expected.usage.to_dict()})


def test_openai_routes_take_a_trailing_slash(client: TestClient, server_runtime: mlx_gemma.Runtime) -> None:
    for base in ("/v1", f"{ACCOUNT}/v1"):
        assert client.get(f"{base}/models/").json() == client.get(f"{base}/models").json()
        assert client.get(f"{base}/models/{MODEL}/").json() == client.get(f"{base}/models/{MODEL}").json()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **GREEDY}
    slashed = client.post("/v1/chat/completions/", json=body)
    assert slashed.status_code == 200
    assert without_id(slashed.json()) == without_id(client.post("/v1/chat/completions", json=body).json())
    text = server_runtime.generate(messages=body["messages"], **GREEDY).text
    assert slashed.json()["choices"][0]["message"]["content"] == text


def test_unknown_slash_paths_are_404_not_redirects(client: TestClient) -> None:
    for path, shown in ((f"{ACCOUNT}/nothing/", f"{ACCOUNT}/nothing"), ("/v1/", "/v1"), ("/v1", "/v1")):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json() == error(7000, f"GET {shown}: Not Found")
    assert client.get("/").status_code == 200
    assert client.get("/healthz/").json() == client.get("/healthz").json()


def test_strip_trailing_slash_rewrites_path_and_raw_path_only() -> None:
    seen: list[dict[str, Any]] = []

    async def inner(scope: dict, receive: Any, send: Any) -> None:
        seen.append(scope)

    middleware = StripTrailingSlash(inner)
    scopes = [{"type": "http", "path": "/a/b/", "raw_path": b"/a/b/", "query_string": b"x=1"},
              {"type": "http", "path": "/", "raw_path": b"/"}, {"type": "http", "path": "/a"},
              {"type": "http", "path": "/run/m/", "raw_path": b"/run/m%2F"}, {"type": "lifespan"}]
    for scope in scopes:
        asyncio.run(middleware(scope, None, None))
    assert seen == [{"type": "http", "path": "/a/b", "raw_path": b"/a/b", "query_string": b"x=1"},
                    {"type": "http", "path": "/", "raw_path": b"/"}, {"type": "http", "path": "/a"},
                    {"type": "http", "path": "/run/m/", "raw_path": b"/run/m%2F"},  # an encoded slash is kept
                    {"type": "lifespan"}]
    assert scopes[0]["path"] == "/a/b/"  # the caller's scope is left as it was


# --- 405 and Allow ------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path", "allow"), [
    ("GET", RUN, "POST"),
    ("GET", f"{RUN}/", "POST"),
    ("PUT", f"{ACCOUNT}/finetunes", "GET, HEAD, POST"),
    ("PUT", f"{ACCOUNT}/finetunes/x", "DELETE, GET, HEAD"),
    ("DELETE", f"{ACCOUNT}/finetunes/x/finetune-assets", "POST"),
    ("POST", "/healthz", "GET, HEAD"),
])
def test_405_carries_allow_and_the_envelope(client: TestClient, method: str, path: str, allow: str) -> None:
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert response.json() == error(7001, f"{method} {path.removesuffix('/')}: Method Not Allowed")


@pytest.mark.parametrize("path", ["/v1/chat/completions", f"{ACCOUNT}/v1/completions/"])
def test_openai_405_carries_allow_and_the_openai_error(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json() == openai_error(f"GET {path.removesuffix('/')}: Method Not Allowed",
                                           "invalid_request_error", 7001)


# --- 401 and WWW-Authenticate -------------------------------------------------------------------

@pytest.mark.parametrize(("headers", "message"), [
    ({}, MISSING),
    ({"Authorization": "Bearer nope"}, WRONG),
    ({"Authorization": f"Basic {TOKEN}"}, WRONG),
    ({"Authorization": f"bearer{TOKEN}"}, WRONG),
])
def test_401_carries_www_authenticate(guarded: TestClient, headers: dict, message: str) -> None:
    refused = guarded.get(f"{ACCOUNT}/finetunes/", headers=headers)
    assert (refused.status_code, refused.headers["www-authenticate"]) == (401, "Bearer")
    assert refused.json() == error(10000, message)
    openai_style = guarded.get("/v1/models", headers=headers)
    assert (openai_style.status_code, openai_style.headers["www-authenticate"]) == (401, "Bearer")
    assert openai_style.json() == openai_error(message, "authentication_error", 10000)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(guarded: TestClient, server_runtime: mlx_gemma.Runtime,
                                           scheme: str) -> None:
    headers = {"Authorization": f"{scheme} {TOKEN}"}
    assert guarded.get(f"{ACCOUNT}/finetunes", headers=headers).json() == envelope([])
    response = guarded.post(f"{RUN}/", json={"prompt": "a", **GREEDY}, headers=headers)
    expected = server_runtime.generate(prompt="a", **GREEDY)
    assert response.json() == envelope({"response": expected.text, "usage": expected.usage.to_dict()})
    assert "www-authenticate" not in response.headers


def test_public_paths_stay_public_with_a_slash(guarded: TestClient) -> None:
    assert guarded.get("/healthz/").status_code == 200
    assert guarded.get("/").status_code == 200
    assert guarded.get("/metrics/").status_code == 401


# --- body reading, tokenizing and listing ------------------------------------------------------

@pytest.mark.parametrize("route", ["run", "chat", "upload", "create"])
def test_a_client_gone_part_way_through_its_body_gets_499_not_a_server_error(
        server_runtime: mlx_gemma.Runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture, route: str) -> None:
    app = build_app(server_runtime, Settings(data_dir=tmp_path / "data"))
    json_type = [(b"content-type", b"application/json"), (b"content-length", b"1000")]
    form_type = [(b"content-type", b"multipart/form-data; boundary=xyz"), (b"content-length", b"1000")]
    if route == "upload":
        with TestClient(app) as http:
            assert http.post(f"{ACCOUNT}/finetunes", json={"model": MODEL, "name": "gone"}).status_code == 200
    path, headers, chunk = {
        "run": (RUN, json_type, b'{"prompt": "Hi'),
        "chat": ("/v1/chat/completions", json_type, b'{"messages": ['),
        "upload": (f"{ACCOUNT}/finetunes/gone/finetune-assets", form_type, b"--xyz\r\nContent-Disposition: form-da"),
        "create": (f"{ACCOUNT}/finetunes", json_type, b'{"model": '),
    }[route]
    with caplog.at_level("ERROR"):
        sent = asgi_post(app, path, headers, [chunk], more_body=True)
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]
    assert [record.getMessage() for record in caplog.records if record.levelname == "ERROR"] == []


def test_prompts_are_tokenized_off_the_event_loop(client: TestClient, server_runtime: mlx_gemma.Runtime,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A body of long messages takes about a second to tokenize: on the event loop, every other
    client's stream would stall for it."""
    on_loop: list[bool] = []
    prepare = server_runtime.prepare

    def recording(*args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(server_runtime, "prepare", recording)
    assert client.post(RUN, json={"prompt": "Hi", **GREEDY}).status_code == 200
    assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                     **GREEDY}).status_code == 200
    assert on_loop == [False, False]


def test_public_listing_takes_the_sdks_float_limit_and_offset(client: TestClient) -> None:
    """The cloudflare SDK types limit and offset as floats, and sends limit=5.0."""
    assert client.get(f"{ACCOUNT}/finetunes/public?limit=5.0&offset=0.0").json() == envelope([])
    refused = client.get(f"{ACCOUNT}/finetunes/public?limit=5.5")
    assert refused.json() == error(5006, "AiError: Bad input: limit='5.5': use a whole number of at least 1")
    for value in ("nan", "inf", "-1", "x"):
        assert client.get(f"{ACCOUNT}/finetunes/public?limit={value}").status_code == 400


def test_an_unknown_lora_is_named_without_echoing_it_whole(client: TestClient) -> None:
    response = client.post(RUN, json={"prompt": "Hi", "lora": "L" * 100_000, **GREEDY})
    message = response.json()["errors"][0]["message"]
    assert response.status_code == 404 and len(response.content) < 1000
    assert f"'{'L' * 59}... (100000 characters)" in message


# --- CORS ---------------------------------------------------------------------------------------

def test_allowed_origins_may_call_from_a_browser_token_or_not(server_runtime: mlx_gemma.Runtime,
                                                              tmp_path: Path) -> None:
    page = "http://localhost:3000"
    settings = Settings(data_dir=tmp_path / "data", api_token=TOKEN, allowed_origins=[page])
    with TestClient(build_app(server_runtime, settings), raise_server_exceptions=False) as http:
        preflight = http.options("/v1/chat/completions", headers={
            "Origin": page, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200  # a browser's preflight carries no token
        assert (preflight.headers["access-control-allow-origin"], preflight.headers["access-control-allow-methods"],
                preflight.headers["access-control-allow-headers"]) == (page, "GET, POST, DELETE",
                                                                        "authorization, content-type")
        answered = http.post(RUN, json={"prompt": "Hi", **GREEDY},
                             headers={"Origin": page, "Authorization": f"Bearer {TOKEN}"})
        assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == page
        refused = http.post(RUN, json={"prompt": "Hi", **GREEDY}, headers={"Origin": page})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == page  # readable
        other = http.get("/healthz", headers={"Origin": "http://elsewhere.example"})
        assert "access-control-allow-origin" not in other.headers


def test_no_cors_headers_without_allowed_origins(client: TestClient) -> None:
    preflight = client.options("/v1/chat/completions", headers={"Origin": "http://localhost:3000",
                                                                "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers
    answered = client.get("/healthz", headers={"Origin": "http://localhost:3000"})
    assert "access-control-allow-origin" not in answered.headers
