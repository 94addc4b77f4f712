"""The real server on a loopback port: the official SDKs, disconnects, and a SIGKILL mid-upload.

The `cloudflare` and `openai` SDKs run unchanged but for `base_url`; their answers must equal
the Python API's greedy text. The SIGKILL test runs `mlx-gemma serve` as a child process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import mlx_gemma
from mlx_gemma.lora.store import FinetuneStore
from mlx_gemma.server.app import build_app
from mlx_gemma.server.service import Settings

from conftest import FIXTURES
from serving import free_socket, serving

cloudflare = pytest.importorskip("cloudflare")
openai = pytest.importorskip("openai")

ADAPTER = FIXTURES / "adapters" / "all7_r8"
MODEL = "@cf/google/gemma-2b-it-lora"
TOKEN = "local-token"
ACCOUNT = "acc123"
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def live(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, mlx_gemma.Runtime]]:
    runtime = mlx_gemma.load(tiny_dir)
    app = build_app(runtime, Settings(data_dir=tmp_path_factory.mktemp("live-data"), api_token=TOKEN))
    with serving(app) as url:
        yield url, runtime


@pytest.fixture(scope="module")
def reference(tiny_dir: Path) -> mlx_gemma.Runtime:
    return mlx_gemma.load(tiny_dir, adapters={"all7": str(ADAPTER)})


def test_cloudflare_sdk_runs_finetunes_and_lora(live: tuple[str, mlx_gemma.Runtime], reference: mlx_gemma.Runtime) -> None:
    url, _ = live
    client = cloudflare.Cloudflare(api_token=TOKEN, base_url=f"{url}/client/v4")
    created = client.ai.finetunes.create(account_id=ACCOUNT, model=MODEL, name="sdk-tune", description="from the SDK")
    assert created.name == "sdk-tune" and created.model == MODEL and created.public is False
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(ADAPTER / name, "rb") as file:
            assert client.ai.finetunes.assets.create(created.id, account_id=ACCOUNT, file=file, file_name=name).success
    listed = client.ai.finetunes.list(account_id=ACCOUNT)
    assert [(row.id, row.name, row.description) for row in listed] == [(created.id, "sdk-tune", "from the SDK")]
    result = client.ai.run(MODEL, account_id=ACCOUNT, prompt="Hello there", lora="sdk-tune", **GREEDY)
    expected = reference.generate(prompt="Hello there", lora="all7", **GREEDY)
    assert result["response"] == expected.text
    assert result["usage"] == expected.usage.to_dict()
    plain = client.ai.run(MODEL, account_id=ACCOUNT, prompt="Hello there", **GREEDY)
    assert plain["response"] == reference.generate(prompt="Hello there", **GREEDY).text
    with client.ai.with_streaming_response.run(MODEL, account_id=ACCOUNT, prompt="Hello there", lora="sdk-tune",
                                               stream=True, **GREEDY) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert "".join(event["response"] for event in events) == expected.text
    assert events[-1]["usage"] == expected.usage.to_dict()


def test_cloudflare_sdk_errors_are_api_errors(live: tuple[str, mlx_gemma.Runtime]) -> None:
    url, _ = live
    client = cloudflare.Cloudflare(api_token=TOKEN, base_url=f"{url}/client/v4", max_retries=0)
    with pytest.raises(cloudflare.BadRequestError) as caught:
        client.ai.run(MODEL, account_id=ACCOUNT, prompt="Hi", temperature=9)
    assert [(e.code, e.message) for e in caught.value.errors] == [
        (5006, "AiError: Bad input: temperature: 9 is greater than the maximum of 5")]
    unauthenticated = cloudflare.Cloudflare(api_token="wrong", base_url=f"{url}/client/v4", max_retries=0)
    with pytest.raises(cloudflare.AuthenticationError):
        unauthenticated.ai.run(MODEL, account_id=ACCOUNT, prompt="Hi")


def test_openai_sdk_chat_streamed_and_not(live: tuple[str, mlx_gemma.Runtime], reference: mlx_gemma.Runtime) -> None:
    url, _ = live
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0)
    messages = [{"role": "user", "content": "Hello"}]
    expected = reference.generate(messages=messages, **GREEDY)
    reply = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.completion_tokens == expected.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.total_tokens == expected.usage.total_tokens
    assert [m.id for m in client.models.list()][0] == MODEL


def test_disconnect_frees_the_engine_at_once(live: tuple[str, mlx_gemma.Runtime]) -> None:
    url, runtime = live
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"prompt": "Count forever", "stream": True, "temperature": 0, "max_tokens": 100000}
    seen = []
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{url}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}", json=body, headers=headers) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                if len(seen) == 3:
                    break
        assert runtime.engine.active == 1 or runtime.engine.waiting == 0
        deadline = time.monotonic() + 5
        while runtime.engine.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runtime.engine.active == 0, "the engine still runs the abandoned request"
        after = http.post(f"{url}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}", json={"prompt": "Hi", **GREEDY},
                          headers=headers)
        assert after.json()["result"]["response"] == runtime.generate(prompt="Hi", **GREEDY).text
        health = http.get(f"{url}/healthz").json()
        assert (health["active"], health["waiting"]) == (0, 0)


@pytest.mark.parametrize("route", ["run", "chat"])
def test_a_client_that_gives_up_on_a_whole_answer_cancels_it(live: tuple[str, mlx_gemma.Runtime], route: str) -> None:
    url, runtime = live
    headers = {"Authorization": f"Bearer {TOKEN}"}
    path, body = ((f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}", {"prompt": "Count forever", "max_tokens": 100000})
                  if route == "run"  # a chat without max_tokens runs until it fills the context
                  else ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count forever"}]}))
    cancelled = runtime.engine.stats.requests["cancelled"]
    with httpx.Client(base_url=url, timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
        http.post(path, json={**body, "temperature": 0}, headers=headers)
    deadline = time.monotonic() + 5
    while runtime.engine.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (runtime.engine.active, runtime.engine.waiting) == (0, 0), "the engine still runs the abandoned request"
    assert runtime.engine.stats.requests["cancelled"] == cancelled + 1


# --- SIGKILL during an upload ---------------------------------------------------------------

def start_server(tiny_dir: Path, data_dir: Path) -> tuple[subprocess.Popen, str]:
    with free_socket() as sock:
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "mlx_gemma", "serve", "--model", str(tiny_dir), "--port",
                                str(port), "--data-dir", str(data_dir)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("the server did not start within 60 s")


def test_ctrl_c_cancels_running_requests_after_a_short_grace(tiny_dir: Path, tmp_path: Path) -> None:
    """Whole answers to chats without max_tokens run to a full context; Ctrl-C must not wait for them."""
    from mlx_gemma.cli import SHUTDOWN_GRACE_SECONDS

    process, url = start_server(tiny_dir, tmp_path / "data")
    body = {"messages": [{"role": "user", "content": "Talk"}], "temperature": 0}  # greedy: no stop token for 8k

    def chat() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)

    clients = [threading.Thread(target=chat, daemon=True) for _ in range(4)]
    try:
        for client in clients:
            client.start()
        deadline = time.monotonic() + 60
        while "mlx_gemma_batch_size 4.0" not in httpx.get(f"{url}/metrics", timeout=10).text:
            assert time.monotonic() < deadline, "the four chats did not all start"
            time.sleep(0.05)
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        process.wait(timeout=SHUTDOWN_GRACE_SECONDS + 60)
        assert time.monotonic() - interrupted < SHUTDOWN_GRACE_SECONDS + 10
    finally:
        process.kill()
        process.wait(timeout=10)


def slow_multipart(file_name: str, content: bytes, killed: threading.Event) -> Iterator[bytes]:
    boundary = "mlxgemmaboundary"
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file_name\"\r\n\r\n{file_name}\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{file_name}\"\r\n"
           "Content-Type: application/octet-stream\r\n\r\n").encode()
    yield content[: len(content) // 2]
    killed.wait(timeout=30)  # the server is killed while it waits for the rest
    yield content[len(content) // 2:] + f"\r\n--{boundary}--\r\n".encode()


def test_sigkill_during_upload_loses_nothing(tiny_dir: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "store"
    process, url = start_server(tiny_dir, data_dir)
    api = f"{url}/client/v4/accounts/{ACCOUNT}/ai"
    try:
        for name in ("kept", "interrupted"):
            assert httpx.post(f"{api}/finetunes", json={"model": MODEL, "name": name}).status_code == 200
        files = {n: (ADAPTER / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
        for file_name, content in files.items():
            httpx.post(f"{api}/finetunes/kept/finetune-assets", data={"file_name": file_name},
                       files={"file": (file_name, content)}).raise_for_status()
        httpx.post(f"{api}/finetunes/interrupted/finetune-assets", data={"file_name": "adapter_config.json"},
                   files={"file": ("adapter_config.json", files["adapter_config.json"])}).raise_for_status()
        before = httpx.post(f"{api}/run/{MODEL}", json={"prompt": "Hello", "lora": "kept", **GREEDY}).json()
        killed = threading.Event()
        headers = {"content-type": "multipart/form-data; boundary=mlxgemmaboundary"}
        upload = threading.Thread(target=lambda: _swallow(lambda: httpx.post(
            f"{api}/finetunes/interrupted/finetune-assets", headers=headers, timeout=30,
            content=slow_multipart("adapter_model.safetensors", files["adapter_model.safetensors"], killed))))
        upload.start()
        time.sleep(1.0)  # the first half is on the server
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        killed.set()
        upload.join(timeout=30)
        process, url = start_server(tiny_dir, data_dir)
        api = f"{url}/client/v4/accounts/{ACCOUNT}/ai"
        listed = {f["name"]: f for f in httpx.get(f"{api}/finetunes").json()["result"]}
        assert set(listed) == {"kept", "interrupted"}
        interrupted = httpx.get(f"{api}/finetunes/interrupted").json()["result"]
        assert interrupted["files"] == ["adapter_config.json"]
        after = httpx.post(f"{api}/run/{MODEL}", json={"prompt": "Hello", "lora": "kept", **GREEDY}).json()
        assert after == before
        assert FinetuneStore(data_dir).check() == []
    finally:
        process.kill()
        process.wait(timeout=10)


def _swallow(fn) -> None:
    try:
        fn()
    except httpx.HTTPError:
        pass  # the server died mid-request, as intended
