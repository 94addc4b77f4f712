"""Continuous batching: concurrent requests with different adapters share forward passes and
each gets exactly the tokens it would get alone; cancelled rows leave at once; no leaks."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest

import mlx_gemma
from mlx_gemma.engine import QueueFullError, Request, StepOutput
from mlx_gemma.server.app import build_app
from mlx_gemma.server.service import Settings

from conftest import FIXTURES
from serving import serving

ADAPTERS = {name: str(FIXTURES / "adapters" / name)
            for name in ("all7_r8", "second_all7_r8", "regex_subset", "layers_subset")}
LORAS = [None, *ADAPTERS]


def mixed_requests(n: int = 16) -> list[dict]:
    """Greedy and seeded-sampling requests of different lengths spread over the base and 4 adapters."""
    return [dict(prompt=f"Request {i}: tell me something " * (1 + i % 3), lora=LORAS[i % 5],
                 max_tokens=6 + i % 7, temperature=0 if i % 2 else 0.8, seed=100 + i,
                 top_k=None if i % 2 else 30) for i in range(n)]


@pytest.fixture(scope="module")
def batch_rt(tiny_dir: Path) -> mlx_gemma.Runtime:
    return mlx_gemma.load(tiny_dir, adapters=ADAPTERS, max_batch=8)


def test_generate_many_equals_each_request_alone(batch_rt: mlx_gemma.Runtime) -> None:
    requests = mixed_requests()
    alone = [batch_rt.generate(**request) for request in requests]
    steps_before = batch_rt.engine.stats.steps
    together = batch_rt.generate_many(requests)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]
    assert batch_rt.engine.stats.peak_batch == 8
    assert batch_rt.engine.stats.steps - steps_before < sum(len(r.token_ids) for r in alone) / 3


def test_more_adapters_than_resident_slots_take_turns(tiny_dir: Path) -> None:
    """Four adapters, two slots: requests whose adapter has no free slot wait for one, in order."""
    runtime = mlx_gemma.load(tiny_dir, adapters=ADAPTERS, max_resident_adapters=2, max_batch=8)
    requests = [dict(prompt=f"Turn {i} of the story", lora=lora, max_tokens=12, temperature=0)
                for i, lora in enumerate([*ADAPTERS, *ADAPTERS])]
    alone = [runtime.generate(**request) for request in requests]
    together = runtime.generate_many(requests)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert runtime.engine.stats.requests["error"] == 0
    assert runtime.engine.stats.peak_batch == 2  # never more adapters at once than slots
    assert sum(a["resident"] for a in runtime.adapters()) == 2
    runtime.close()


def test_generate_many_names_a_bad_request(batch_rt: mlx_gemma.Runtime) -> None:
    with pytest.raises(ValueError, match=r"requests\[1\]: temperature=9 is out of range"):
        batch_rt.generate_many([{"prompt": "a"}, {"prompt": "b", "temperature": 9}])


def test_an_error_while_a_request_of_generate_many_runs_names_its_index(batch_rt: mlx_gemma.Runtime,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An adapter removed between the call's checks and its request's start."""
    acquire = batch_rt.registry.acquire
    gone = next(iter(ADAPTERS))
    monkeypatch.setattr(batch_rt.registry, "acquire", lambda name: acquire(name) if name != gone else {}[name])
    with pytest.raises(ValueError, match=f"lora='{gone}': the adapter was removed before the request started") as err:
        batch_rt.generate_many([{"prompt": "a", "max_tokens": 3}, {"prompt": "b", "lora": gone, "max_tokens": 3}])
    assert err.value.__notes__ == ["raised by requests[1] of generate_many"]


@pytest.fixture(scope="module")
def live_batch(batch_rt: mlx_gemma.Runtime, tmp_path_factory: pytest.TempPathFactory):
    app = build_app(batch_rt, Settings(data_dir=tmp_path_factory.mktemp("batch-data")))
    with serving(app) as url:
        yield f"{url}/client/v4/accounts/acc/ai/run/@cf/google/gemma-2b-it-lora"


def stream_events(url: str, body: dict, stop_after: int | None = None) -> list[dict]:
    events = []
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
            if stop_after is not None and len(events) == stop_after:
                break
    return events


