"""What the robustness suite did, counted as it goes and printed at the end of the run.

Tests call `count(kind)` and `note(label, text)` for a measured value; tests/robustness/conftest.py
prints `COUNTS` (in the order of `KINDS`), then the notes, in pytest's terminal summary.
"""

from __future__ import annotations

from collections import Counter

KINDS = {
    "fuzzed": "requests fuzzed",
    "clients": "concurrent streaming clients",
    "streams": "streams completed with [DONE]",
    "disconnects": "clients that disconnected early",
    "faults": "store faults injected",
    "hostile": "hostile files and names refused",
    "auth": "auth cases",
}
COUNTS: Counter[str] = Counter()
NOTES: dict[str, str] = {}


def count(kind: str, n: int = 1) -> None:
    if kind not in KINDS:
        raise KeyError(f"unknown count {kind!r}: use one of {', '.join(KINDS)}")
    COUNTS[kind] += n


def note(label: str, text: str) -> None:
    NOTES[label] = text


def summary_lines() -> list[str]:
    return [f"{label}: {COUNTS[kind]}" for kind, label in KINDS.items()] + [f"{k}: {v}" for k, v in NOTES.items()]
