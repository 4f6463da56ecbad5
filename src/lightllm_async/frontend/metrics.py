"""GET /metrics: Prometheus text format through prometheus_client.

Engine gauges and counters are read from the region at scrape time (the engine publishes one
snapshot per step, see ipc EngineStats), so scraping costs the engine nothing. The frontend adds
its own counter of HTTP requests by route and status.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .asgi import Receive, Responder, Scope

PREFIX = "lightllm"


class EngineCollector(Collector):
    """Turns the region's latest EngineStats snapshot into Prometheus families."""

    def __init__(self, service):
        self.service = service

    def collect(self) -> Iterator[Metric]:
        region = self.service.ctx.region
        s = region.engine_stats()
        gauges = {
            "num_requests_running": ("Requests in the running batch.", s.num_running),
            "num_requests_waiting": ("Requests waiting for admission.", s.num_waiting),
            "kv_cache_tokens_total": ("KV cache capacity in tokens.", s.kv_tokens_total),
            "kv_cache_tokens_free": ("Free KV cache token slots.", s.kv_tokens_free),
            "kv_cache_usage_ratio": (
                "Fraction of the KV cache in use.",
                1 - s.kv_tokens_free / s.kv_tokens_total if s.kv_tokens_total else 0.0,
            ),
            "request_slots_free": ("Free request slots in shared memory.", region.num_free_slots()),
            "engine_alive": ("1 while the engine process runs.", float(self.service.engine_alive())),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        counters = {
            "num_preemptions": ("Requests preempted for lack of KV cache.", s.num_preemptions),
            "prompt_tokens": ("Prompt tokens admitted.", s.prompt_tokens_total),
            "generation_tokens": ("Tokens generated.", s.generation_tokens_total),
            "prefix_cache_queries": (
                "Prompt tokens looked up in the prefix cache (each request once, at admission).",
                s.prefix_queried_tokens_total,
            ),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache.", s.cached_tokens_total),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)


class Metrics:
    """One registry per app: the engine collector and the HTTP request counter."""

    def __init__(self, service):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(service))
        self.http_requests = Counter(
            f"{PREFIX}_http_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=self.registry,
        )

    def count(self, route: str, status: int) -> None:
        self.http_requests.labels(route, str(status)).inc()

    async def handle(self, scope: Scope, receive: Receive, resp: Responder) -> None:
        await resp.body(200, generate_latest(self.registry), content_type=CONTENT_TYPE_LATEST.encode())
