"""Shared fixtures: tiny random Gemma checkpoints written by scripts/make_tiny_model.py.

Nothing here downloads: the checkpoints are generated (deterministically, seed 0) into a
temporary directory once per test session.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(ROOT / "scripts"))

import mlx_gemma  # noqa: E402  (first, so OpenBLAS is preloaded before mlx)
from make_tiny_model import write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny")
    return {shape: write_tiny_model(base / shape, shape=shape, seed=0) for shape in ("2b", "7b")}


@pytest.fixture(scope="session")
def tiny_dir(tiny_dirs: dict[str, Path]) -> Path:
    return tiny_dirs["2b"]


@pytest.fixture(scope="session")
def runtime(tiny_dir: Path) -> mlx_gemma.Runtime:
    return mlx_gemma.load(tiny_dir)
