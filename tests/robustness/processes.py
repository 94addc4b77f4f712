"""`mlx-gemma serve` as a child process on loopback, its resident memory, and a store audit.

`ServerProcess.start(model_dir, data_dir, *flags)` runs the real command line and waits for
/healthz; `kill()` sends SIGKILL, `stop()` SIGTERM; used in a `with` block, a server still
running at its end is killed, so a failing test leaves no process behind. `audit_store(data_dir)` checks a data
directory without opening a `FinetuneStore` (opening one would repair what it finds): the
SQLite integrity check, one directory per row holding only asset files, an empty tmp/.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from mlx_gemma.lora.store import ASSET_NAMES

from .support import ACCOUNT_PATH, MODEL

START_TIMEOUT_S = 60.0
# SQLite's own companions of the database: a killed transaction may leave an empty, cold journal,
# which SQLite ignores (a hot one it rolls back on the next open).
SQLITE_OWN = {"finetunes.sqlite3-journal", "finetunes.sqlite3-wal", "finetunes.sqlite3-shm"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    url: str
    data_dir: Path

    @classmethod
    def start(cls, model_dir: Path, data_dir: Path, *flags: str) -> "ServerProcess":
        port = free_port()
        command = [sys.executable, "-m", "mlx_gemma", "serve", "--model", str(model_dir), "--port", str(port),
                   "--data-dir", str(data_dir), *flags]
        process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        server = cls(process, f"http://127.0.0.1:{port}", data_dir)
        server.wait_ready()
        return server

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.kill()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.kill()
        raise AssertionError(f"the server did not start: {self.process.stderr.read().decode()[-2000:]}")

    @property
    def api(self) -> str:
        return f"{self.url}{ACCOUNT_PATH}"

    @property
    def run_url(self) -> str:
        return f"{self.api}/run/{MODEL}"

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as a power cut or the OOM killer would leave things."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process.stderr.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process.stderr.close()


def rss_bytes(pid: int) -> int:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) * 1024


def audit_store(data_dir: Path) -> list[str]:
    """Every inconsistency in a data directory, found without repairing anything; empty if none."""
    uri = f"file:{data_dir / 'finetunes.sqlite3'}?mode=ro"
    with sqlite3.connect(uri, uri=True) as conn:
        integrity = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        ids = {row[0] for row in conn.execute("SELECT id FROM finetunes")}
    problems = [f"integrity_check: {line}" for line in integrity if line != "ok"]
    entries = {entry.name: entry for entry in (data_dir / "finetunes").iterdir()}
    problems += [f"fine-tune {i} has no directory" for i in sorted(ids - set(entries))]
    problems += [f"orphan {entries[name]}" for name in sorted(set(entries) - ids)]
    for name in sorted(ids & set(entries)):
        problems += [f"stray {path}" for path in entries[name].iterdir()
                     if path.name not in ASSET_NAMES or path.is_symlink() or not path.is_file()]
    problems += [f"left in tmp/: {path}" for path in (data_dir / "tmp").iterdir()]
    extra = {p.name for p in data_dir.iterdir()} - {"finetunes.sqlite3", "finetunes", "tmp", "owner.lock", *SQLITE_OWN}
    return problems + [f"unexpected {data_dir / name}" for name in sorted(extra)]
