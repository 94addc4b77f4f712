"""Fine-tune store faults: SIGKILL mid-upload and mid-burst, a full disk, same-name races.

After each fault the server restarts on the same data directory and the store must be
consistent: the SQLite integrity check passes, every row has its directory holding only
asset files, tmp/ is empty (`audit_store`, which repairs nothing), every complete fine-tune
loads as an adapter and serves exactly its weights, and `FinetuneStore.check()` is empty.

The full disk is a size-limited tmpfs when this process may mount one (root with
CAP_SYS_ADMIN): the kernel's own ENOSPC, from file writes and from SQLite alike. Otherwise the
fault is injected at os.fsync, the call that makes each uploaded file durable: it fails with
ENOSPC once the files under the directory pass the same size, as a quota would.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import mlx_gemma
from mlx_gemma.lora.adapters import BaseInfo, read_adapter
from mlx_gemma.lora.store import FinetuneStore
from mlx_gemma.server.app import build_app
from mlx_gemma.server.service import Settings

from conftest import FIXTURES

from .processes import ServerProcess, audit_store
from .support import ACCOUNT_PATH, ASSETS, MODEL, live_server, workers_ai_error
from .tally import count

ADAPTERS = {"all7": FIXTURES / "adapters" / "all7_r8", "second": FIXTURES / "adapters" / "second_all7_r8"}
GREEDY = {"prompt": "Hello there", "temperature": 0, "max_tokens": 8}
BOUNDARY = "robustnessboundary"
Pairing = tuple[str, str]  # the fixture adapters whose config and weights a fine-tune holds
Expected = dict[Pairing, str]  # the greedy reply to GREEDY for each pairing


@pytest.fixture(scope="module")
def expected_text(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Expected:
    """The greedy reply to GREEDY for each pairing of a fixture adapter's config with one's weights."""
    root = tmp_path_factory.mktemp("pairings")
    pairs = {}
    for config, weights in itertools.product(ADAPTERS, repeat=2):
        directory = root / f"{config}+{weights}"
        directory.mkdir()
        shutil.copy(ADAPTERS[config] / ASSETS[0], directory)
        shutil.copy(ADAPTERS[weights] / ASSETS[1], directory)
        pairs[(config, weights)] = str(directory)
    reference = mlx_gemma.load(tiny_dir, adapters={f"{c}+{w}": path for (c, w), path in pairs.items()})
    return {(c, w): reference.generate(lora=f"{c}+{w}", **GREEDY).text for c, w in pairs}


def asset(adapter: str, file_name: str) -> bytes:
    return (ADAPTERS[adapter] / file_name).read_bytes()


def create(http: httpx.Client, api: str, name: str) -> httpx.Response:
    return http.post(f"{api}/finetunes", json={"model": MODEL, "name": name})


def upload(http: httpx.Client, api: str, name: str, file_name: str, content: bytes) -> httpx.Response:
    return http.post(f"{api}/finetunes/{name}/finetune-assets", data={"file_name": file_name},
                     files={"file": (file_name, content)})


def add_complete(http: httpx.Client, api: str, name: str, adapter: str) -> None:
    assert create(http, api, name).status_code == 200
    for file_name in ASSETS:
        assert upload(http, api, name, file_name, asset(adapter, file_name)).status_code == 200


def served_text(http: httpx.Client, run_url: str, lora: str | None) -> str:
    response = http.post(run_url, json={**GREEDY, **({"lora": lora} if lora else {})})
    assert response.status_code == 200, response.text[:400]
    return response.json()["result"]["response"]


def check_restarted(server: ServerProcess, base: BaseInfo, expected_text: Expected) -> dict[str, Pairing | None]:
    """The store after a restart, audited, then each fine-tune served or refused as incomplete;
    returns which fixture adapters' config and weights each holds (None: incomplete)."""
    assert audit_store(server.data_dir) == []
    with httpx.Client(timeout=30) as http:
        rows = http.get(f"{server.api}/finetunes").json()["result"]
        return {row["name"]: check_finetune(http, server, row["id"], base, expected_text) for row in rows}


def check_finetune(http: httpx.Client, server: ServerProcess, finetune_id: str, base: BaseInfo,
                   expected_text: Expected) -> Pairing | None:
    directory = server.data_dir / "finetunes" / finetune_id
    files = http.get(f"{server.api}/finetunes/{finetune_id}").json()["result"]["files"]
    held = tuple(fixture_holding(directory / file_name) for file_name in files)  # whole copies, never torn
    if files != list(ASSETS):
        workers_ai_error(http.post(server.run_url, json={**GREEDY, "lora": finetune_id}), 400, 3039)
        return None
    read_adapter(directory, base)
    assert served_text(http, server.run_url, finetune_id) == expected_text[held]
    return held


