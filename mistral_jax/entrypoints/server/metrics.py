"""/metrics: Prometheus text through prometheus-client, vLLM's metric names with our prefix.

Gauges read the engine's last stats (sent with each of its batches) when scraped; counters and
latency histograms are fed by the bridge as the engine's batches arrive (Metrics is one of its
observers). With several HTTP processes (PROMETHEUS_MULTIPROC_DIR set before prometheus-client
is imported) each process's counters and histograms live in that directory and every scrape sums
them, whichever process answers it."""

from __future__ import annotations

import os
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "mistral_jax:"
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    CONTENT_TYPE = CONTENT_TYPE  # of render()'s text

    def __init__(self, client):
        """client: the bridge's EngineClient; its `stats` (the engine's gauges after its last
        loop turn) are read when scraped."""
        self.registry = CollectorRegistry()
        self.registry.register(_EngineGauges(client))
        if client.info.speculative:
            self.registry.register(_SpeculationCounters(client))
        r = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            MultiProcessCollector(self.registry)
            r = None  # the metrics below are read from the directory, not from this process
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens admitted.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter(PREFIX + "request_success", "Requests finished, by reason.",
                                       ["finished_reason"], registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Request admitted to its first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(PREFIX + "request_queue_time_seconds",
                                    "Request arrived at the server to admitted by the engine (parsing, checks, "
                                    "the hand-over, waiting for the engine's loop).",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "time_per_output_token_seconds", "Time between a request's tokens.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self._last: dict[str, float] = {}  # request -> time of its last token (or of its admission)
        self._started: set[str] = set()

    # observer hooks (the bridge, in the event loop)
    def added(self, request_id: str, prompt_len: int, arrived: float, t: float) -> None:
        """arrived: time.perf_counter() when the HTTP request arrived; t: when the engine process
        admitted it (the same clock in both processes)."""
        self.prompt_tokens.inc(prompt_len)
        self.queue_time.observe(max(0.0, t - arrived))
        self._last[request_id] = t

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


class _EngineGauges:
    """The engine's gauges, from its last stats when scraped."""

    GAUGES = (("num_requests_running", "Requests in the running batch.", lambda s: s.running),
              ("num_requests_waiting", "Requests waiting for a place in the batch.", lambda s: s.waiting),
              ("kv_cache_usage_perc", "Fraction of KV pages held by requests (0-1).",
               lambda s: s.used_pages / max(1, s.num_pages - 1)),
              ("num_free_pages", "KV pages free or held only by the prefix cache.", lambda s: s.free_pages),
              ("prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens.",
               lambda s: s.cached_tokens / max(1, s.prompt_tokens)),
              ("compiled_programs", "Compiled programs the engine holds: constant after the warm-up "
               "(a rise is a compile that requests waited on).", lambda s: s.programs))

    def __init__(self, client):
        self.client = client

    def collect(self):
        stats = self.client.stats
        for name, doc, value in self.GAUGES:
            yield GaugeMetricFamily(PREFIX + name, doc, value=value(stats))


class _SpeculationCounters:
    """vLLM's speculative-decoding counters, from the engine's last stats when scraped."""

    def __init__(self, client):
        self.client = client

    def collect(self):
        docs = (("num_drafts", "Verify steps that carried drafts."), ("num_draft_tokens", "Tokens proposed."),
                ("num_accepted_tokens", "Proposed tokens the model sampled too."))
        for (name, doc), value in zip(docs, self.client.stats.spec):
            yield CounterMetricFamily(f"{PREFIX}spec_decode_{name}", doc, value=value)
