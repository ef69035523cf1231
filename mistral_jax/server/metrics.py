"""/metrics: Prometheus text through prometheus-client, vLLM's metric names with our prefix."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "mistral_jax:"


class Metrics:
    def __init__(self, bridge):
        self.bridge = bridge
        self.registry = CollectorRegistry()
        engine = bridge.engine
        allocator = engine.allocator
        gauge = lambda name, doc, fn: Gauge(PREFIX + name, doc, registry=self.registry).set_function(fn)  # noqa: E731
        gauge("num_requests_running", "Requests in the running batch.", lambda: bridge.num_running)
        gauge("num_requests_waiting", "Requests waiting for a place in the batch.", lambda: bridge.num_waiting)
        gauge("kv_cache_usage_perc", "Fraction of KV pages held by requests (0-1).",
              lambda: allocator.num_used_pages / max(1, allocator.num_pages - 1))
        gauge("num_free_pages", "KV pages free or held only by the prefix cache.", lambda: allocator.num_free_pages)
        gauge("prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens.",
              lambda: allocator.stats.cached_tokens / max(1, allocator.stats.prompt_tokens))

    def render(self) -> bytes:
        return generate_latest(self.registry)
