"""Prometheus metrics of one run (prometheus-client), served over HTTP on the run's event loop.

Imported only when a run serves metrics (``--metrics-port`` or ``metrics:`` in the job file).
Counters (``_total``) count what this process did in this run: a coordinated job's workers each
serve their own, labelled ``worker``, and summed they are the job's. ``crawler_job_*`` gauges
are the job's figures from its saved state, as this process last read them (the same from every
worker). No label names a target: a million targets would be a million series.

Every figure is read when Prometheus scrapes, from the objects that keep it (the writer's
counts, the rate gate, the budget, the store's totals), on the event loop: no thread, and no
value copied ahead of time that could drift from the run report.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

# seconds: a loopback sandbox answers in a millisecond, the real API in tens to hundreds of
# them, a retried timeout in up to ``api.timeout_seconds``
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class Snapshot:
    """The run's figures at one scrape."""

    pages: int  # committed by this process in this run
    reviews: int
    duplicates: int
    episodes: int  # 429 episodes this run
    rate_allowed: float  # requests per second the gate allows now
    rate_configured: float
    paused: bool  # a 429 pause in force
    queue: int  # pages waiting for the writer
    queue_capacity: int
    credits_spent: int  # the job's, over every run
    credits_ceiling: int
    targets: dict[str, int] = field(default_factory=dict)  # the job's, by status
    verdicts: dict[str, int] = field(default_factory=dict)  # the job's finished, by verdict
    reviews_written: int = 0  # the job's
    reviews_said: int = 0  # review_count summed where the API gave one
    reviews_missing: int = 0  # what the short targets lack
    coverage: float | None = None  # written / said, over the targets with a count


class RunMetrics:
    """The run's metrics in ``registry`` (one passed in: runs in one process never collide)."""

    def __init__(self, registry: CollectorRegistry, worker: str | None = None) -> None:
        self.registry = registry
        self._worker = worker
        base = ("worker",) if worker is not None else ()
        self._base = (worker,) if worker is not None else ()
        self._requests = Counter(
            "crawler_requests",
            "Requests answered (or failed), by endpoint and outcome",
            [*base, "endpoint", "outcome"],
            registry=registry,
        )
        self._latency = Histogram(
            "crawler_request_duration_seconds",
            "Seconds from sending a request to its answer read (or its failure)",
            [*base, "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._live = _Live(base, self._base)
        registry.register(self._live)

    def observe(self, endpoint: str, outcome: str, seconds: float) -> None:
        """One request's answer (``ApiClient``'s ``observe``)."""
        self._requests.labels(*self._base, endpoint, outcome).inc()
        self._latency.labels(*self._base, endpoint).observe(seconds)

    def watch(self, snapshot: Callable[[], Snapshot]) -> None:
        """Read the run's figures from ``snapshot`` at each scrape, from now on."""
        self._live.snapshot = snapshot

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _Live(Collector):
    """The figures read at each scrape."""

    def __init__(self, names: tuple[str, ...], values: tuple[str, ...]) -> None:
        self.snapshot: Callable[[], Snapshot] | None = None
        self._names, self._values = list(names), list(values)

    def collect(self) -> Iterator[Metric]:
        if self.snapshot is None:  # the run not under way yet
            return
        s = self.snapshot()
        yield self._counter("crawler_pages", "Pages committed by this process", s.pages)
        yield self._counter("crawler_reviews_written", "Reviews written by this process", s.reviews)
        yield self._counter(
            "crawler_duplicates", "Reviews dropped as already written (this process)", s.duplicates
        )
        yield self._counter("crawler_rate_limit_episodes", "429 episodes met", s.episodes)
        yield self._gauge(
            "crawler_rate_allowed_requests_per_second",
            "Requests per second the rate gate allows now (lower after 429s)",
            s.rate_allowed,
        )
        yield self._gauge(
            "crawler_rate_configured_requests_per_second",
            "api.requests_per_second",
            s.rate_configured,
        )
        yield self._gauge("crawler_rate_limit_paused", "1 while a 429 pause holds", int(s.paused))
        yield self._gauge("crawler_writer_queue_pages", "Pages waiting for the writer", s.queue)
        yield self._gauge(
            "crawler_writer_queue_capacity_pages",
            "Pages the writer's queue holds",
            s.queue_capacity,
        )
        yield from self._job(s)

    def _job(self, s: Snapshot) -> Iterator[Metric]:
        yield self._gauge(
            "crawler_job_credits_spent", "The job's credits spent, every run", s.credits_spent
        )
        yield self._gauge("crawler_job_credits_ceiling", "budget.max_credits", s.credits_ceiling)
        yield self._labelled(
            "crawler_job_targets", "The job's targets by status", "status", s.targets
        )
        yield self._labelled(
            "crawler_job_targets_finished",
            "The job's finished targets by verdict (complete, short, capped, unknown)",
            "verdict",
            s.verdicts,
        )
        yield self._gauge(
            "crawler_job_reviews_written", "The job's reviews written, every run", s.reviews_written
        )
        yield self._gauge(
            "crawler_job_reviews_said", "Reviews the API said the targets have", s.reviews_said
        )
        yield self._gauge(
            "crawler_job_reviews_missing",
            "Reviews the short targets' feeds lack",
            s.reviews_missing,
        )
        if s.coverage is not None:
            yield self._gauge(
                "crawler_job_coverage_ratio",
                "Reviews written / reviews the API said exist (targets with a count)",
                s.coverage,
            )

    def _counter(self, name: str, doc: str, value: float) -> Metric:
        family = CounterMetricFamily(name, doc, labels=self._names)
        family.add_metric(self._values, value)
        return family

    def _gauge(self, name: str, doc: str, value: float) -> Metric:
        family = GaugeMetricFamily(name, doc, labels=self._names)
        family.add_metric(self._values, value)
        return family

    def _labelled(self, name: str, doc: str, label: str, values: dict[str, int]) -> Metric:
        family = GaugeMetricFamily(name, doc, labels=[*self._names, label])
        for key, value in values.items():
            family.add_metric([*self._values, key], value)
        return family


@contextlib.asynccontextmanager
async def serve(metrics: RunMetrics, host: str, port: int) -> AsyncIterator[str]:
    """Serve ``GET /metrics`` on ``host:port`` until the block ends; yields its URL. OSError
    when the address cannot be bound."""

    async def scrape(_: web.Request) -> web.Response:
        return web.Response(body=metrics.text(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        server = site._server  # aiohttp exposes the bound sockets only here
        bound = server.sockets[0].getsockname()[1] if server else port  # type: ignore[attr-defined]
        shown = f"[{host}]" if ":" in host else host
        yield f"http://{shown}:{bound}/metrics"
    finally:
        await runner.cleanup()
