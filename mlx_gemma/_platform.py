"""Platform set-up that must run before `mlx` is first imported.

On Linux, MLX's CPU wheel links a slow reference BLAS. When OpenBLAS is installed (Debian:
`libopenblas0-pthread`), loading it first with RTLD_GLOBAL makes MLX's matrix products use it:
float32 prefill is ~20x and decode ~2.5x faster. Set MLX_GEMMA_OPENBLAS=0 to skip it, or to a
library path to choose one. `blas_note()` says what happened, for start-up logs.

OpenBLAS's worker threads spin for about 2^28 cycles after each product before they sleep.
Decoding runs hundreds of small products a second, so they never sleep, and on a machine with
few cores they take CPU time from MLX's compute thread and the server's threads (on 2 cores,
about 40% of the process's time went to the kernel, yielding). Preloading sets
OPENBLAS_THREAD_TIMEOUT=4 (2^4 cycles: sleep at once) unless the environment already sets it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
_note = "not Linux: MLX uses its own backend"
SPIN_CYCLES_LOG2 = "4"  # OpenBLAS's smallest thread timeout: idle workers sleep at once


def _find_openblas() -> str | None:
    choice = os.environ.get("MLX_GEMMA_OPENBLAS", "")
    if choice and choice.lower() not in ("1", "true", "yes", "on"):  # those mean: find it as usual
        return choice
    found = [p for p in _CANDIDATES if os.path.exists(p)]
    return found[0] if found else ctypes.util.find_library("openblas")


def preload_openblas() -> None:
    """Load OpenBLAS globally if on Linux, present, not disabled, and mlx not yet imported."""
    global _note
    if not sys.platform.startswith("linux"):
        return
    if "mlx.core" in sys.modules:
        _note = "mlx was imported before mlx_gemma: OpenBLAS not preloaded"
        return
    if os.environ.get("MLX_GEMMA_OPENBLAS") == "0":
        _note = "OpenBLAS turned off by MLX_GEMMA_OPENBLAS=0 (unset it for ~20x faster prefill)"
        return
    path = _find_openblas()
    if path is None:
        _note = "OpenBLAS not found (apt-get install libopenblas0-pthread for ~20x faster prefill)"
        return
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", SPIN_CYCLES_LOG2)  # read once, when the library loads
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        _note = f"OpenBLAS preloaded from {path}"
    except OSError as exc:
        _note = f"OpenBLAS at {path} failed to load: {exc}"


def blas_note() -> str:
    return _note


def startup_note(dtype: str) -> str:
    """One line for start-up logs: the platform, the BLAS and whether the Linux fast path is on."""
    if not is_linux():
        return f"{sys.platform}: MLX's own backend, {dtype} weights"
    blas = _note.startswith("OpenBLAS preloaded")
    fixes = ([] if dtype == "float32" else ["use float32 weights"]) + \
        ([] if blas or _note.startswith("OpenBLAS turned off") else ["install libopenblas0-pthread"])
    state = "on" if dtype == "float32" and blas else "off" + (f" ({' and '.join(fixes)})" if fixes else "")
    return f"Linux CPU fast path {state}: {dtype} weights, {_note}"


def is_linux() -> bool:
    return sys.platform.startswith("linux")