def fixture_holding(file: Path) -> str:
    """Which fixture adapter this stored file is a whole copy of (for a config: the first that matches)."""
    content = file.read_bytes()
    matches = [name for name in ADAPTERS if asset(name, file.name) == content]
    assert matches, f"{file} is no copy of an uploaded file"
    return matches[0]


def final_check(server: ServerProcess) -> None:
    server.stop()
    assert audit_store(server.data_dir) == []
    assert FinetuneStore(server.data_dir).check() == []


# --- SIGKILL ------------------------------------------------------------------------------------------------------

def slow_multipart(file_name: str, content: bytes, release: threading.Event) -> Iterator[bytes]:
    """A multipart body sent in two halves, the second only once `release` is set."""
    yield (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file_name\"\r\n\r\n{file_name}\r\n"
           f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{file_name}\"\r\n"
           "Content-Type: application/octet-stream\r\n\r\n").encode()
    yield content[: len(content) // 2]
    release.wait(timeout=30)
    yield content[len(content) // 2:] + f"\r\n--{BOUNDARY}--\r\n".encode()


def quietly(send: Callable[[], object]) -> None:
    with contextlib.suppress(httpx.HTTPError):
        send()


def kill_during_slow_upload(server: ServerProcess) -> None:
    """Replace kept's weights with another adapter's, slowly; SIGKILL while half of it is in."""
    release = threading.Event()
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    body = slow_multipart(ASSETS[1], asset("second", ASSETS[1]), release)
    sender = threading.Thread(target=quietly, args=(lambda: httpx.post(
        f"{server.api}/finetunes/kept/finetune-assets", headers=headers, content=body, timeout=30),))
    sender.start()
    time.sleep(1.0)
    server.kill()
    release.set()
    sender.join(timeout=30)


def burst(api: str, worker: int, stop: threading.Event) -> None:
    """Create fine-tunes and upload both assets as fast as possible until the server dies."""
    with httpx.Client(timeout=30) as http:
        for index in range(1000):
            if stop.is_set():
                return
            name = f"burst-{worker}-{index}"
            try:
                add_complete(http, api, name, "all7" if index % 2 else "second")
            except (httpx.HTTPError, AssertionError):
                return


def kill_during_burst(server: ServerProcess, delay_s: float) -> None:
    stop = threading.Event()
    workers = [threading.Thread(target=burst, args=(server.api, i, stop)) for i in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(delay_s)
    server.kill()
    stop.set()
    for worker in workers:
        worker.join(timeout=30)


@pytest.mark.parametrize("fault", ["slow upload", "burst 0.5 s", "burst 1.5 s"])
def test_sigkill_then_restart_leaves_a_consistent_store(tiny_dir: Path, tmp_path: Path, runtime: mlx_gemma.Runtime,
                                                        expected_text: Expected, fault: str) -> None:
    data_dir = tmp_path / "data"
    with ServerProcess.start(tiny_dir, data_dir) as server, httpx.Client(timeout=30) as http:
        add_complete(http, server.api, "kept", "all7")
        assert served_text(http, server.run_url, "kept") == expected_text[("all7", "all7")]
        if fault == "slow upload":
            kill_during_slow_upload(server)
        else:
            kill_during_burst(server, float(fault.split()[1]))
    count("faults")
    with ServerProcess.start(tiny_dir, data_dir) as server:
        held = check_restarted(server, runtime.registry.base_info(), expected_text)
        assert held["kept"] == ("all7", "all7") and (fault == "slow upload") == (len(held) == 1)
        final_check(server)


# --- same-name races -----------------------------------------------------------------------------------------------

def at_once(*calls: Callable[[], httpx.Response]) -> list[httpx.Response]:
    """Run the calls in threads released together; their responses in order."""
    barrier, responses = threading.Barrier(len(calls)), [None] * len(calls)

    def run(index: int) -> None:
        barrier.wait()
        responses[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return responses


def race_creates(http: httpx.Client, api: str, name: str) -> None:
    responses = at_once(lambda: create(http, api, name), lambda: create(http, api, name))
    assert sorted(r.status_code for r in responses) == [200, 409]
    loser = next(r for r in responses if r.status_code == 409)
    assert f"a fine-tune named {name!r} already exists" in workers_ai_error(loser, 409, 5006)


def race_uploads(http: httpx.Client, server: ServerProcess, name: str, base: BaseInfo,
                 expected_text: Expected) -> None:
    """Two different weights for one fine-tune at once: both accepted, one wins whole."""
    send = [lambda adapter=adapter: upload(http, server.api, name, ASSETS[1], asset(adapter, ASSETS[1]))
            for adapter in ADAPTERS]
    assert [r.status_code for r in at_once(*send)] == [200, 200]
    finetune_id = http.get(f"{server.api}/finetunes/{name}").json()["result"]["id"]
    check_finetune(http, server, finetune_id, base, expected_text)


def test_same_name_races_then_restart(tiny_dir: Path, tmp_path: Path, runtime: mlx_gemma.Runtime,
                                      expected_text: Expected) -> None:
    data_dir = tmp_path / "data"
    with ServerProcess.start(tiny_dir, data_dir) as server, httpx.Client(timeout=60) as http:
        for round_index in range(6):
            name = f"race-{round_index}"
            race_creates(http, server.api, name)
            assert upload(http, server.api, name, ASSETS[0], asset("all7", ASSETS[0])).status_code == 200
            race_uploads(http, server, name, runtime.registry.base_info(), expected_text)
            count("faults", 2)
        server.stop()
    with ServerProcess.start(tiny_dir, data_dir) as server:
        assert set(check_restarted(server, runtime.registry.base_info(), expected_text)) == {
            f"race-{i}" for i in range(6)}
        final_check(server)


# --- a full disk ---------------------------------------------------------------------------------------------------

def mount_tmpfs(path: Path, size_kib: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                            capture_output=True)
    return result.returncode == 0


def used_bytes(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


@contextlib.contextmanager
def fsync_quota(path: Path, size_kib: int) -> Iterator[None]:
    """os.fsync fails with ENOSPC while the files under `path` hold more than `size_kib` (the store
    is the only code that fsyncs in this process during the test)."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if used_bytes(path) > size_kib * 1024:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    os.fsync = fsync
    try:
        yield
    finally:
        os.fsync = real_fsync


@contextlib.contextmanager
def small_disk(path: Path, size_kib: int) -> Iterator[str]:
    """A directory that holds about `size_kib` KiB; yields how: "tmpfs" or "fsync quota"."""
    path.mkdir(parents=True)
    if mount_tmpfs(path, size_kib):
        try:
            yield "tmpfs"
        finally:
            if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True)
        return
    with fsync_quota(path, size_kib):
        yield "fsync quota"


def fill_until_full(http: httpx.Client) -> tuple[str, str, httpx.Response]:
    """Add complete fine-tunes until a request is refused; the fine-tune, file and refusal."""
    api = ACCOUNT_PATH
    for index in range(40):
        name = f"fill-{index}"
        response = create(http, api, name)
        if response.status_code != 200:
            return name, "", response
        for file_name in ASSETS:
            response = upload(http, api, name, file_name, asset("all7", file_name))
            if response.status_code != 200:
                return name, file_name, response
    raise AssertionError("the small disk never filled up")


def test_a_full_disk_refuses_with_507_and_changes_nothing(tiny_dir: Path, tmp_path: Path,
                                                          expected_text: Expected) -> None:
    runtime = mlx_gemma.load(tiny_dir)
    quota = tmp_path / "quota"
    with small_disk(quota, 320):
        data_dir = quota / "data"
        app = build_app(runtime, Settings(data_dir=data_dir))
        with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
            name, file_name, refused = fill_until_full(http)
            count("faults")
            message = workers_ai_error(refused, 507, 3043)
            assert message.startswith("AiError: Insufficient storage: the fine-tune store's disk is full (")
            assert app.state.service.store.check() == [] and audit_store(data_dir) == []
            assert served_text(http, f"{ACCOUNT_PATH}/run/{MODEL}", "fill-0") == expected_text[("all7", "all7")]
            assert http.delete(f"{ACCOUNT_PATH}/finetunes/fill-0").status_code == 200
            retried = upload(http, ACCOUNT_PATH, name, file_name, asset("all7", file_name)) if file_name else \
                create(http, ACCOUNT_PATH, name)
            assert retried.status_code == 200, retried.text
        restarted = build_app(runtime, Settings(data_dir=data_dir))
        assert restarted.state.service.store.check() == [] and audit_store(data_dir) == []
