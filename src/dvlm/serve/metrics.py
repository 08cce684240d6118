"""Prometheus metrics of one server: a registry per app (two apps in one process never mix counts).

`ServeMetrics` is also the engine's `EngineObserver`: the engine reports steps and finished
requests from its loop thread (prometheus_client's metrics are thread-safe), the HTTP layer
reports responses, time to first token and latency, and the queue depth and running rows are read
from the engine when `/metrics` is scraped.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dvlm.decode.prompts import Caches

from dvlm.serve.requests import EngineObserver, EngineRequest, Finished

CONTENT_TYPE = CONTENT_TYPE_LATEST
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKENS_PER_FORWARD_BUCKETS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics(EngineObserver):
    """Every metric of the server, registered in its own `CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_responses = Counter("dvlm_http_responses", "HTTP responses by path and status code",
                                      ["path", "code"], registry=r)
        self.requests = Counter("dvlm_requests", "Requests the engine finished, by finish reason "
                                "(stop, length, cancelled, timeout, error)", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("dvlm_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("dvlm_generated_tokens", "Tokens generated (end-of-answer included)",
                                        registry=r)
        self.forwards = Counter("dvlm_forwards", "Model forwards run by the engine", registry=r)
        self.steps = Counter("dvlm_engine_steps", "Engine steps (one block for every running row)", registry=r)
        self.step_rows = Histogram("dvlm_step_rows", "Rows advanced together by one engine step",
                                   buckets=ROWS_BUCKETS, registry=r)
        self.tokens_per_forward = Histogram("dvlm_tokens_per_forward", "Tokens per model forward of each "
                                            "finished request", buckets=TOKENS_PER_FORWARD_BUCKETS, registry=r)
        self.queue_seconds = Histogram("dvlm_queue_seconds", "Time from submission to prefill",
                                       buckets=SECONDS_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("dvlm_time_to_first_token_seconds", "Time from the request's "
                                             "arrival to its first text", buckets=SECONDS_BUCKETS, registry=r)
        self.latency = Histogram("dvlm_request_latency_seconds", "Time from a request's arrival to its last "
                                 "token (answered requests)", buckets=SECONDS_BUCKETS, registry=r)
        self.queue_depth = Gauge("dvlm_queue_depth", "Requests submitted, not yet prefilled", registry=r)
        self.running_rows = Gauge("dvlm_running_rows", "Rows in the engine's running batches", registry=r)

    def watch(self, queue_depth: Callable[[], int], running_rows: Callable[[], int]) -> None:
        """Read the engine's gauges at scrape time (they are exact then, never stale)."""
        self.queue_depth.set_function(lambda: float(queue_depth()))
        self.running_rows.set_function(lambda: float(running_rows()))

    def watch_caches(self, caches: Caches) -> None:
        """Export the engine's cache counts, read at scrape time (`CacheCollector`)."""
        self.registry.register(CacheCollector(caches))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # -- EngineObserver (called from the engine's loop thread) ----------------------------------
    def on_step(self, group_key: tuple, rows: int, forwards: int) -> None:
        self.steps.inc()
        self.step_rows.observe(rows)
        self.forwards.inc(forwards)

    def on_finished(self, request: EngineRequest, finished: Finished) -> None:
        output = finished.output
        self.requests.labels(finish_reason=output.finish_reason).inc()
        self.prompt_tokens.inc(output.prompt_tokens)
        self.generated_tokens.inc(finished.completion_tokens)
        if output.nfe:
            self.tokens_per_forward.observe(finished.completion_tokens / output.nfe)
        self.queue_seconds.observe(finished.queue_seconds)

    # -- HTTP layer ---------------------------------------------------------------------------
    def on_response(self, path: str, code: int) -> None:
        self.http_responses.labels(path=path, code=str(code)).inc()


class CacheCollector:
    """The vision and prefix caches' counts (hits, misses, evictions, reused prompt tokens) and
    contents (entries, bytes), as the caches hold them when `/metrics` is scraped. A cache that is
    off exports nothing."""

    def __init__(self, caches: Caches) -> None:
        self.caches = caches

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for name, cache in (("vision", self.caches.vision), ("prefix", self.caches.prefixes)):
            if cache is None:
                continue
            stats = cache.stats
            counts = {"hits": "lookups that found a kept entry", "misses": "lookups that found none",
                      "evictions": "entries evicted to make room"}
            if name == "prefix":
                counts["hit_tokens"] = "prompt tokens whose keys/values were reused, not recomputed"
            for field, text in counts.items():
                yield CounterMetricFamily(f"dvlm_{name}_cache_{field}", f"{name} cache: {text}",
                                          value=getattr(stats, field))
            yield GaugeMetricFamily(f"dvlm_{name}_cache_entries", f"{name} cache: entries held", value=stats.entries)
            yield GaugeMetricFamily(f"dvlm_{name}_cache_bytes", f"{name} cache: bytes held", value=stats.bytes)


def sample_value(metrics: ServeMetrics, name: str, labels: dict[str, Any] | None = None) -> float:
    """One sample's current value (0 if absent), for tests and diagnostics."""
    value = metrics.registry.get_sample_value(name, {k: str(v) for k, v in (labels or {}).items()})
    return 0.0 if value is None else value