def test_concurrent_http_clients_get_their_solo_text(live_batch: str, batch_rt: mlx_gemma.Runtime) -> None:
    requests = mixed_requests()
    alone = [batch_rt.generate(**request).text for request in requests]
    texts: list[str | None] = [None] * len(requests)

    def client(i: int) -> None:
        body = {k: v for k, v in requests[i].items() if v is not None}
        if i % 4 == 0:
            events = stream_events(live_batch, body)
            texts[i] = "".join(e["response"] for e in events)
        else:
            texts[i] = httpx.post(live_batch, json=body, timeout=60).json()["result"]["response"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert texts == alone


def test_a_disconnect_leaves_the_batch_and_others_go_on(live_batch: str, batch_rt: mlx_gemma.Runtime) -> None:
    engine = batch_rt.engine
    others = [dict(prompt=f"Other {i}", lora=LORAS[i], temperature=0, max_tokens=400) for i in range(3)]
    alone = [batch_rt.generate(**request).text for request in others]
    results: list[str | None] = [None] * 3

    def other(i: int) -> None:
        body = {k: v for k, v in others[i].items() if v is not None}
        results[i] = "".join(e["response"] for e in stream_events(live_batch, body))

    threads = [threading.Thread(target=other, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    leaver = stream_events(live_batch, {"prompt": "Leaving early", "temperature": 0, "max_tokens": 5000}, stop_after=3)
    assert len(leaver) == 3
    deadline = time.monotonic() + 2
    while engine.active > 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.active <= 3, "the disconnected row is still decoding"
    for thread in threads:
        thread.join(timeout=120)
    assert results == alone
    assert engine.stats.requests["cancelled"] >= 1


def test_metrics_expose_the_batch(live_batch: str) -> None:
    text = httpx.get(live_batch.split("/client")[0] + "/metrics").text
    for name in ("mlx_gemma_requests_total", "mlx_gemma_generated_tokens_total", "mlx_gemma_batch_size",
                 "mlx_gemma_queue_depth", "mlx_gemma_time_to_first_token_seconds_bucket"):
        assert name in text
    generated = next(line for line in text.splitlines() if line.startswith("mlx_gemma_generated_tokens_total"))
    assert float(generated.split()[-1]) > 100


def rss_bytes(pid: int) -> int:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc")
def test_a_thousand_requests_leak_nothing(tiny_dir: Path, tmp_path: Path) -> None:
    from test_server_live import start_server

    process, url = start_server(tiny_dir, tmp_path / "data")
    run = f"{url}/client/v4/accounts/acc/ai/run/@cf/google/gemma-2b-it-lora"
    try:
        with httpx.Client(timeout=30) as http:
            for i in range(1000):
                body = {"prompt": f"Request number {i}", "max_tokens": 8, "temperature": 0.7, "seed": i + 1}
                assert http.post(run, json=body).status_code == 200
                if i == 49:
                    baseline = rss_bytes(process.pid)
            final = rss_bytes(process.pid)
    finally:
        process.kill()
        process.wait(timeout=10)
    assert abs(final - baseline) <= 0.05 * baseline, f"resident memory went from {baseline} to {final} bytes"


def test_a_long_prompt_is_read_in_chunks_between_decode_steps(batch_rt: mlx_gemma.Runtime) -> None:
    from mlx_gemma.engine import PREFILL_CHUNK

    long_prompt = "x" * (2 * PREFILL_CHUNK + 100)  # byte-level tiny tokenizer: about three chunks
    alone = batch_rt.generate(prompt=long_prompt, raw=True, temperature=0, max_tokens=4)
    batch_rt.engine.run(batch_rt.engine.prefixes.clear)  # the prompt is read again, not reused from `alone`
    running = batch_rt.stream(prompt="Keep talking", temperature=0, max_tokens=300)
    next(running)
    steps_at_submit = batch_rt.engine.stats.steps
    reading = batch_rt.stream(prompt=long_prompt, raw=True, temperature=0, max_tokens=4)
    first = next(reading)
    assert batch_rt.engine.stats.steps - steps_at_submit >= 2, "running rows waited for the whole prefill"
    assert first + "".join(reading) == alone.text
    running.close()


def test_a_repeated_prefix_reuses_its_cache_and_changes_nothing(tiny_dir: Path) -> None:
    from mlx_gemma.engine import PrefixCache

    rt = mlx_gemma.load(tiny_dir)
    system = {"role": "system", "content": "You answer in one careful sentence, citing a source. " * 2}
    ask = lambda text: rt.generate(messages=[system, {"role": "user", "content": text}],  # noqa: E731
                                   temperature=0, max_tokens=10)
    ask("What is MLX?")
    reused = ask("And what is LoRA?")
    n_reused = rt.engine.stats.prefix_reused_tokens
    first, second = (rt.prepare(messages=[system, {"role": "user", "content": text}])[0]
                     for text in ("What is MLX?", "And what is LoRA?"))
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert n_reused == shared > 60  # the system turn and the template around it were not read again
    rt.engine.prefixes = PrefixCache()  # forget: the same request computed from scratch
    assert ask("And what is LoRA?").token_ids == reused.token_ids
    assert rt.engine.stats.prefix_reused_tokens == n_reused


def test_prefix_reuse_is_per_adapter_content(tiny_dir: Path, tmp_path: Path) -> None:
    import shutil

    rt = mlx_gemma.load(tiny_dir)
    prompt = "A prompt long enough to be worth keeping around for later."
    rt.generate(prompt=prompt, temperature=0, max_tokens=2)
    adapter = tmp_path / "a"
    shutil.copytree(ADAPTERS["all7_r8"], adapter)
    rt.add_adapter("a", str(adapter))
    rt.generate(prompt=prompt, lora="a", temperature=0, max_tokens=2)
    assert rt.engine.stats.prefix_reused_tokens == 0  # the base's cache is not the adapter's
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(Path(ADAPTERS["second_all7_r8"]) / name, adapter / name)
    rt.add_adapter("a", str(adapter))  # same name, new weights
    fresh = rt.generate(prompt=prompt, lora="a", temperature=0, max_tokens=6)
    assert rt.engine.stats.prefix_reused_tokens == 0
    reference = mlx_gemma.load(tiny_dir, adapters={"b": ADAPTERS["second_all7_r8"]})
    assert fresh.token_ids == reference.generate(prompt=prompt, lora="b", temperature=0, max_tokens=6).token_ids


def test_a_row_joins_after_a_long_row_has_left(batch_rt: mlx_gemma.Runtime) -> None:
    long_prompt = "x" * 600  # byte-level tiny tokenizer: the batch's cache grows past one 256-position block
    short = dict(prompt="hi there", temperature=0, max_tokens=5)
    alone = batch_rt.generate(**short)
    running = batch_rt.stream(prompt="Keep talking", temperature=0, max_tokens=300)
    next(running)
    assert len(batch_rt.generate(prompt=long_prompt, raw=True, temperature=0, max_tokens=3).token_ids) == 3
    assert batch_rt.engine.run(lambda: batch_rt.engine._cache[0].keys.shape[2]) == 256  # shrunk back on leaving
    assert batch_rt.generate(**short).token_ids == alone.token_ids
    running.close()


def test_an_error_after_prefill_ends_that_request_and_the_engine_goes_on(tiny_dir: Path) -> None:
    rt = mlx_gemma.load(tiny_dir, adapters={"a": ADAPTERS["all7_r8"]})
    request = dict(prompt="A prompt long enough to be kept for reuse.", lora="a", temperature=0, max_tokens=4)
    expected = rt.generate(**request)

    def broken_store(*args: object) -> None:
        raise RuntimeError("store failed")

    rt.engine.prefixes.store = broken_store  # runs after the last chunk of the prompt
    with pytest.raises(RuntimeError, match="store failed"):
        rt.generate(**request)
    del rt.engine.prefixes.store
    assert rt.generate(**request).token_ids == expected.token_ids
    assert rt.adapters()[0]["in_use"] == 0 and rt.engine.waiting == 0


def test_an_error_in_a_batch_step_ends_the_batch_and_the_engine_goes_on(tiny_dir: Path) -> None:
    rt = mlx_gemma.load(tiny_dir)
    expected = rt.generate(prompt="Hello", temperature=0, max_tokens=5)
    running = rt.stream(prompt="Keep talking", temperature=0, max_tokens=300)
    next(running)

    def broken_launch() -> None:
        del rt.engine._launch  # once
        raise RuntimeError("step failed")

    rt.engine._launch = broken_launch
    with pytest.raises(RuntimeError, match="step failed"):
        list(running)
    assert rt.generate(prompt="Hello", temperature=0, max_tokens=5).token_ids == expected.token_ids
    assert rt.engine.active == 0


def test_fusing_forgets_the_prefixes_cached_with_the_old_weights(tiny_dir: Path) -> None:
    prompt = dict(prompt="A prompt long enough to be kept for reuse.", temperature=0, max_tokens=8)
    rt = mlx_gemma.load(tiny_dir)
    rt.generate(**prompt)
    rt.fuse_adapter("x", ADAPTERS["all7_r8"])
    fused = mlx_gemma.load(tiny_dir, adapters={"x": ADAPTERS["all7_r8"]}, fuse="x")
    assert rt.generate(**prompt).token_ids == fused.generate(**prompt).token_ids
    assert rt.engine.stats.prefix_reused_tokens == 0


def test_a_cancelled_waiting_request_gives_its_queue_place_back(tiny_dir: Path) -> None:
    rt = mlx_gemma.load(tiny_dir, max_batch=1, max_queue=2)
    running = rt.stream(prompt="Keep talking", temperature=0, max_tokens=300)
    next(running)
    waiting = [rt.stream(prompt=f"Wait {i}", temperature=0, max_tokens=3) for i in range(2)]
    for stream in waiting:
        stream.close()
    deadline = time.monotonic() + 5
    while rt.engine.waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rt.engine.waiting == 0 and rt.engine.stats.requests["cancelled"] == 2
    late = rt.stream(prompt="Late", temperature=0, max_tokens=2)  # no QueueFullError
    running.close()
    assert len(list(late)) >= 1


class CancelledWhileScanned(threading.Event):
    """A cancel that lands while the engine looks through its queue: unset at the first look, set after."""

    def __init__(self) -> None:
        super().__init__()
        self.looks = 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks > 1


def test_a_cancel_landing_while_the_queue_is_scanned_gives_its_place_back(tiny_dir: Path) -> None:
    rt = mlx_gemma.load(tiny_dir, max_batch=1, max_queue=2)
    running = rt.stream(prompt="Keep talking", temperature=0, max_tokens=300)
    next(running)  # the one row is taken: requests stay queued
    ids, params = rt.prepare(prompt="Hi", temperature=0, max_tokens=3)
    gone = Request(ids, params, lambda item: None)
    gone.cancel()  # found cancelled in the same pass
    for request in (gone, Request(ids, params, lambda item: None, cancelled=CancelledWhileScanned())):
        rt.engine.submit(request)
    deadline = time.monotonic() + 5
    while rt.engine.waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rt.engine.waiting == 0 and rt.engine.stats.requests["cancelled"] == 2
    running.close()
    rt.close()


def test_a_burst_takes_the_free_rows_before_it_counts_against_the_queue(tiny_dir: Path) -> None:
    """An idle engine with 4 rows and max_queue=1 takes 5 requests at once; the 6th is refused."""
    rt = mlx_gemma.load(tiny_dir, max_batch=4, max_queue=1)
    ids, params = rt.prepare(prompt="Hi", temperature=0, max_tokens=3)
    ended: list[StepOutput | BaseException] = []
    gate = threading.Event()
    held = rt.engine.call(gate.wait)  # nothing starts until all are submitted
    try:
        for _ in range(5):
            rt.engine.submit(Request(ids, params, ended.append))
        with pytest.raises(QueueFullError, match=r"^1 requests are already waiting \(max_queue=1\)"):
            rt.engine.submit(Request(ids, params, ended.append))
    finally:
        gate.set()
        held.result(timeout=10)
    deadline = time.monotonic() + 10
    while rt.engine.stats.requests["length"] < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rt.engine.stats.requests["length"] == 5 and rt.engine.stats.rejected["queue_full"] == 1
    rt.close()


def test_generate_many_leaves_the_queue_to_other_callers(tiny_dir: Path) -> None:
    """It submits ahead only into free rows: another caller's request is queued, not refused."""
    rt = mlx_gemma.load(tiny_dir, max_batch=2, max_queue=2)
    requests = [dict(prompt=f"Story {i}", temperature=0, max_tokens=60) for i in range(8)]
    alone = [rt.generate(**request) for request in requests]
    together: list = []
    many = threading.Thread(target=lambda: together.extend(rt.generate_many(requests)))
    many.start()
    while not rt.engine.active:
        time.sleep(0.002)
    other = rt.generate(prompt="Meanwhile", temperature=0, max_tokens=3)  # used to raise QueueFullError
    many.join(timeout=60)
    assert len(other.token_ids) == 3 and rt.engine.stats.rejected["queue_full"] == 0
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    rt.close()


def test_closing_a_stream_from_another_thread_wakes_its_reader(tiny_dir: Path) -> None:
    """The engine drops a cancelled request without a word: a reader blocked on it must still end."""
    rt = mlx_gemma.load(tiny_dir, max_batch=1)
    running = rt.stream(prompt="Keep talking", temperature=0, max_tokens=300)
    next(running)
    queued = rt.stream(prompt="Queued", temperature=0, max_tokens=5)
    read: list[list[str]] = []
    reader = threading.Thread(target=lambda: read.append(list(queued)), daemon=True)
    reader.start()
    time.sleep(0.2)  # the reader waits on the queued request
    queued.close()
    reader.join(timeout=10)
    running.close()
    assert not reader.is_alive() and read == [[]] and queued.finish_reason == "cancelled"
    rt.close()


def test_a_generation_started_on_the_engine_thread_is_refused(batch_rt: mlx_gemma.Runtime) -> None:
    """Its reader would wait for the very thread it blocks: every later request would hang."""
    started = batch_rt.engine.call(lambda: batch_rt.generate(prompt="Hi", max_tokens=2))
    with pytest.raises(RuntimeError, match="a generation cannot start on the engine thread"):
        started.result(timeout=10)
    assert len(batch_rt.generate(prompt="Hi", temperature=0, max_tokens=2).token_ids) == 2


def test_a_request_that_fails_to_start_its_prefill_fails_alone(batch_rt: mlx_gemma.Runtime,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    expected = batch_rt.generate(prompt="Keep talking", temperature=0, max_tokens=40)
    running = batch_rt.stream(prompt="Keep talking", temperature=0, max_tokens=40)
    first = next(running)
    lookup = batch_rt.engine.prefixes.lookup

    def broken_lookup(key: str, ids: list[int]) -> object:
        monkeypatch.setattr(batch_rt.engine.prefixes, "lookup", lookup)  # once
        raise KeyError("prefix cache broke")

    monkeypatch.setattr(batch_rt.engine.prefixes, "lookup", broken_lookup)
    with pytest.raises(KeyError, match="prefix cache broke"):
        batch_rt.generate(prompt="Another", lora="all7_r8", max_tokens=3)
    assert first + "".join(running) == expected.text  # the running stream went on
    assert [a["in_use"] for a in batch_rt.adapters()] == [0] * len(ADAPTERS) and batch_rt.engine.waiting == 0


def test_generate_many_fills_the_batch_past_a_short_queue(tiny_dir: Path) -> None:
    """Requests beyond the queue's room are submitted as the engine takes the waiting ones."""
    rt = mlx_gemma.load(tiny_dir, max_queue=2, max_batch=8)
    requests = [dict(prompt=f"Story {i}", temperature=0, max_tokens=40) for i in range(16)]
    alone = [rt.generate(**request) for request in requests]
    together = rt.generate_many(requests)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert rt.engine.stats.peak_batch == 8 and rt.engine.stats.rejected["queue_full"] == 0
    rt.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_adapters_batch_in_half_precision(tiny_dir: Path, dtype: str) -> None:
    """MLX's CPU gather_mm takes float32 only: half-precision rows with different adapters still batch."""
    rt = mlx_gemma.load(tiny_dir, dtype=dtype, adapters=ADAPTERS, max_batch=8)
    requests = [dict(prompt=f"Request {i}", lora=LORAS[i % 5], temperature=0, max_tokens=8) for i in range(5)]
    alone = [rt.generate(**request) for request in requests]
    together = rt.generate_many(requests)
    assert rt.engine.stats.requests["error"] == 0 and rt.engine.stats.peak_batch == 5
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    rt.close()


def test_a_closed_runtime_ends_its_requests_and_refuses_new_ones(tiny_dir: Path) -> None:
    rt = mlx_gemma.load(tiny_dir)
    running = rt.stream(prompt="Keep talking", temperature=0, max_tokens=300)
    next(running)
    rt.close()
    with pytest.raises(RuntimeError, match="closed before the request finished"):
        list(running)
    with pytest.raises(RuntimeError, match="this runtime is closed: load the model again"):
        rt.generate(prompt="Hello")
    rt.close()  # twice is harmless


SCRIPT_LEAVING_MID_STREAM = """
import sys
import mlx_gemma
rt = mlx_gemma.load(sys.argv[1])
stream = rt.stream(prompt="hello", temperature=0, max_tokens=2000)
next(stream)
stream.close()
"""


def test_a_script_that_exits_mid_stream_exits_cleanly(tiny_dir: Path) -> None:
    import subprocess
    import sys

    for _ in range(2):  # it aborted (SIGABRT) most times while MLX was still running at exit
        done = subprocess.run([sys.executable, "-c", SCRIPT_LEAVING_MID_STREAM, str(tiny_dir)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
