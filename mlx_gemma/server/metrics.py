"""`GET /metrics`: the engine's counters in Prometheus' text format (prometheus-client).

Contract: `render(service) -> (body, content_type)`, read fresh from `EngineStats` at each
scrape: requests by finish reason, prompt and generated tokens, decode steps, prompt tokens
reused from the prefix cache, the running
batch size and the queue depth, resident adapters, and a time-to-first-token histogram.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ..engine import TTFT_BUCKETS


class EngineCollector:
    def __init__(self, service: Any):
        self.service = service

    def collect(self) -> Iterator[Any]:
        engine = self.service.runtime.engine
        stats = engine.stats
        requests = CounterMetricFamily("mlx_gemma_requests", "Finished requests by finish reason", labels=["reason"])
        for reason, count in sorted(stats.requests.items()):
            requests.add_metric([reason], count)
        yield requests
        yield CounterMetricFamily("mlx_gemma_prompt_tokens", "Prompt tokens prefilled", value=stats.prompt_tokens)
        yield CounterMetricFamily("mlx_gemma_generated_tokens", "Tokens generated", value=stats.generated_tokens)
        yield CounterMetricFamily("mlx_gemma_decode_steps", "Batched decode steps", value=stats.steps)
        yield CounterMetricFamily("mlx_gemma_prefix_reused_tokens", "Prompt tokens served from the prefix cache",
                                  value=stats.prefix_reused_tokens)
        yield GaugeMetricFamily("mlx_gemma_batch_size", "Rows in the running batch", value=engine.active)
        yield GaugeMetricFamily("mlx_gemma_queue_depth", "Requests waiting for the engine", value=engine.waiting)
        yield GaugeMetricFamily("mlx_gemma_resident_adapters", "LoRA adapters resident in memory",
                                value=sum(1 for a in self.service.runtime.adapters() if a["resident"]))
        yield _ttft_histogram(stats)


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
    return generate_latest(registry), CONTENT_TYPE_LATEST
