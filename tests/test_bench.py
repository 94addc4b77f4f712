"""`mlx-gemma bench`: the suite's JSON, its plot and its verdicts on the targets.

The end-to-end test runs the whole quick suite on the tiny model only (about 20 s): every
measurement must carry the fields the JSON promises, with consistent medians and ratios.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from suite_report import TARGETS, advantage, batch_series, find, verdict  # noqa: E402

REQUIRED = {"name", "ours", "reference", "reference_name", "ratio", "unit", "runs"}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "mlx_gemma.cli", "bench", "--quick", "--model", "tiny",
                           "--json", str(out / "bench.json"), "--plot", str(out / "bench.png")],
                          capture_output=True, text=True, timeout=600, cwd=out)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "bench.json").read_text()), out / "bench.png"


def test_every_measurement_has_the_promised_fields(report: tuple[dict, Path]) -> None:
    data, _ = report
    assert {"tiny"} == {row["model"] for row in data["measurements"]}
    assert {"generate", "lora", "batch", "http"} == {row["section"] for row in data["measurements"]}
    for row in data["measurements"]:
        assert REQUIRED <= set(row), row["name"]
        assert row["min"] <= row["ours"] <= row["max"], row["name"]
        if row["ratio"] is not None:
            assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"], row["name"]
            assert row["reference"] > 0 and row["runs"] >= 1


def test_the_report_names_its_machine_and_command(report: tuple[dict, Path]) -> None:
    data, _ = report
    assert data["command"].startswith("mlx-gemma bench --json ")
    assert data["command"].endswith(" --quick --model tiny")
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["mlx_backend"] in {"cpu", "metal", "cuda"}
    assert data["duration_s"] > 0


def test_streams_are_measured_at_1_4_8_16_for_both_loads(report: tuple[dict, Path]) -> None:
    data, _ = report
    series = batch_series(data)
    assert set(series) == {"tiny, base", "tiny, adapters"}
    assert all(xs == [1, 4, 8, 16] for xs, _ in series.values())


def test_the_plot_is_a_png(report: tuple[dict, Path]) -> None:
    _, png = report
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verdicts_say_met_or_by_how_much() -> None:
    assert verdict({"ratio": 1.2}, 1.10, "ratio") == "1.20x (target >= 1.10x): met"
    assert verdict({"ratio": 0.99}, 1.10, "ratio") == "0.99x (target >= 1.10x): missed by 10%"
    assert verdict({"ratio": 0.98}, 0.05, "overhead") == "+2.0% (target <= 5%): met"
    assert verdict({"ratio": 0.77}, 0.05, "overhead") == "+23.0% (target <= 5%): missed by 18.0 points"
    assert verdict({"ratio": 0.25}, None, "ratio") == "0.25"


def test_plot_bars_read_above_one_as_better_whichever_way_the_unit_runs() -> None:
    faster = {"name": "decode_tps", "reference_name": "mlx-lm", "unit": "tokens/s", "ratio": 1.25}
    slower_first_token = {"name": "ttft_s", "reference_name": "mlx-lm", "unit": "s", "ratio": 1.25}
    assert advantage(faster) == ("decode_tps / mlx-lm", 1.25)
    assert advantage(slower_first_token) == ("mlx-lm / ttft_s (less is better)", 0.8)


def test_the_mixed_adapter_target_is_judged_on_the_8_stream_pair() -> None:
    rows = [{"model": "tiny", "name": "tiny batch 8 streams, one adapter each, vs base-only",
             "reference_name": "8 base streams", "ratio": 0.88}]
    target = next(t for t in TARGETS if t[0] == "8 streams with 8 adapters vs 8 base streams, tiny")
    row = find({"measurements": rows}, *target[1:4])
    assert verdict(row, target[4], target[5]) == "0.88x (target >= 0.90x): missed by 2%"
