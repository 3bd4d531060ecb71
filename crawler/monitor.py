"""What a run shows while it runs: the live display's figures, and its Prometheus metrics
(served only when the job asks; prometheus-client is imported only then)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from crawler import logs
from crawler.config import Job
from crawler.errors import ConfigError
from crawler.planner import pages_left
from crawler.progress import Figures
from crawler.state.events import Status
from crawler.state.verdict import VERDICTS
from crawler.walker import Walker

if TYPE_CHECKING:
    from crawler.parts import Run

log = logs.get_logger("crawler.runner")


def run_metrics(job: Job, registry: Any | None, worker: str | None) -> Any | None:
    """The run's metrics, when the job serves them or a registry is given; None otherwise
    (prometheus-client is then never imported)."""
    if job.metrics is None and registry is None:
        return None
    from prometheus_client import CollectorRegistry  # noqa: PLC0415 -- only with metrics on

    from crawler.metrics import RunMetrics  # noqa: PLC0415

    return RunMetrics(registry if registry is not None else CollectorRegistry(), worker)


def check_metrics_address(job: Job) -> None:
    """ConfigError when the metrics address cannot be bound now (a port in use): said before
    --fresh removes the job's files. Serving binds it again once the state is open (a
    coordinated worker's name is known only then); a port taken in between is refused there."""
    if job.metrics is None or job.metrics.port == 0:
        return
    host, port = job.metrics.host, job.metrics.port
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            # as aiohttp's server binds: a port in TIME_WAIT is free, one listened on is not
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise _unservable(host, port, exc) from None


def _unservable(host: str, port: int, exc: OSError) -> ConfigError:
    return ConfigError(
        f"metrics: cannot listen on {host}:{port}: {exc.strerror or exc}; give another "
        "--metrics-port (or metrics.port)"
    )


@contextlib.asynccontextmanager
async def serving(job: Job, metrics: Any | None) -> AsyncIterator[None]:
    """Metrics served over HTTP for the whole run, report included, when the job says so."""
    if metrics is None or job.metrics is None:
        yield
        return
    from crawler.metrics import serve  # noqa: PLC0415 -- only with metrics on

    host, port = job.metrics.host, job.metrics.port
    try:
        served = serve(metrics, host, port)
        url = await served.__aenter__()
    except OSError as exc:
        raise _unservable(host, port, exc) from None
    log.info("metrics served", url=url)
    try:
        yield
    finally:
        await served.__aexit__(None, None, None)


def figures(run: Run) -> Figures:
    """The live figures: the store keeps every total current, so this costs the same for ten
    targets as for a million."""
    totals = run.store.totals
    counters = run.walker.counters
    return Figures(
        targets_done=totals.count(Status.DONE),
        targets_total=totals.targets,
        failed=totals.count(Status.FAILED),
        capped=totals.count(Status.BUDGET),
        pages=int(totals.total("pages")),
        records=int(totals.total("records")),
        duplicates=int(totals.total("duplicates")),
        credits=run.walker.budget.spent,
        max_credits=run.job.budget.max_credits,
        requests=counters.requests,
        rate_limited=int(totals.total("rate_limited")),
        retries=int(totals.total("retries")),
        episodes=run.walker.gate.episodes,
        paused=run.walker.gate.paused,
        pages_left=pages_left(totals),
    )


def snapshot(run: Run) -> Any:
    """The figures metrics show, read at a scrape: the sources the live display reads."""
    from crawler import report  # noqa: PLC0415 -- only with metrics on
    from crawler.metrics import Snapshot  # noqa: PLC0415 -- only with metrics on

    totals, walker = run.store.totals, run.walker
    committed, (queued, capacity) = run.writer.committed, run.writer.queued
    completeness = report.completeness(totals, walker.budget.spent)
    return Snapshot(
        pages=committed.pages,
        reviews=committed.records,
        duplicates=committed.duplicates,
        episodes=walker.gate.episodes,
        rate_allowed=walker.gate.current,
        rate_configured=walker.gate.configured,
        paused=walker.gate.paused,
        queue=queued,
        queue_capacity=capacity,
        credits_spent=walker.budget.spent,
        credits_ceiling=run.job.budget.max_credits,
        # the shown statuses (in_progress, not_started...), as status and the report name them
        targets=report.shown_counts(totals.by_status, spent_out=spent_out(run.job, walker)),
        verdicts={str(v): int(totals.total(v)) for v in VERDICTS},
        reviews_written=int(totals.total("records")),
        reviews_said=completeness["reviews_said"],
        reviews_missing=completeness["reviews_missing"],
        coverage=completeness["coverage"],
    )


def spent_out(job: Job, walker: Walker) -> bool:
    """What is left of the budget buys no request (``report.spent_out``, from the run's own
    count)."""
    return job.budget.max_credits - walker.budget.spent < job.budget.credits_per_request
