"""GET /metrics: Prometheus text format through prometheus_client, names in vLLM's conventions
under the `lightllm_async:` prefix (vLLM's `vllm:`).

Engine gauges and counters are read from the region at scrape time (the engine publishes one
snapshot per step, see ipc EngineStats), so scraping costs the engine nothing. With several engine
replicas (--dp) the engine families are their sums (KV capacity included), and the
`replica_*{replica="k"}` families show each replica's share of the load. The frontend adds
its own: HTTP requests by route and status, and per request, observed when it ends, histograms of
time to first token, inter-token latency, end-to-end latency, queue time (submit to the engine's
first admission, both on the monotonic clock; known for the requests whose finish the frontend
read, not those the client left first), prompt and generation lengths, and the count of requests
by how they ended.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lightllm_async.ipc import total_stats

from .asgi import Receive, Responder, Scope

PREFIX = "lightllm_async:"

# vLLM's buckets, so that dashboards built for it read these the same way
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class EngineCollector(Collector):
    """Turns the region's latest EngineStats snapshot into Prometheus families."""

    def __init__(self, service):
        self.service = service

    def collect(self) -> Iterator[Metric]:
        region = self.service.ctx.region
        per_replica = [region.replica_stats(k) for k in range(region.num_replicas)]
        s = total_stats(per_replica)
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
            "engine_alive": ("1 while every engine process runs.", float(self.service.engine_alive())),
            "engine_replicas": ("Engine replicas (--dp).", region.num_replicas),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"{PREFIX}{name}", doc, value=value)
        counters = {
            "num_preemptions": ("Requests preempted for lack of KV cache.", s.num_preemptions),
            "prompt_tokens": ("Prompt tokens admitted.", s.prompt_tokens_total),
            "generation_tokens": ("Tokens generated.", s.generation_tokens_total),
            "prefix_cache_queries": (
                "Prompt tokens looked up in the prefix cache (each request once, at admission).",
                s.prefix_queried_tokens_total,
            ),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache.", s.cached_tokens_total),
            "kv_transfer_sent_tokens": (
                "Token positions of KV the prefill engines handed off (--pd).",
                s.kv_sent_tokens_total,
            ),
            "kv_transfer_received_tokens": (
                "Token positions of KV the decode engines received (--pd).",
                s.kv_received_tokens_total,
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"{PREFIX}{name}", doc, value=value)
        yield from _by_replica(per_replica)


def _by_replica(stats: list) -> Iterator[Metric]:
    """Each replica's share: how the frontend spread the load over them."""
    families = (
        (GaugeMetricFamily, "replica_num_requests_running", "Requests in the replica's running batch.",
         "num_running"),
        (GaugeMetricFamily, "replica_num_requests_waiting", "Requests waiting in the replica.",
         "num_waiting"),
        (CounterMetricFamily, "replica_prompt_tokens", "Prompt tokens the replica admitted.",
         "prompt_tokens_total"),
        (CounterMetricFamily, "replica_generation_tokens", "Tokens the replica generated.",
         "generation_tokens_total"),
    )  # fmt: skip
    for kind, name, doc, field in families:
        family = kind(f"{PREFIX}{name}", doc, labels=["replica"])
        for k, s in enumerate(stats):
            family.add_metric([str(k)], getattr(s, field))
        yield family


class Metrics:
    """One registry per app: the engine collector, the HTTP request counter and the per-request
    histograms, which the service feeds as each request ends (`service.on_request_end`)."""

    def __init__(self, service):
        self.registry = CollectorRegistry(auto_describe=False)
        if service.ctx.region is not None:  # --role router: the role servers have the engines' own
            self.registry.register(EngineCollector(service))
        r = self.registry
        self.http_requests = Counter(
            f"{PREFIX}http_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.ttft = Histogram(
            f"{PREFIX}time_to_first_token_seconds", "Time to first token.", buckets=TTFT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            f"{PREFIX}inter_token_latency_seconds",
            "Time between output tokens.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{PREFIX}e2e_request_latency_seconds", "Request latency.", buckets=E2E_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            f"{PREFIX}request_queue_time_seconds",
            "Time from submission to the first admission to the running batch.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Histogram(
            f"{PREFIX}request_prompt_tokens", "Prompt length.", buckets=LENGTH_BUCKETS, registry=r
        )
        self.generation_tokens = Histogram(
            f"{PREFIX}request_generation_tokens", "Output length.", buckets=LENGTH_BUCKETS, registry=r
        )
        self.success = Counter(
            f"{PREFIX}request_success",
            "Requests by how they ended: stop, length, abort (the client left), error.",
            ["finished_reason"],
            registry=r,
        )
        service.on_request_end = self.observe

    def observe(self, gen) -> None:
        """A request ended (a frontend `Generation`, its timings filled in)."""
        if gen.first_token_at is not None:
            self.ttft.observe(gen.first_token_at - gen.started)
        for gap in gen.token_gaps:
            self.itl.observe(gap)
        self.e2e.observe((gen.ended_at or gen.started) - gen.started)
        if gen.queue_time is not None:
            self.queue_time.observe(max(gen.queue_time, 0.0))
        self.prompt_tokens.observe(gen.prompt_tokens)
        self.generation_tokens.observe(gen.completion_tokens)
        self.success.labels(gen.outcome).inc()

    def count(self, route: str, status: int) -> None:
        self.http_requests.labels(route, str(status)).inc()

    async def handle(self, scope: Scope, receive: Receive, resp: Responder) -> None:
        await resp.body(200, generate_latest(self.registry), content_type=CONTENT_TYPE_LATEST.encode())
