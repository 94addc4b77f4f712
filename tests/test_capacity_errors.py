"""Errors that reach a request from the engine thread get their own status, not a 500; a request
whose adapter has no free resident slot waits for one; and the fine-tune name `public`, which
`GET finetunes/public` shadows, is refused.

The engine is held on a gate (a call that waits) while requests queue behind it, so which
request acquires an adapter first, and what happens to the registry before a queued request
starts, is fixed by the test, not by timing. A server runtime with one resident adapter has no
slot for a second fine-tune while the first is generating.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

import mlx_gemma
from mlx_gemma.lora.store import FinetuneError, FinetuneStore
from mlx_gemma.server.app import build_app
from mlx_gemma.server.service import Settings

from conftest import FIXTURES

ADAPTERS = FIXTURES / "adapters"
ACCOUNT = "/client/v4/accounts/0123abcd/ai"
RUN = f"{ACCOUNT}/run/@cf/google/gemma-2b-it-lora"
ASSETS = ("adapter_config.json", "adapter_model.safetensors")
LONG = {"prompt": "Hello there", "temperature": 0, "max_tokens": 300}


@pytest.fixture(scope="module")
def one_slot_runtime(tiny_dir: Path) -> mlx_gemma.Runtime:
    return mlx_gemma.load(tiny_dir, max_resident_adapters=1)


@pytest.fixture()
def client(one_slot_runtime: mlx_gemma.Runtime, tmp_path: Path) -> Iterator[TestClient]:
    app = build_app(one_slot_runtime, Settings(data_dir=tmp_path / "data"))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client
    assert one_slot_runtime.engine.waiting == 0 and one_slot_runtime.engine.active == 0
    assert all(row["in_use"] == 0 for row in one_slot_runtime.adapters())


@pytest.fixture()
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


class EngineGate:
    """Holds the engine thread on a call until `open()`; `queued()` waits for the next call queued behind it."""

    def __init__(self, runtime: mlx_gemma.Runtime, monkeypatch: pytest.MonkeyPatch):
        self._call = runtime.engine.call
        self._calls = threading.Semaphore(0)
        monkeypatch.setattr(runtime.engine, "call", self._counted)
        self._opened, self._held = self._hold()

    def _hold(self) -> tuple[threading.Event, Future]:
        opened = threading.Event()
        return opened, self._call(opened.wait)

    def _counted(self, fn: Callable) -> Future:
        future = self._call(fn)
        self._calls.release()
        return future

    def queued(self) -> None:
        assert self._calls.acquire(timeout=30), "no engine call was queued"

    def hold_again(self) -> None:
        """Hold again behind every call queued so far, then open: the engine runs those calls, then waits."""
        opened, held = self._hold()
        self.open()
        self._opened, self._held = opened, held

    def open(self) -> None:
        self._opened.set()
        self._held.result(timeout=30)


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def create_finetune(client: TestClient, name: str, adapter: str = "all7_r8") -> dict:
    created = client.post(f"{ACCOUNT}/finetunes", json={"model": "@cf/google/gemma-2b-it-lora", "name": name})
    assert created.status_code == 200, created.text
    for file_name in ASSETS:
        assert upload(client, name, file_name, adapter).status_code == 200
    return created.json()["result"]


def upload(client: TestClient, name: str, file_name: str, adapter: str) -> httpx.Response:
    content = (ADAPTERS / adapter / file_name).read_bytes()
    return client.post(f"{ACCOUNT}/finetunes/{name}/finetune-assets", data={"file_name": file_name},
                       files={"file": (file_name, content)})


def error(code: int, message: str) -> dict:
    return {"result": {}, "success": False, "errors": [{"code": code, "message": message}], "messages": []}


def queue_request(pool: ThreadPoolExecutor, client: TestClient, runtime: mlx_gemma.Runtime, path: str,
                  body: dict) -> Future:
    """Send a request in a thread and wait until it is waiting in the (held) engine's queue."""
    before = runtime.engine.waiting
    future = pool.submit(client.post, path, json=body)
    wait_until(lambda: runtime.engine.waiting == before + 1 or future.done())
    assert not future.done(), future.result().text
    return future


