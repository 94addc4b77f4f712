"""`GET /metrics`: the exact exposition of a fresh server, what each outcome is counted as, and a
scrape that never waits on the adapter registry's lock (held while an adapter's files are read)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

import mlx_gemma
from mlx_gemma.engine import Request
from mlx_gemma.sampler import GenerationParams
from mlx_gemma.server.app import build_app
from mlx_gemma.server.service import Settings

from serving import serving

FRESH = """\
# HELP mlx_gemma_requests_total Finished requests by finish reason (stop includes stop strings)
# TYPE mlx_gemma_requests_total counter
mlx_gemma_requests_total{reason="cancelled"} 0.0
mlx_gemma_requests_total{reason="error"} 0.0
mlx_gemma_requests_total{reason="length"} 0.0
mlx_gemma_requests_total{reason="stop"} 0.0
# HELP mlx_gemma_rejected_requests_total Requests refused at once (HTTP 429), by reason
# TYPE mlx_gemma_rejected_requests_total counter
mlx_gemma_rejected_requests_total{reason="queue_full"} 0.0
# HELP mlx_gemma_prompt_tokens_total Prompt tokens of requests whose prompt was read (prefix-cache hits included)
# TYPE mlx_gemma_prompt_tokens_total counter
mlx_gemma_prompt_tokens_total 0.0
# HELP mlx_gemma_generated_tokens_total Tokens generated, including any a client did not read (it left, or a stop string ended its text)
# TYPE mlx_gemma_generated_tokens_total counter
mlx_gemma_generated_tokens_total 0.0
# HELP mlx_gemma_decode_steps_total Batched decode steps
# TYPE mlx_gemma_decode_steps_total counter
mlx_gemma_decode_steps_total 0.0
# HELP mlx_gemma_prefix_reused_tokens_total Prompt tokens served from the prefix cache
# TYPE mlx_gemma_prefix_reused_tokens_total counter
mlx_gemma_prefix_reused_tokens_total 0.0
# HELP mlx_gemma_batch_size Rows in the running batch
# TYPE mlx_gemma_batch_size gauge
mlx_gemma_batch_size 0.0
# HELP mlx_gemma_prefilling Requests whose prompt is being read
# TYPE mlx_gemma_prefilling gauge
mlx_gemma_prefilling 0.0
# HELP mlx_gemma_queue_depth Requests waiting for the engine
# TYPE mlx_gemma_queue_depth gauge
mlx_gemma_queue_depth 0.0
# HELP mlx_gemma_resident_adapters LoRA adapters resident in memory
# TYPE mlx_gemma_resident_adapters gauge
mlx_gemma_resident_adapters 0.0
# HELP mlx_gemma_time_to_first_token_seconds From submission to the first generated token
# TYPE mlx_gemma_time_to_first_token_seconds histogram
""" + "".join(f'mlx_gemma_time_to_first_token_seconds_bucket{{le="{bound}"}} 0.0\n' for bound in (
    "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "30.0", "+Inf")) + """\
