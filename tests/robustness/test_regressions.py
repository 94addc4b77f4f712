"""Failures the robustness suite found, each reproduced by the smallest request that showed it.

Before their fixes these answered 500 (or a wrong shape, or a spurious 400); each test pins the
exact answer now. The store faults and hostile files found elsewhere in this suite are pinned by
test_store_faults.py and test_hostile_files.py.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import mlx_gemma
from mlx_gemma.server.app import build_app
from mlx_gemma.server.service import Settings

from conftest import FIXTURES

from .support import ACCOUNT_PATH, ASSETS, FINETUNES_PATH, MODEL, RUN_PATH, live_server, openai_error, workers_ai_error

UPLOAD_LIMIT = 100_000  # above the fixture adapter's files
CHAT = "/v1/chat/completions"
Served = tuple[httpx.Client, mlx_gemma.Runtime]


@pytest.fixture(scope="module")
def served(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    runtime = mlx_gemma.load(tiny_dir)
    settings = Settings(data_dir=tmp_path_factory.mktemp("regressions"), max_upload_bytes=UPLOAD_LIMIT)
    with live_server(build_app(runtime, settings)) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield http, runtime


def post_raw(http: httpx.Client, path: str, raw: bytes) -> httpx.Response:
    return http.post(path, content=raw, headers={"content-type": "application/json"})


def test_deeply_nested_json_is_bad_input(served: Served) -> None:
    http, _ = served
    response = post_raw(http, RUN_PATH, b"[" * 100_000 + b"]" * 100_000)
    assert workers_ai_error(response, 400, 5006) == (
        "AiError: Bad input: the body nests arrays or objects too deeply to parse: send a flatter JSON object")


@pytest.mark.parametrize("path", [RUN_PATH, CHAT])
def test_a_lone_surrogate_escape_is_bad_input(served: Served, path: str) -> None:
    http, _ = served
    text = {"prompt": "a\\ud800b"} if path == RUN_PATH else {"messages": [{"role": "user", "content": "a\\ud800b"}]}
    raw = json.dumps(text).replace("\\\\", "\\").encode()
    error = workers_ai_error if path == RUN_PATH else openai_error
    assert error(post_raw(http, path, raw), 400, 5006) == (
        "AiError: Bad input: the string 'a\\ud800b' holds a lone UTF-16 surrogate escape (\\ud800-\\udfff): "
        "send text as valid Unicode (a surrogate pair, or the character itself)")


@pytest.mark.parametrize("options", [[1], "yes", 0])
def test_stream_options_other_than_an_object_are_bad_input(served: Served, options: object) -> None:
    http, runtime = served
    submitted = runtime.engine.stats.requests.copy()
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "stream_options": options}
    message = openai_error(http.post(CHAT, json=body), 400, 5006, "stream_options")
    assert message == (f"AiError: Bad input: stream_options={options!r}: give an object such as "
                       '{"include_usage": true}, or null')
    assert runtime.engine.stats.requests == submitted  # refused before any generation started


@pytest.mark.parametrize(("body", "name", "value", "param"), [
    ({"stream": "false"}, "stream", "false", "stream"), ({"stream": 1}, "stream", 1, "stream"),
    ({"stream": True, "stream_options": {"include_usage": "no"}}, "include_usage", "no", "stream_options")])
def test_a_boolean_given_as_another_type_is_bad_input(served: Served, body: dict, name: str, value: object,
                                                      param: str) -> None:
    http, runtime = served
    submitted = runtime.engine.stats.requests.copy()
    response = http.post(CHAT, json={"messages": [{"role": "user", "content": "Hi"}], **body})
    assert openai_error(response, 400, 5006, param) == (
        f"AiError: Bad input: {name}={value!r}: give true or false (a JSON boolean), or leave it out")
    assert runtime.engine.stats.requests == submitted  # "false" no longer starts a stream


@pytest.mark.parametrize("role", [["user"], {"a": 1}, 3])
def test_a_role_that_is_not_a_string_is_bad_input(served: Served, role: object) -> None:
    http, _ = served
    response = http.post(CHAT, json={"messages": [{"role": role, "content": "Hi"}]})
    assert openai_error(response, 400, 5006, "messages") == (
        f"AiError: Bad input: messages[0].role={role!r} is not supported: use user, assistant (or model), system or developer")


def test_integral_numbers_are_integers_as_in_json_schema(served: Served) -> None:
    http, _ = served
    as_ints = {"prompt": "Hi", "max_tokens": 5, "top_k": 3, "seed": 7, "temperature": 1}
    as_floats = {**as_ints, "max_tokens": 5.0, "top_k": 3.0, "seed": 7.0}
    answers = [http.post(RUN_PATH, json=body) for body in (as_ints, as_floats)]
    assert [a.status_code for a in answers] == [200, 200] and answers[0].json() == answers[1].json()
    message = workers_ai_error(http.post(RUN_PATH, json={**as_ints, "max_tokens": 5.5}), 400, 5006)
    assert message == "AiError: Bad input: max_tokens: 5.5 is not of type 'integer'"


def test_a_workers_ai_path_containing_ai_v1_keeps_the_workers_ai_envelope(served: Served) -> None:
    http, runtime = served
    response = http.post(f"{ACCOUNT_PATH}/run/ai/v1/x", json={"prompt": "Hi"})
    assert workers_ai_error(response, 400, 5007) == (
        f"AiError: No such model 'ai/v1/x': this server serves {MODEL}, {runtime.name}")


def test_a_malformed_multipart_form_is_bad_input(served: Served) -> None:
    http, _ = served
    assert http.post(FINETUNES_PATH, json={"model": MODEL, "name": "form"}).status_code == 200
    response = http.post(f"{FINETUNES_PATH}/form/finetune-assets", content=b"\x00garbage",
                         headers={"content-type": "multipart/form-data; boundary=zz"})
    assert workers_ai_error(response, 400, 5006) == (
        "AiError: Bad input: the multipart form cannot be read (Invalid multipart data.): send the fields "
        "file_name and file, as curl -F does")


def read_reply(sock: socket.socket) -> bytes:
    """What the server answers on a raw connection, until its JSON body ends (or 10 s pass)."""
    reply = b""
    while not reply.endswith(b"}") and (chunk := sock.recv(65536)):
        reply += chunk
    return reply


def test_an_unannounced_upload_is_refused_once_past_the_limit(served: Served) -> None:
    """Chunked, with no Content-Length: answered 413 as soon as it passes the limit; the server
    used to wait for the whole body (spooling it to a temporary file) before looking at its size."""
    http, _ = served
    assert http.post(FINETUNES_PATH, json={"model": MODEL, "name": "chunked"}).status_code == 200
    head = (f"POST {FINETUNES_PATH}/chunked/finetune-assets HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: multipart/form-data; boundary=zz\r\nTransfer-Encoding: chunked\r\n\r\n")
    part = b'--zz\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n' + b"\0" * 4 * 65536
    with socket.create_connection((http.base_url.host, http.base_url.port), timeout=10) as sock:
        sock.sendall(head.encode() + f"{len(part):x}\r\n".encode() + part + b"\r\n")  # and never the end
        reply = read_reply(sock)
    assert reply.split(b"\r\n", 1)[0] == b"HTTP/1.1 413 Request Entity Too Large"
    assert json.loads(reply.rpartition(b"\r\n\r\n")[2])["errors"][0]["code"] == 3006


def test_first_requests_to_a_finetune_at_once_all_succeed(served: Served) -> None:
    """Each request making the same fine-tune resident used to reload it under the others: a spurious 400."""
    http, runtime = served
    http.post(FINETUNES_PATH, json={"model": MODEL, "name": "popular"})
    for file_name in ASSETS:
        content = (FIXTURES / "adapters" / "all7_r8" / file_name).read_bytes()
        assert http.post(f"{FINETUNES_PATH}/popular/finetune-assets", data={"file_name": file_name},
                         files={"file": (file_name, content)}).status_code == 200
    barrier, statuses = threading.Barrier(16), []

    def ask() -> None:
        barrier.wait()
        statuses.append(http.post(RUN_PATH, json={"prompt": "Hi", "lora": "popular", "max_tokens": 2}).status_code)

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert statuses == [200] * 16
    assert [name for name in runtime.registry.names() if name.startswith("finetune:")] != []