def still_serving(client: TestClient) -> None:
    for lora in ("ta", "tb"):
        response = client.post(RUN, json={**LONG, "max_tokens": 4, "lora": lora})
        assert response.status_code == 200, response.text
        assert response.json()["result"]["usage"]["completion_tokens"] == 4


SECOND = [
    (RUN, {"lora": "tb"}),
    (RUN, {"lora": "tb", "stream": True}),
    ("/v1/chat/completions", {"model": "tb", "messages": [{"role": "user", "content": "Hi"}], "stream": True}),
]


def answer_text(response: httpx.Response) -> str:
    """The generated text of a Workers AI or OpenAI answer, whole or streamed."""
    if not response.headers["content-type"].startswith("text/event-stream"):
        return response.json()["result"]["response"]
    events = [json.loads(block.removeprefix("data: ")) for block in response.text.split("\n\n")
              if block.startswith("data: {")]
    if "choices" not in events[0]:
        return "".join(event.get("response", "") for event in events)
    return "".join(choice["delta"].get("content") or "" for event in events for choice in event["choices"])


@pytest.mark.parametrize("path,body", SECOND)
def test_a_second_adapter_past_the_resident_limit_waits_for_the_slot(
        client: TestClient, one_slot_runtime: mlx_gemma.Runtime, pool: ThreadPoolExecutor,
        monkeypatch: pytest.MonkeyPatch, path: str, body: dict) -> None:
    create_finetune(client, "ta")
    create_finetune(client, "tb", "second_all7_r8")
    still_serving(client)  # both resolved once: neither request below needs the engine before it queues
    alone = client.post(path, json={**LONG, **body})
    gate = EngineGate(one_slot_runtime, monkeypatch)
    first = queue_request(pool, client, one_slot_runtime, RUN, {**LONG, "lora": "ta"})
    second = queue_request(pool, client, one_slot_runtime, path, {**LONG, **body})
    gate.open()  # "ta" is acquired first and generates 300 tokens; "tb" waits for the one slot
    engine = one_slot_runtime.engine
    wait_until(lambda: (engine.active, engine.waiting) == (1, 1) or first.done())
    assert (engine.active, engine.waiting) == (1, 1)  # "ta" decoding, "tb" still queued behind it
    held = first.result(timeout=60)
    assert held.status_code == 200 and held.json()["result"]["usage"]["completion_tokens"] == 300
    waited = second.result(timeout=60)
    assert (waited.status_code, answer_text(waited)) == (200, answer_text(alone))
    assert len(answer_text(alone)) > 100
    wait_until(lambda: one_slot_runtime.engine.active == 0)
    still_serving(client)


def changed(finetune_id: str) -> dict:
    return error(3037, f"AiError: Finetune changed: fine-tune {finetune_id!r} was re-uploaded or deleted after "
                       "this request named it and before it started: send the request again")


