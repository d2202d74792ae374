"""Prometheus metrics (prefix ``vlmamba_``) in a registry of the app's own.

The engine reports through the :class:`~server.engine.engine.Observer` hooks (from its thread,
or replayed by the reader thread of the engine process; prometheus-client is thread-safe);
gauges and cache counters are read from ``engine.stats()`` at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.engine.engine import Observer

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _EngineCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        yield GaugeMetricFamily("vlmamba_requests_running", "Sequences holding a state slot", s.running)
        yield GaugeMetricFamily("vlmamba_requests_waiting", "Requests waiting for a state slot", s.waiting)
        yield GaugeMetricFamily("vlmamba_state_slots_used", "State slots in use", s.slots_used)
        yield GaugeMetricFamily("vlmamba_state_slots_total", "State slots in the pool", s.slots_total)
        yield GaugeMetricFamily("vlmamba_state_cache_bytes", "Bytes of cached session states", s.cache_bytes)
        yield GaugeMetricFamily("vlmamba_state_cache_entries", "Cached session states", s.cache_entries)
        yield CounterMetricFamily("vlmamba_state_cache_hits", "Prompts resumed from a cached state", s.cache_hits)
        yield CounterMetricFamily("vlmamba_state_cache_misses", "Prompts with no cached prefix", s.cache_misses)
        yield CounterMetricFamily("vlmamba_state_cache_evictions", "Cached states evicted", s.cache_evictions)


class Metrics(Observer):
    def __init__(self):
        self.registry = r = CollectorRegistry()
        h = lambda name, doc, buckets=LATENCY: Histogram(name, doc, registry=r, buckets=buckets)
        self.ttft = h("vlmamba_time_to_first_token_seconds", "Arrival to first token")
        self.itl = h("vlmamba_inter_token_latency_seconds", "Time between tokens of a sequence")
        self.e2e = h("vlmamba_e2e_request_latency_seconds", "Arrival to last token")
        self.queue = h("vlmamba_request_queue_time_seconds", "Arrival to admission into a state slot")
        self.fetch = h("vlmamba_image_fetch_seconds", "Image fetch, decode and resize time, waits included")
        self.prepare = h("vlmamba_request_prepare_seconds", "Request handler start to hand-off to the engine: image "
                         "fetching and decoding, chat template, tokenizing, image preprocessing", FAST)
        self.batch = h("vlmamba_decode_batch_size", "Sequences per decode step", (1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.prefill_batch = h("vlmamba_prefill_batch_size", "Sequences per prefill", (1, 2, 4, 8, 16, 32, 64))
        self.prefill_tokens = h("vlmamba_prefill_batch_tokens", "Prompt tokens per prefill, all its sequences "
                                "together (cached ones not counted)", (64, 256, 512, 1024, 2048, 4096, 8192, 16384))
        c = lambda name, doc, labels=(): Counter(name, doc, labels, registry=r)
        self.prompt_tokens = c("vlmamba_prompt_tokens", "Prompt tokens processed (cached ones included)")
        self.cached_tokens = c("vlmamba_cached_prompt_tokens", "Prompt tokens resumed from the state cache")
        self.generation_tokens = c("vlmamba_generation_tokens", "Tokens generated")
        self.finished = c("vlmamba_requests_finished", "Finished requests by finish reason", ("reason",))
        self.rejected = c("vlmamba_requests_rejected", "Rejected requests by reason", ("reason",))
        self.fetch_failures = c("vlmamba_image_fetch_failures", "Failed image fetches by reason", ("reason",))

    def attach(self, engine) -> None:
        self.registry.register(_EngineCollector(engine))

    def watch_decoding(self, budget) -> None:
        """Gauges of the image fetcher's :class:`~server.images.PixelBudget`, read at scrape time."""
        g = lambda name, doc: Gauge(name, doc, registry=self.registry)
        g("vlmamba_image_decoding_pixels", "Pixels of images being decoded now").set_function(lambda: budget.in_use)
        g("vlmamba_image_decoding_waiting", "Images waiting for the decoding pixel budget").set_function(
            lambda: budget.waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # Observer hooks, called from the engine thread (or the engine process's reader thread).
    def on_first_token(self, ttft_s, queue_s):
        self.ttft.observe(ttft_s)
        self.queue.observe(queue_s)

    def on_token(self, gap_s):
        self.itl.observe(gap_s)

    def on_step(self, batch_size):
        self.batch.observe(batch_size)

    def on_prefill(self, batch_size, tokens):
        self.prefill_batch.observe(batch_size)
        self.prefill_tokens.observe(tokens)

    def on_finish(self, e2e_s, out):
        self.e2e.observe(e2e_s)
        self.prompt_tokens.inc(out.prompt_tokens)
        self.cached_tokens.inc(out.cached_tokens)
        self.generation_tokens.inc(out.completion_tokens)
        self.finished.labels(out.finish_reason or "unknown").inc()
