"""Prometheus metrics for /metrics (--enable-metrics), in SGLang's names (prefix `sglang:`).

Two sources, one registry per app (tests build several apps in one process):
  - the schedulers' state: gauges and counters with labels model_name and tknp_rank (one series
    per TKNP rank; rank 0 alone without TKNP), read from a `GetLoadReqOutput` when /metrics is
    scraped (`set_load`) and rendered by a collector, since the backend, not this process, counts;
  - request latencies: histograms with label model_name, observed by the TokenizerManager as a
    request's outputs arrive (`RequestMetrics`).

What the latencies measure (all from when this process registered the request, after tokenizing):
  time_to_first_token_seconds  streamed requests: until their first token reached this process;
                               a non-streamed result arrives whole, so for it the scheduler's
                               own measure (its arrival there to its first token) is used
  inter_token_latency_seconds  gaps between the token deltas of streamed requests, per token
  time_per_output_token_seconds  per request: (e2e - ttft) / (output tokens - 1)
  e2e_request_latency_seconds  until the final result reached this process
  queue_time_seconds           from arrival at the scheduler to the first step that ran it
                               (label tknp_rank: the rank it waited on)
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket bounds in seconds, from a tiny CPU model's few milliseconds to long GPU generations.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.4, 0.8, 1.5, 3, 6)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class RequestMetrics:
    """The latency histograms; the TokenizerManager calls the observe_* methods."""

    def __init__(self, registry: CollectorRegistry, model_name: str):
        def histogram(name: str, doc: str, buckets: tuple) -> Any:
            h = Histogram(f"sglang:{name}", doc, ["model_name"], registry=registry, buckets=buckets)
            return h.labels(model_name=model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token in seconds.", _TTFT_BUCKETS)
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between streamed output tokens in seconds.", _TOKEN_BUCKETS
        )
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Average time per output token after the first, per request.",
            _TOKEN_BUCKETS,
        )
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency in seconds.", _E2E_BUCKETS)
        # per TKNP rank: where the request waited
        self.model_name = model_name
        self.queue = Histogram(
            "sglang:queue_time_seconds",
            "Time from arrival at the scheduler to the first step.",
            ["model_name", "tknp_rank"],
            registry=registry,
            buckets=_QUEUE_BUCKETS,
        )

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_tokens(self, gap_seconds: float, num_tokens: int) -> None:
        """`num_tokens` tokens arrived together `gap_seconds` after the previous ones."""
        for _ in range(num_tokens):
            self.itl.observe(gap_seconds / num_tokens)

    def observe_finished(
        self,
        e2e: float,
        ttft: Optional[float],
        completion_tokens: int,
        queue_seconds: Optional[float],
        tknp_rank: int = 0,
    ) -> None:
        self.e2e.observe(e2e)
        if ttft is not None and completion_tokens > 1:
            self.tpot.observe(max(e2e - ttft, 0.0) / (completion_tokens - 1))
        if queue_seconds is not None:
            self.queue.labels(model_name=self.model_name, tknp_rank=str(tknp_rank)).observe(queue_seconds)


# (name, kind, help, value of one rank's GetLoadReqOutput)
_LOAD_SERIES = [
    ("num_running_reqs", "gauge", "Requests running.", lambda r: r.num_running_reqs),
    ("num_queue_reqs", "gauge", "Requests waiting in the scheduler.", lambda r: r.num_waiting_reqs),
    ("num_used_tokens", "gauge", "KV cache tokens in use.", lambda r: r.kv_tokens_used),
    ("num_free_tokens", "gauge", "KV cache tokens not in use.", lambda r: r.max_total_num_tokens - r.kv_tokens_used),
    (
        "token_usage",
        "gauge",
        "Share of the KV cache in use.",
        lambda r: r.kv_tokens_used / max(r.max_total_num_tokens, 1),
    ),
    (
        "cache_hit_rate",
        "gauge",
        "Share of prompt tokens served by the prefix cache.",
        lambda r: r.cache_hit_tokens / r.prompt_tokens if r.prompt_tokens else 0.0,
    ),
    ("max_total_num_tokens", "gauge", "KV cache capacity in tokens.", lambda r: r.max_total_num_tokens),
    ("prompt_tokens_total", "counter", "Prompt tokens processed.", lambda r: r.prompt_tokens),
    ("generation_tokens_total", "counter", "Tokens generated.", lambda r: r.generation_tokens),
    ("cached_tokens_total", "counter", "Prompt tokens served by the prefix cache.", lambda r: r.cache_hit_tokens),
    ("num_retractions_total", "counter", "Requests retracted to free KV memory.", lambda r: r.num_retractions),
]


class _LoadCollector(Collector):
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.load: Optional[Any] = None  # the GetLoadReqOutput of the current scrape

    def collect(self) -> Iterator[Metric]:
        load = self.load
        if load is None:
            return
        ranks = load.ranks or [load]
        labels = ["model_name", "tknp_rank"]
        for name, kind, doc, value in _LOAD_SERIES:
            family_type = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            family = family_type(f"sglang:{name}", doc, labels=labels)
            for rank in ranks:
                family.add_metric([self.model_name, str(rank.tknp_rank)], value(rank))
            yield family
        if load.placements:
            family = CounterMetricFamily(
                "sglang:tknp_placements_total", "Requests the TKNP controller placed on each rank.", labels=labels
            )
            for rank, placed in enumerate(load.placements):
                family.add_metric([self.model_name, str(rank)], placed)
            yield family


class ServerMetrics:
    """One app's registry: the schedulers' state and the request latency histograms."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(self.registry, model_name)
        self._load = _LoadCollector(model_name)
        self.registry.register(self._load)

    def render(self, load: Any) -> bytes:
        """Prometheus text for the schedulers' state `load` (a GetLoadReqOutput) and the histograms."""
        self._load.load = load
        return generate_latest(self.registry)
