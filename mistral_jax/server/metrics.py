"""/metrics: Prometheus text through prometheus-client, vLLM's metric names with our prefix.

Gauges read the engine when scraped; counters and latency histograms are fed by the bridge's
engine thread (Metrics is one of its observers)."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "mistral_jax:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, engine, bridge=None):
        self.bridge = bridge
        self.registry = r = CollectorRegistry()
        allocator, scheduler = engine.allocator, engine.scheduler

        def gauge(name, doc, fn):
            Gauge(PREFIX + name, doc, registry=r).set_function(fn)

        gauge("num_requests_running", "Requests in the running batch.", lambda: len(scheduler.running))
        gauge("num_requests_waiting", "Requests waiting for a place in the batch.", lambda: len(scheduler.waiting))
        gauge("kv_cache_usage_perc", "Fraction of KV pages held by requests (0-1).",
              lambda: allocator.num_used_pages / max(1, allocator.num_pages - 1))
        gauge("num_free_pages", "KV pages free or held only by the prefix cache.", lambda: allocator.num_free_pages)
        gauge("prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens.",
              lambda: allocator.stats.cached_tokens / max(1, allocator.stats.prompt_tokens))
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens admitted.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Requests finished, by reason.",
                                       ["finished_reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Request admitted to its first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "time_per_output_token_seconds", "Time between a request's tokens.",
                             buckets=LATENCY_BUCKETS, registry=r)
        if engine.speculator is not None:
            r.register(_SpeculationCounters(engine.speculator.stats))
        self._last: dict[str, float] = {}  # request -> time of its last token (or of its admission)
        self._started: set[str] = set()

    # observer hooks (the engine thread)
    def added(self, request_id: str, prompt_len: int) -> None:
        self.prompt_tokens.inc(prompt_len)
        self._last[request_id] = time.perf_counter()

    def event(self, event) -> None:
        now = time.perf_counter()
        last = self._last.get(event.request_id)
        if last is not None:
            (self.itl if event.request_id in self._started else self.ttft).observe(now - last)
            self._started.add(event.request_id)
            self._last[event.request_id] = now
        self.generation_tokens.inc()
        if event.finished:
            self.request_success.labels(event.finish_reason or "stop").inc()
            self._last.pop(event.request_id, None)
            self._started.discard(event.request_id)

    def aborted(self, request_id: str) -> None:
        self.request_success.labels("abort").inc()
        self._last.pop(request_id, None)
        self._started.discard(request_id)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SpeculationCounters:
    """vLLM's speculative-decoding counters, read from the engine's SpecStats when scraped."""

    def __init__(self, stats):
        self.stats = stats

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        for name, doc in (("num_drafts", "Verify steps that carried drafts."),
                          ("num_draft_tokens", "Tokens proposed."),
                          ("num_accepted_tokens", "Proposed tokens the model sampled too.")):
            yield CounterMetricFamily(f"{PREFIX}spec_decode_{name}", doc, value=getattr(self.stats, name))
