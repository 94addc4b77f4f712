"""64 concurrent streaming clients against `mlx-gemma serve` (a child process, the tiny model).

Each client streams request after request for a bounded time, on the Workers AI and OpenAI
routes, over the base and four fine-tunes, with its own seeded choices; about one request in
five disconnects after a few events. Afterwards every stream that was read to its end ended
with [DONE], nothing answered 5xx, the engine is idle, a greedy request answers exactly as the
Python API does, and the server's resident memory is within 5% of its level after a warm-up.

The warm-up is the same load, in rounds as long as the measured one, until a round grows
resident memory by less than 1%: the allocator's pools, the prefix cache and the resident
adapters have then reached their working size (a server that kept growing round after round
would fail here already).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

import mlx_gemma

from conftest import FIXTURES

from .processes import ServerProcess, rss_bytes
from .support import ACCOUNT_PATH, ASSETS, MODEL
from .tally import count, note

CLIENTS = 64
LOAD_S = 30.0
WARM_UP_ROUNDS = 4  # of LOAD_S each
STABLE = 0.01  # warm once a round of load grows resident memory by less than this
IDLE_TIMEOUT_S = 60.0
ADAPTERS = ("all7_r8", "second_all7_r8", "regex_subset", "layers_subset")
GREEDY = {"prompt": "Are you still there?", "temperature": 0, "max_tokens": 12}


@dataclass
class Tally:
    completed: int = 0
    disconnected: int = 0
    statuses: Counter = field(default_factory=Counter)
    unfinished: list[str] = field(default_factory=list)  # last events of streams that did not end with [DONE]


def request_for(rng: random.Random, loras: list[str | None]) -> tuple[str, dict[str, Any]]:
    """One streaming request: a Workers AI run or an OpenAI chat completion, on the base or a fine-tune."""
    lora, max_tokens = rng.choice(loras), rng.randint(4, 48)
    text = f"Client question {rng.randint(0, 10**6)}: tell me something"
    if rng.random() < 0.5:
        body = {"prompt": text, "stream": True, "max_tokens": max_tokens, "seed": rng.randint(1, 10**6)}
        return f"{ACCOUNT_PATH}/run/{MODEL}", {**body, **({"lora": lora} if lora else {})}
    body = {"messages": [{"role": "user", "content": text}], "stream": True, "max_tokens": max_tokens,
            "model": lora or MODEL, "stream_options": {"include_usage": True}}
    return "/v1/chat/completions", body


async def one_stream(http: httpx.AsyncClient, path: str, body: dict, leave_after: int | None, tally: Tally) -> None:
    async with http.stream("POST", path, json=body) as response:
        tally.statuses[response.status_code] += 1
        if response.status_code != 200:
            await response.aread()
            return
        events = []
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
            if leave_after is not None and len(events) == leave_after:
                tally.disconnected += 1
                return
    tally.completed += 1
    if not events or events[-1] != "[DONE]":
        tally.unfinished.append(" | ".join(events[-3:]))


async def client(url: str, index: int, loras: list[str | None], until: float, tally: Tally) -> None:
    rng = random.Random(index)
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while time.monotonic() < until:
            path, body = request_for(rng, loras)
            await one_stream(http, path, body, rng.randint(1, 3) if rng.random() < 0.2 else None, tally)


async def load(url: str, loras: list[str | None], seconds: float) -> Tally:
    tally, until = Tally(), time.monotonic() + seconds
    await asyncio.gather(*(client(url, i, loras, until, tally) for i in range(CLIENTS)))
    return tally


def wait_idle(server: ServerProcess) -> None:
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while time.monotonic() < deadline:
        health = httpx.get(f"{server.url}/healthz", timeout=10).json()
        if (health["active"], health["waiting"]) == (0, 0):
            return
        time.sleep(0.1)
    raise AssertionError(f"the engine is still busy {IDLE_TIMEOUT_S} s after the load: {health}")


def settled_rss(server: ServerProcess) -> int:
    """Resident memory once idle, the median of a few readings a moment apart."""
    wait_idle(server)
    readings = []
    for _ in range(5):
        time.sleep(0.2)
        readings.append(rss_bytes(server.process.pid))
    return sorted(readings)[2]


def warm_up(server: ServerProcess, loras: list[str | None]) -> tuple[int, list[Tally]]:
    """Rounds of load until resident memory settles; that level (the baseline) and the rounds' tallies."""
    tallies, levels = [], [settled_rss(server)]
    for _ in range(WARM_UP_ROUNDS):
        tallies.append(asyncio.run(load(server.url, loras, LOAD_S)))
        levels.append(settled_rss(server))
        if levels[-1] - levels[-2] < STABLE * levels[-2]:
            return levels[-1], tallies
    raise AssertionError(f"resident memory did not settle in {WARM_UP_ROUNDS} rounds of warm-up: {levels} bytes")


def add_finetunes(server: ServerProcess) -> list[str]:
    with httpx.Client(timeout=30) as http:
        for name in ADAPTERS:
            assert http.post(f"{server.api}/finetunes", json={"model": MODEL, "name": name}).status_code == 200
            for file_name in ASSETS:
                content = (FIXTURES / "adapters" / name / file_name).read_bytes()
                response = http.post(f"{server.api}/finetunes/{name}/finetune-assets", data={"file_name": file_name},
                                     files={"file": (file_name, content)})
                assert response.status_code == 200, response.text
    return list(ADAPTERS)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc")
def test_64_streaming_clients_then_the_server_is_as_before(tiny_dir: Path, tmp_path: Path) -> None:
    with ServerProcess.start(tiny_dir, tmp_path / "data", "--max-queue", "256") as server:
        loras = [None, *add_finetunes(server)]
        baseline, warm_up_tallies = warm_up(server, loras)
        tally = asyncio.run(load(server.url, loras, LOAD_S))
        final = settled_rss(server)
        reply = httpx.post(server.run_url, json=GREEDY, timeout=30).json()
        server.stop()
    count("clients", CLIENTS)
    note("server resident memory", f"{baseline / 2**20:.1f} MiB after the warm-up, {final / 2**20:.1f} MiB after "
                                   f"{LOAD_S:.0f} s of load ({(final - baseline) / baseline:+.1%})")
    for phase in (*warm_up_tallies, tally):
        count("streams", phase.completed)
        count("disconnects", phase.disconnected)
        assert set(phase.statuses) == {200} and phase.unfinished == []
        assert phase.completed > CLIENTS and phase.disconnected > 0
    assert reply["result"]["response"] == mlx_gemma.load(tiny_dir).generate(**GREEDY).text
    assert abs(final - baseline) <= 0.05 * baseline, f"resident memory went from {baseline} to {final} bytes"
