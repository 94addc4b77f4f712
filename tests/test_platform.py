"""Linux set-up on import: OpenBLAS preloaded before MLX, and its worker threads told not to spin.

Each case runs in a fresh interpreter, since preloading happens once, when mlx_gemma is first
imported. The probe reads the variable through the C library's getenv, which is where OpenBLAS
reads it when it loads.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlx_gemma import _platform

PROBE = """
import ctypes
import mlx_gemma
from mlx_gemma import _platform
getenv = ctypes.CDLL(None).getenv
getenv.restype = ctypes.c_char_p
print(_platform.blas_note())
print(getenv(b"OPENBLAS_THREAD_TIMEOUT"))
"""

needs_openblas = pytest.mark.skipif(not _platform.is_linux() or _platform._find_openblas() is None,
                                    reason="OpenBLAS is preloaded on Linux only, when installed")


def probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "MLX_GEMMA_OPENBLAS")}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@needs_openblas
def test_preloading_openblas_makes_its_idle_workers_sleep_at_once():
    note, timeout = probe()
    assert note == f"OpenBLAS preloaded from {_platform._find_openblas()}"
    assert timeout == "b'4'"


@needs_openblas
def test_a_thread_timeout_set_by_the_user_is_kept():
    note, timeout = probe(OPENBLAS_THREAD_TIMEOUT="12")
    assert note.startswith("OpenBLAS preloaded from ")
    assert timeout == "b'12'"


@needs_openblas
@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_openblas_turned_on_by_name_is_found_as_usual(value):
    note, timeout = probe(MLX_GEMMA_OPENBLAS=value)
    assert note == f"OpenBLAS preloaded from {_platform._find_openblas()}" and timeout == "b'4'"


@pytest.mark.skipif(not _platform.is_linux(), reason="OpenBLAS is preloaded on Linux only")
def test_with_openblas_turned_off_the_environment_is_left_alone():
    note, timeout = probe(MLX_GEMMA_OPENBLAS="0")
    assert note == "OpenBLAS turned off by MLX_GEMMA_OPENBLAS=0 (unset it for ~20x faster prefill)"
    assert timeout == "None"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Linux fast path")
@pytest.mark.parametrize("note, dtype, state", [
    ("OpenBLAS preloaded from X", "float32", "on"),
    ("OpenBLAS preloaded from X", "bfloat16", "off (use float32 weights)"),
    ("OpenBLAS not found", "float32", "off (install libopenblas0-pthread)"),
    ("OpenBLAS not found", "float16", "off (use float32 weights and install libopenblas0-pthread)"),
    ("OpenBLAS turned off by MLX_GEMMA_OPENBLAS=0", "float32", "off"),
])
def test_the_start_up_note_names_only_the_fixes_that_apply(monkeypatch, note, dtype, state):
    monkeypatch.setattr(_platform, "_note", note)
    assert _platform.startup_note(dtype) == f"Linux CPU fast path {state}: {dtype} weights, {note}"