@pytest.mark.parametrize("stream", [False, True])
def test_a_finetune_deleted_before_its_queued_request_starts_is_409(
        client: TestClient, one_slot_runtime: mlx_gemma.Runtime, pool: ThreadPoolExecutor,
        monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    created = create_finetune(client, "ta")
    create_finetune(client, "tb", "second_all7_r8")
    still_serving(client)
    gate = EngineGate(one_slot_runtime, monkeypatch)
    queued = queue_request(pool, client, one_slot_runtime, RUN, {**LONG, "lora": "ta", "stream": stream})
    deleted = pool.submit(client.delete, f"{ACCOUNT}/finetunes/ta")
    gate.queued()  # the delete's forget_finetune waits behind the gate, after the queued request
    gate.open()
    assert deleted.result(timeout=60).status_code == 200
    response = queued.result(timeout=60)
    assert (response.status_code, response.json()) == (409, changed(created["id"]))
    gone = client.post(RUN, json={**LONG, "lora": "ta"})
    not_found = ("AiError: Finetune not found: no fine-tune has the id or name 'ta' "
                 "(list them with GET /client/v4/accounts/{account_id}/ai/finetunes)")
    assert (gone.status_code, gone.json()) == (404, error(3037, not_found))
    served = client.post(RUN, json={**LONG, "max_tokens": 4, "lora": "tb"})
    assert served.status_code == 200 and served.json()["result"]["usage"]["completion_tokens"] == 4


def test_a_finetune_reuploaded_before_its_queued_request_starts_is_409(
        client: TestClient, one_slot_runtime: mlx_gemma.Runtime, pool: ThreadPoolExecutor,
        monkeypatch: pytest.MonkeyPatch) -> None:
    created = create_finetune(client, "ta")
    create_finetune(client, "tb", "second_all7_r8")
    still_serving(client)
    gate = EngineGate(one_slot_runtime, monkeypatch)
    queued = queue_request(pool, client, one_slot_runtime, RUN, {**LONG, "lora": "ta"})
    uploaded = pool.submit(upload, client, "ta", ASSETS[1], "second_all7_r8")
    gate.queued()  # the upload's validation, on the engine
    gate.hold_again()  # the engine runs the validation, then holds again before admitting the request
    assert uploaded.result(timeout=60).status_code == 200
    newer = pool.submit(client.post, RUN, json={**LONG, "max_tokens": 4, "lora": "ta"})
    gate.queued()  # the newer request makes the new files resident, dropping the old ones, before the queued one starts
    gate.open()
    response = queued.result(timeout=60)
    assert (response.status_code, response.json()) == (409, changed(created["id"]))
    served = newer.result(timeout=60)
    assert served.status_code == 200 and served.json()["result"]["usage"]["completion_tokens"] == 4
    still_serving(client)


def test_a_streamed_finetune_request_still_ends_with_usage_and_done(client: TestClient) -> None:
    create_finetune(client, "ta")
    response = client.post(RUN, json={**LONG, "max_tokens": 5, "lora": "ta", "stream": True})
    assert response.status_code == 200
    data = [block.removeprefix("data: ") for block in response.text.split("\n\n") if block]
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["usage"]["completion_tokens"] == 5


RESERVED = ("fine-tune name 'public' is reserved: GET .../ai/finetunes/public lists the public fine-tunes, "
            "so this one could not be fetched by name; pick another name")


def test_the_name_public_is_reserved_in_the_store(tmp_path: Path) -> None:
    store = FinetuneStore(tmp_path / "data")
    with pytest.raises(FinetuneError) as refused:
        store.create("@cf/google/gemma-2b-it-lora", "public", public=True)
    assert str(refused.value) == RESERVED
    assert store.list() == [] and store.check() == []
    assert store.create("@cf/google/gemma-2b-it-lora", "public-chat").name == "public-chat"


def test_creating_a_finetune_named_public_is_400_and_the_listing_route_is_unchanged(client: TestClient) -> None:
    response = client.post(f"{ACCOUNT}/finetunes", json={"model": "@cf/google/gemma-2b-it-lora", "name": "public",
                                                         "public": True})
    assert (response.status_code, response.json()) == (400, error(5006, f"AiError: Bad input: {RESERVED}"))
    assert client.get(f"{ACCOUNT}/finetunes").json()["result"] == []
    created = create_finetune(client, "publicity")
    assert client.get(f"{ACCOUNT}/finetunes/publicity").json()["result"]["id"] == created["id"]
    assert client.get(f"{ACCOUNT}/finetunes/public").json() == {"result": [], "success": True, "errors": [],
                                                                "messages": []}
