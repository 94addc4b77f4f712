"""Report of a benchmark-suite run: the table, the headline targets, and the PNG.

`print_report(report)` prints every measurement as a Markdown table, then each headline target
(met, or missed and by how much). `write_plot(report, path)` draws aggregate tokens/s against
concurrent streams (base-only and one adapter per stream, per model) beside a bar chart of
the ratios, each oriented so that above 1 means better than the reference (time to first token
and memory are drawn as reference / ours), with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from collections.abc import Callable

# (headline, model, a substring of the measurement's name, reference, target, what it states)
TARGETS = [
    ("decode vs mlx-lm, tiny", "tiny", "text level mlx-gemma decode_tps", "mlx-lm", 1.10, "ratio"),
    ("decode vs mlx-lm, 2B shape", "2b-shape", "float32 token level mlx-gemma decode_tps", "mlx-lm", 1.10, "ratio"),
    ("LoRA unfused rank 8 overhead, tiny", "tiny", "unfused r8 decode_tps", "plain", 0.05, "overhead"),
    ("LoRA unfused rank 8 overhead, 2B shape", "2b-shape", "unfused r8 decode_tps", "plain", 0.05, "overhead"),
    ("8 streams with 8 adapters vs 1 stream, tiny", "tiny", "batch 8 streams, one adapter each, aggregate", "1 stream",
     3.0, "ratio"),
    ("8 streams with 8 adapters vs 1 stream, demo", "demo", "batch 8 streams, one adapter each, aggregate", "1 stream",
     3.0, "ratio"),
    ("8 streams with 8 adapters vs 8 base streams, tiny", "tiny", "batch 8 streams, one adapter each, vs base-only",
     "8 base streams", 0.9, "ratio"),
    ("8 streams with 8 adapters vs 8 base streams, demo", "demo", "batch 8 streams, one adapter each, vs base-only",
     "8 base streams", 0.9, "ratio"),
    ("HTTP SSE overhead, tiny", "tiny", "HTTP SSE decode_tps", "Python API", 0.05, "overhead"),
    ("HTTP SSE overhead, demo", "demo", "HTTP SSE decode_tps", "Python API", 0.05, "overhead"),
    ("fraction of the bandwidth limit, 2B shape float32", "2b-shape", "float32 decode, fraction", "bandwidth limit",
     None, "ratio"),
]


def find(report: dict, model: str, fragment: str, reference: str) -> dict | None:
    for row in report["measurements"]:
        if row.get("model") == model and fragment in row["name"] and row.get("reference_name") == reference:
            return row
    return None


def verdict(row: dict, target: float | None, kind: str) -> str:
    ratio = row["ratio"]
    if kind == "overhead":
        overhead = 1 - ratio
        met = "met" if overhead <= target else f"missed by {100 * (overhead - target):.1f} points"
        return f"{100 * overhead:+.1f}% (target <= {100 * target:.0f}%): {met}"
    if target is None:
        return f"{ratio:.2f}"
    met = "met" if ratio >= target else f"missed by {100 * (1 - ratio / target):.0f}%"
    return f"{ratio:.2f}x (target >= {target:.2f}x): {met}"


def fmt(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def table_line(row: dict) -> str:
    reference = f"{fmt(row['reference'])} {row['reference_name']}" if row.get("reference") is not None else ""
    ratio = (f"{row['ratio']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"
             if row.get("ratio") is not None else "")
    ours = f"{fmt(row['ours'])} ({fmt(row['min'])}-{fmt(row['max'])}) {row['unit']}"
    return f"| {row['name']} | {ours} | {reference} | {ratio} | {row['runs']} |"


def print_report(report: dict, out: Callable[[str], None] = print) -> None:
    machine = report["machine"]
    out(f"# {report['date']}: {machine['processor']}, {machine['cpu_count']} cores, MLX {machine['mlx']} "
        f"({machine['mlx_backend']}), {machine['blas']}")
    out("| measurement | ours median (min-max) | reference | ratio (min-max) | runs |")
    out("|---|---|---|---|---|")
    for row in report["measurements"]:
        out(table_line(row))
    out("\n| headline | result |\n|---|---|")
    for headline, model, fragment, reference, target, kind in TARGETS:
        row = find(report, model, fragment, reference)
        if row is not None:
            out(f"| {headline} | {verdict(row, target, kind)} |")


def batch_series(report: dict) -> dict[str, tuple[list[int], list[float]]]:
    """Per model and load: the stream counts and their aggregate tokens/s."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in report["measurements"]:
        if row.get("section") == "batch" and row.get("reference_name") == "1 stream":
            xs, ys = series.setdefault(f"{row['model']}, {row['load']}", ([], []))
            xs.append(row["streams"])
            ys.append(row["ours"])
    return series


def headline_ratios(report: dict) -> list[dict]:
    """Ratio rows for the bar chart: all but the batch rows, and of those only 8 streams."""
    return [row for row in report["measurements"] if row.get("ratio") is not None
            and (row.get("section") != "batch" or row.get("streams") == 8)]


# Units of measurements where less is better (time to first token, memory): the plot shows
# reference / ours for them, so that every bar reads "above 1 is better than the reference".
LOWER_IS_BETTER_UNITS = frozenset({"s", "GB"})


def advantage(row: dict) -> tuple[str, float]:
    """The bar's label and value: ours / reference, or reference / ours where less is better."""
    if row.get("unit") in LOWER_IS_BETTER_UNITS:
        return f"{row['reference_name']} / {row['name']} (less is better)", 1 / row["ratio"]
    return f"{row['name']} / {row['reference_name']}", row["ratio"]


def write_plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = headline_ratios(report)
    figure, (left, right) = plt.subplots(1, 2, figsize=(16, max(6, 0.32 * len(ratios))),
                                         gridspec_kw={"width_ratios": [1, 1.6]})
    for label, (xs, ys) in batch_series(report).items():
        left.plot(xs, ys, marker="o", label=label)
    left.set(xlabel="concurrent streams", ylabel="aggregate decode tokens/s", yscale="log",
             title="Continuous batching: tokens/s vs streams")
    left.legend()
    left.grid(True, alpha=0.3)
    names, values = zip(*(advantage(row) for row in ratios)) if ratios else ((), ())
    right.barh(names, values, color=["tab:blue" if value >= 1 else "tab:orange" for value in values])
    right.axvline(1.0, color="black", linewidth=0.8)
    right.set(xscale="log", xlabel="advantage over the reference (median of pairs; above 1: better)",
              title="Ratios, oriented so that above 1 is better")
    right.tick_params(axis="y", labelsize=7)
    right.invert_yaxis()
    machine = report["machine"]
    figure.suptitle(f"mlx-gemma bench, {report['date'][:10]}, {machine['processor']}, {machine['cpu_count']} cores, "
                    f"MLX {machine['mlx']} ({machine['mlx_backend']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
