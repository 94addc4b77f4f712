"""Fixtures of the robustness suite, and the counts it prints at the end of the run.

`fuzz_target` is one live loopback server (uvicorn in a thread, mlx_gemma.server.background.serving) over the tiny checkpoint with
two complete fine-tunes in its store; the fuzzing modules share it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import mlx_gemma
from mlx_gemma.lora.store import FinetuneStore
from mlx_gemma.server.app import build_app
from mlx_gemma.server.service import Service, Settings

from conftest import FIXTURES
from .support import ASSETS, MODEL, Fuzzer, live_server
from .tally import summary_lines

FUZZ_FINETUNES = {"fuzz-all7": "all7_r8", "fuzz-second": "second_all7_r8"}


@dataclass
class FuzzTarget:
    url: str
    service: Service
    finetunes: list[str]  # names of complete fine-tunes

    @property
    def models(self) -> list[str]:
        """Every name the OpenAI `model` field accepts: the served names, then the fine-tunes."""
        return [*self.service.served_models(), *self.finetunes]


def add_finetune(store: FinetuneStore, name: str, adapter: str) -> None:
    store.create(MODEL, name)
    for file_name in ASSETS:
        store.add_asset(name, file_name, (FIXTURES / "adapters" / adapter / file_name).read_bytes())


@pytest.fixture(scope="session")
def fuzz_target(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    runtime = mlx_gemma.load(tiny_dir, max_queue=256)
    app = build_app(runtime, Settings(data_dir=tmp_path_factory.mktemp("fuzz-data")))
    service: Service = app.state.service
    for name, adapter in FUZZ_FINETUNES.items():
        add_finetune(service.store, name, adapter)
    with live_server(app) as url:
        yield FuzzTarget(url, service, list(FUZZ_FINETUNES))
    assert service.store.check() == []


@pytest.fixture(scope="module")
def fuzzer(fuzz_target: FuzzTarget) -> Iterator[Fuzzer]:
    client = Fuzzer(fuzz_target.url)
    yield client
    client.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_sep("-", "robustness counts")
    for line in summary_lines():
        terminalreporter.write_line(line)