mlx_gemma_time_to_first_token_seconds_count 0.0
mlx_gemma_time_to_first_token_seconds_sum 0.0
"""


@pytest.fixture()
def fresh(tiny_dir: Path, tmp_path: Path) -> Iterator[tuple[mlx_gemma.Runtime, TestClient]]:
    runtime = mlx_gemma.load(tiny_dir, max_queue=1)
    with TestClient(build_app(runtime, Settings(data_dir=tmp_path / "data")), raise_server_exceptions=False) as client:
        yield runtime, client
    runtime.close()


def samples(client: TestClient) -> dict[tuple[str, tuple], float]:
    text = client.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_fresh_server_exposes_every_series_at_zero_in_text_format_0_0_4(fresh) -> None:
    _, client = fresh
    response = client.get("/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert response.text == FRESH


def test_a_completion_ended_by_a_stop_string_counts_as_stop(fresh) -> None:
    runtime, client = fresh
    body = {"prompt": "Hello there", "max_tokens": 24, "temperature": 0}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = "ok"
    assert text.index(stop) > 10 and not text.endswith(stop)  # the tiny model says "ok" part way
    stopped = client.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
    assert (stopped["text"], stopped["finish_reason"]) == (text[:text.index(stop)], "stop")
    deadline = time.monotonic() + 30
    while runtime.engine.active:  # the answer is sent first; the row leaves at the engine's next step
        assert time.monotonic() < deadline
        time.sleep(0.005)
    counted = samples(client)
    assert counted[("mlx_gemma_requests_total", (("reason", "stop"),))] == 1
    assert counted[("mlx_gemma_requests_total", (("reason", "length"),))] == 1
    assert counted[("mlx_gemma_requests_total", (("reason", "cancelled"),))] == 0


def test_a_request_refused_because_the_queue_is_full_is_counted(fresh) -> None:
    runtime, client = fresh
    engine = runtime.engine
    gate = threading.Event()
    held = engine.call(gate.wait)  # the engine is busy: requests stay queued
    try:
        for _ in range(engine.max_batch):  # the free rows' requests, then max_queue=1 more
            engine.submit(Request([2, 10], GenerationParams(max_tokens=1, temperature=0), lambda item: None))
        waiting = threading.Thread(target=client.post, args=("/v1/completions",),
                                   kwargs={"json": {"prompt": "a", "max_tokens": 1}})
        waiting.start()
        while engine.waiting < engine.max_batch + 1:
            threading.Event().wait(0.005)
        refused = client.post("/v1/completions", json={"prompt": "b", "max_tokens": 1})
        assert refused.status_code == 429
    finally:
        gate.set()
        held.result(timeout=30)
    waiting.join(timeout=30)
    counted = samples(client)
    assert counted[("mlx_gemma_rejected_requests_total", (("reason", "queue_full"),))] == 1
    assert counted[("mlx_gemma_requests_total", (("reason", "length"),))] == engine.max_batch + 1


def test_a_stop_string_in_the_last_token_counts_as_stop(fresh) -> None:
    """The engine counts a finish before the reader sees the last token; when that token's text holds a
    stop string, the count says "stop", as the client is told, and no counter ever goes down."""
    runtime, client = fresh
    body = {"prompt": "Hello there", "temperature": 0}
    stop, n = "ok", 1
    while stop not in client.post("/v1/completions", json={**body, "max_tokens": n}).json()["choices"][0]["text"]:
        n += 1  # greedy: each answer is the one before and one more token
        assert n <= 24
    before = samples(client)
    for stream in (False, True):
        with client.stream("POST", "/v1/completions", json={**body, "max_tokens": n, "stop": [stop],
                                                            "stream": stream}) as response:
            text = response.read().decode()
        assert '"finish_reason":"stop"' in text.replace(" ", "")
    assert client.post("/v1/completions", json={**body, "max_tokens": n, "stop": ["zzz"]}).json()[
        "choices"][0]["finish_reason"] == "length"
    after = samples(client)
    assert {reason: after[("mlx_gemma_requests_total", (("reason", reason),))]
            - before[("mlx_gemma_requests_total", (("reason", reason),))] for reason in ("stop", "length")} \
        == {"stop": 2, "length": 1}


def test_a_scrape_does_not_wait_for_an_adapter_being_loaded(tiny_dir: Path, tmp_path: Path) -> None:
    runtime = mlx_gemma.load(tiny_dir)
    app = build_app(runtime, Settings(data_dir=tmp_path / "data"))
    with serving(app) as url:
        with runtime.registry._lock:  # as `acquire` holds it while it reads an adapter's files
            scraped = httpx.get(f"{url}/metrics", timeout=10)
            health = httpx.get(f"{url}/healthz", timeout=10)
    assert scraped.status_code == 200 and "mlx_gemma_resident_adapters 0.0" in scraped.text
    assert health.status_code == 200
    runtime.close()
