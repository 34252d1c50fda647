"""Prometheus metrics for the API server (scrape GET /metrics).

Each app gets its own registry, so several servers in one process (the tests) never share counters.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Time to first token on a CPU runs from milliseconds to tens of seconds under load; per-token latency is shorter.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("minimind_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("minimind_prompt_tokens", "prompt tokens admitted", registry=r)
        self.generated_tokens = Counter("minimind_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("minimind_time_to_first_token_seconds", "submit to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.per_token = Histogram("minimind_time_per_output_token_seconds", "mean gap between tokens, per request",
                                   buckets=TOKEN_BUCKETS, registry=r)
        active = Gauge("minimind_active_sequences", "sequences in the engine's batch", registry=r)
        active.set_function(lambda: engine.num_active)
        queued = Gauge("minimind_queued_sequences", "sequences waiting for a slot", registry=r)
        queued.set_function(lambda: engine.num_waiting)

    def observe_generation(self, handle) -> None:
        """A finished request: its tokens and latencies (from the engine's handle timestamps)."""
        self.prompt_tokens.inc(handle.prompt_tokens)
        self.generated_tokens.inc(handle.completion_tokens)
        if handle.first_token_at is not None:
            self.ttft.observe(handle.first_token_at - handle.submitted_at)
            if handle.completion_tokens > 1:
                self.per_token.observe((handle.last_token_at - handle.first_token_at) / (handle.completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
