"""`GET /metrics`: the engine's counters in Prometheus' text format (prometheus-client).

Contract: `render(service) -> (body, content_type)`, read fresh from `EngineStats` at each
scrape, never waiting on a lock the engine holds (an adapter load must not stall the event
loop): requests by finish reason (every reason present from the start, at 0), requests refused
at once, prompt and generated tokens, decode steps, prompt tokens reused from the prefix cache,
the running batch size, the prompt being read and the queue depth, resident adapters, and a
time-to-first-token histogram. Text format 0.0.4, which every Prometheus-compatible scraper reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, exposition, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ..engine import TTFT_BUCKETS

FINISH_REASONS = ("stop", "length", "cancelled", "error")
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", CONTENT_TYPE_LATEST)  # LATEST was 0.0.4 until 0.21


class EngineCollector:
    def __init__(self, service: Any):
        self.service = service

    def collect(self) -> Iterator[Any]:
        engine = self.service.runtime.engine
        stats = engine.stats
        yield _by_reason("mlx_gemma_requests", "Finished requests by finish reason (stop includes stop strings)",
                         {reason: 0 for reason in FINISH_REASONS} | stats.finished())
        yield _by_reason("mlx_gemma_rejected_requests", "Requests refused at once (HTTP 429), by reason",
                         {"queue_full": 0} | dict(stats.rejected))
        yield CounterMetricFamily("mlx_gemma_prompt_tokens", "Prompt tokens of requests whose prompt was read "
                                  "(prefix-cache hits included)", value=stats.prompt_tokens)
        yield CounterMetricFamily("mlx_gemma_generated_tokens", "Tokens generated, including any a client did not "
                                  "read (it left, or a stop string ended its text)", value=stats.generated_tokens)
        yield CounterMetricFamily("mlx_gemma_decode_steps", "Batched decode steps", value=stats.steps)
        yield CounterMetricFamily("mlx_gemma_prefix_reused_tokens", "Prompt tokens served from the prefix cache",
                                  value=stats.prefix_reused_tokens)
        yield GaugeMetricFamily("mlx_gemma_batch_size", "Rows in the running batch", value=engine.active)
        yield GaugeMetricFamily("mlx_gemma_prefilling", "Requests whose prompt is being read", value=engine.prefilling)
        yield GaugeMetricFamily("mlx_gemma_queue_depth", "Requests waiting for the engine", value=engine.waiting)
        yield GaugeMetricFamily("mlx_gemma_resident_adapters", "LoRA adapters resident in memory",
                                value=self.service.runtime.registry.resident_count)
        yield _ttft_histogram(stats)


def _by_reason(name: str, documentation: str, counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    for reason, count in sorted(counts.items()):
        family.add_metric([reason], count)
    return family


def _ttft_histogram(stats: Any) -> HistogramMetricFamily:
    """EngineStats already counts cumulatively (a value lands in every bucket it fits)."""
    buckets = [(str(bound), count) for bound, count in zip(TTFT_BUCKETS, stats.ttft_bucket_counts)]
    buckets.append(("+Inf", stats.ttft_count))
    return HistogramMetricFamily("mlx_gemma_time_to_first_token_seconds",
                                 "From submission to the first generated token", buckets=buckets,
                                 sum_value=stats.ttft_sum)


def render(service: Any) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(service))
    return generate_latest(registry), CONTENT_TYPE
