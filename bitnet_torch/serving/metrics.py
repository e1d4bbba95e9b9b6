"""Prometheus metrics of the server, declared in one place with vLLM's names under the prefix ``bitnet_``.

vLLM's ``vllm:num_requests_running`` is ``bitnet_num_requests_running`` here, and so on; every series carries
vLLM's ``model_name`` label. Our own additions: ``bitnet_request_rejected_total{reason}`` (limits, auth, bad
input) and ``bitnet_http_requests_total{endpoint,status}``. Each server has its own registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["ServingMetrics", "FINISH_REASONS"]

#: ``finished_reason`` label values of ``bitnet_request_success_total``
FINISH_REASONS = ("stop", "length", "abort", "timeout")

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0, 10.0)


class ServingMetrics:
    """The server's counters, gauges and histograms (thread-safe: the scheduler thread and the HTTP loop write)."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        r, m = self.registry, ["model_name"]
        self.running = Gauge("bitnet_num_requests_running", "Requests in the decode batch (prefill or decode).", m,
                             registry=r).labels(model_name)
        self.waiting = Gauge("bitnet_num_requests_waiting", "Requests waiting for a slot.", m,
                             registry=r).labels(model_name)
        self.prompt_tokens = Counter("bitnet_prompt_tokens", "Prompt tokens prefilled.", m,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("bitnet_generation_tokens", "Tokens generated.", m,
                                         registry=r).labels(model_name)
        self.ttft = Histogram("bitnet_time_to_first_token_seconds", "Arrival to first generated token.", m,
                              buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("bitnet_inter_token_latency_seconds", "Time between consecutive generated tokens.", m,
                             buckets=_ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("bitnet_e2e_request_latency_seconds", "Arrival to finish.", m,
                             buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.queue_time = Histogram("bitnet_request_queue_time_seconds", "Time waiting for a slot.", m,
                                    buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)
        self._success = Counter("bitnet_request_success", "Finished requests by reason.", m + ["finished_reason"],
                                registry=r)
        self._rejected = Counter("bitnet_request_rejected", "Requests refused, by cause.", m + ["reason"],
                                 registry=r)
        self._http = Counter("bitnet_http_requests", "HTTP requests by endpoint and status.",
                             m + ["endpoint", "status"], registry=r)
        for reason in FINISH_REASONS:
            self._success.labels(model_name, reason)

    def finished(self, reason: str) -> None:
        """Count one finished request (``reason`` in :data:`FINISH_REASONS`)."""
        self._success.labels(self.model_name, reason).inc()

    def rejected(self, reason: str) -> None:
        """Count one refused request (``queue_full``, ``rate_limit_requests``, ``unauthorized``, ...)."""
        self._rejected.labels(self.model_name, reason).inc()

    def http(self, endpoint: str, status: int) -> None:
        """Count one answered HTTP request."""
        self._http.labels(self.model_name, endpoint, str(status)).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
