"""Wires one run: state, client, gate, budget, writer, walkers in a TaskGroup; stops in 2 steps."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from crawler import logs
from crawler.api.client import ApiClient
from crawler.api.declared import endpoint_of
from crawler.config import Job
from crawler.declarations import REVIEWS
from crawler.errors import (
    AuthError,
    ComeBackLater,
    ConfigError,
    OutputError,
    RunStopped,
    WrongEndpoint,
)
from crawler.output.dedup import SeenLog, SeenSet
from crawler.output.layout import Layout, write_atomically
from crawler.output.publisher import BucketPublisher, FolderPublisher, Publisher
from crawler.output.recovery import recover
from crawler.output.series import Series, SourceSink, recover_series
from crawler.output.writer import Writer
from crawler.pacing.budget import Budget
from crawler.pacing.limits import Gate, RateGate
from crawler.pacing.retry import RetryPolicy
from crawler.planner import pages_left
from crawler.progress import Figures, Progress
from crawler.sources import SourceTarget
from crawler.state import StateStore, StateView
from crawler.state.events import WALKABLE, Status
from crawler.state.sqlite import SqliteStore, SqliteView
from crawler.state.verdict import VERDICTS
from crawler.walker import Door, RunCounters, Walker

log = logs.get_logger("crawler.runner")

EXIT_OK, EXIT_FAILED_TARGETS, EXIT_USAGE, EXIT_BUDGET, EXIT_REFUSED = 0, 1, 2, 3, 4
EXIT_WRONG_ENDPOINT, EXIT_COME_BACK_LATER, EXIT_OUTPUT = 5, 6, 7
# ``base_url: sandbox`` ends a feed after this many reviews: the real API's ~5,000 per sort order,
# scaled to the emulator's catalogue (a few hundred reviews a target), so the demo meets one
IN_PROCESS_FEED_CAP = 600


@dataclass
class RunResult:
    exit_status: int
    stop_reason: str | None
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Run:
    """The live parts of one run, for the workers, the watchdog and the progress display."""

    job: Job
    store: StateStore
    walker: Walker
    door: Door
    hurry: asyncio.Event
    writer: Writer
    sources: dict[str, Walker] = field(default_factory=dict)  # a walker per source
    sources_failed: int = 0  # source walks of this run that ended failed
    fatal: RunStopped | None = None
    signal: int = signal.SIGINT  # the one that stopped the run, when one did


async def run_job(
    job: Job,
    *,
    fresh: bool = False,
    refresh: bool = False,
    environ: Mapping[str, str] | None = None,
    max_pages: int | None = None,
    handle_signals: bool = False,
    live_progress: bool = False,
    retry_policy: RetryPolicy | None = None,
    worker: str | None = None,
    metrics_registry: Any | None = None,
) -> RunResult:
    """Run (or resume) a job to the end, to its budget, or to a stop; return how it ended.

    ``refresh`` re-walks finished targets for their new reviews (see README). ``max_pages``
    caps every walk for this run only (``plan --probe`` walks page 1 and leaves it pending).
    A job with ``coordination`` runs as one worker (named ``worker``) of many, through Redis.
    A job with ``metrics`` serves Prometheus metrics while it runs; ``metrics_registry`` (a
    ``prometheus_client.CollectorRegistry``) is where they are kept, served or not.
    Raises JobError subclasses for bad input or state, OutputError when a file cannot be
    written, CoordinationError when Redis is gone too long; every other stop is in the result.
    """
    api_key = job.api_key(environ)
    if job.sources and job.output.bucket is not None:
        raise ConfigError(
            f"{job.path}: sources: not written to a bucket yet; give output.dir a folder"
        )
    layout = Layout(job.output.dir)
    output = {
        "shard_max_records": job.output.shard_max_records,
        "compression": job.output.compression,
    }
    if fresh:  # a run refused for its metrics address must not have removed anything first
        _check_metrics_address(job)
    publisher = _publisher(job, layout, retry_policy, environ)
    parts = await _open(
        job, layout, output, fresh=fresh, worker=worker, api_key=api_key, publisher=publisher
    )
    try:
        if isinstance(publisher, BucketPublisher):
            if fresh:
                removed = await publisher.remove_job_objects()
                log.info(
                    "removed the job's objects", bucket=str(publisher.bucket.url), removed=removed
                )
            await publisher.check_writable()
        parts.publisher = publisher
        metrics = _metrics(job, metrics_registry, parts.owner)
        options = _Options(
            refresh, max_pages, handle_signals, live_progress, retry_policy, api_key, metrics
        )
        async with _serving(job, metrics), asyncio.TaskGroup() as upkeep:
            # a coordinated worker's heartbeat and leases, from its registration to its end: a
            # long start-up (recovery, a big target list) must not make it look dead
            renewing = upkeep.create_task(parts.store.maintain())
            try:
                return await _run(job, layout, parts, options)
            finally:
                renewing.cancel()
    except ExceptionGroup as group:  # a task's own error: a full disk, a lease lost
        raise _first_leaf(group) from None
    finally:
        await parts.store.close()


@dataclass(frozen=True)
class _Options:
    refresh: bool
    max_pages: int | None
    handle_signals: bool
    live_progress: bool
    retry_policy: RetryPolicy | None
    api_key: str
    metrics: Any | None = None  # a crawler.metrics.RunMetrics when metrics are on


def _metrics(job: Job, registry: Any | None, worker: str | None) -> Any | None:
    """The run's metrics, when the job serves them or a registry is given; None otherwise
    (prometheus-client is then never imported)."""
    if job.metrics is None and registry is None:
        return None
    from prometheus_client import CollectorRegistry  # noqa: PLC0415 -- only with metrics on

    from crawler.metrics import RunMetrics  # noqa: PLC0415

    return RunMetrics(registry if registry is not None else CollectorRegistry(), worker)


def _check_metrics_address(job: Job) -> None:
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
async def _serving(job: Job, metrics: Any | None) -> AsyncIterator[None]:
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


def _publisher(
    job: Job,
    layout: Layout,
    retry_policy: RetryPolicy | None,
    environ: Mapping[str, str] | None,
) -> Publisher:
    """The folder's manifest, or the bucket (obstore imported only then)."""
    if job.output.bucket is None:
        return FolderPublisher(layout)
    from crawler.output.bucket import Bucket, BucketUrl  # noqa: PLC0415 -- only for a bucket

    policy = retry_policy or RetryPolicy.from_settings(job.api.retry)
    bucket = Bucket.open(BucketUrl.parse(job.output.bucket), policy, environ)
    return BucketPublisher(bucket, layout)


async def _run(job: Job, layout: Layout, parts: _Parts, options: _Options) -> RunResult:
    store = parts.store
    if isinstance(parts.publisher, BucketPublisher):
        # before the folder's own step: an open shard whose file is gone is fetched back first.
        # The bucket's manifest is read before the state: a shard is sealed in the state before
        # it is listed, so one another worker lists between the two reads is not foreign
        listed = await parts.publisher.listed()
        sealed, opened = await store.manifest()
        await parts.publisher.recover(
            listed,
            sealed,
            opened,
            store.open_shard,
            store.position.shard_bytes,
            owner=parts.owner,
        )
    found = recover(
        layout,
        store.position,
        store.shards(),
        store.open_shard,
        store.next_shard,
        owner=parts.owner,
    )
    try:
        layout.shards_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError.from_os(exc, layout.shards_dir) from None
    for name in _series_names(job):
        found.bytes_cut += recover_series(layout, store.series(name), parts.owner)
    await store.sync_targets(job.targets)
    await store.sync_sources(job.sources)
    refreshing = await store.begin_run(
        refresh=options.refresh, mode=job.refresh, probe=options.max_pages is not None
    )
    started = time.time()
    async with (
        _api_base(job) as base_url,
        ApiClient(
            base_url,
            options.api_key,
            concurrency=job.api.concurrency,
            timeout_seconds=job.api.timeout_seconds,
            max_body_bytes=job.api.max_body_bytes,
            observe=options.metrics.observe if options.metrics is not None else None,
        ) as client,
    ):
        seen = parts.seen()
        run = _prepare(job, parts, seen, client, options.max_pages, options.retry_policy)
        if options.metrics is not None:
            options.metrics.watch(lambda: _snapshot(run))
        log.info(
            "run started",
            targets=store.totals.targets,
            to_walk=store.totals.count(*WALKABLE),
            refresh=refreshing or None,
            worker=parts.owner,
            credits_spent=run.walker.budget.spent or None,
            max_credits=job.budget.max_credits,
            recovered_bytes=found.bytes_cut or None,
        )
        with _signals(run, enabled=options.handle_signals):
            progress = await _crawl(run, live_progress=options.live_progress)
    return await _finish(run, layout, started, parts, progress)


@dataclass
class _Parts:
    """What differs between one process and a worker of many: where state, the seen-set and
    the rate gate live."""

    store: StateStore
    seen: Callable[[], SeenSet]  # opened after recovery has cut its files back
    gate: Callable[[float], Gate]
    view: Callable[[], StateView | None]
    owner: str | None = None  # the worker's name, coordinated
    # a source endpoint's item seen-set; None: its seen files here (one process)
    series_seen: Callable[[str], SeenSet] | None = None
    publisher: Publisher | None = None  # where committed shards are published


async def _open(
    job: Job,
    layout: Layout,
    output: dict[str, Any],
    *,
    fresh: bool,
    worker: str | None,
    api_key: str,
    publisher: Publisher,
) -> _Parts:
    if job.coordination is None:
        store = await SqliteStore.open(layout, output, fresh=fresh)
        position = store.position

        def seen() -> SeenSet:
            return SeenLog(layout.seen_ids, layout.seen_other, position.seen, position.seen_other)

        return _Parts(store, seen, RateGate, lambda: SqliteView.open(layout))
    # only a coordinated job needs Redis: imported here, not above
    from crawler.coordination import SharedRateGate, key_fingerprint, open_worker  # noqa: PLC0415
    from crawler.coordination.view import RedisView  # noqa: PLC0415

    # a bucket: a dead worker's open shard is fetched from its parts, wherever its machine is
    shared = publisher if isinstance(publisher, BucketPublisher) else None
    redis_store = await open_worker(job, layout, output, worker, fresh=fresh, shared=shared)
    fingerprint = key_fingerprint(api_key)
    url, name = job.redis_url, job.name
    return _Parts(
        redis_store,
        lambda: redis_store.seen,
        lambda rate: SharedRateGate(redis_store.link, fingerprint, rate, job=name),
        lambda: RedisView(url, name, job.budget),
        series_seen=redis_store.item_seen,
        owner=redis_store.worker,
    )


@contextlib.asynccontextmanager
async def _api_base(job: Job) -> AsyncIterator[str]:
    if not job.api.is_sandbox:
        yield job.api.base_url
        return
    # only a sandbox job needs the emulator (and aiohttp's server): imported here, not above
    from crawler.sandbox import SandboxOptions, serve  # noqa: PLC0415

    # the in-process emulator allows exactly the configured rate, as a real key would, and
    # ends long feeds below their count, as real ones do (at a scale its catalogue reaches)
    options = SandboxOptions(rate=job.api.requests_per_second, feed_cap=IN_PROCESS_FEED_CAP)
    async with serve(options) as (base_url, _):
        yield base_url


def _prepare(  # noqa: PLR0917 -- the run's parts, each passed in once
    job: Job,
    parts: _Parts,
    seen: SeenSet,
    client: ApiClient,
    max_pages: int | None,
    retry_policy: RetryPolicy | None,
) -> _Run:
    door = Door()
    store = parts.store
    layout = Layout(job.output.dir)
    series = {
        name: Series(
            layout,
            store.series(name),
            compression=job.output.compression,
            shard_max_records=job.output.shard_max_records,
            seen=parts.series_seen(name) if parts.series_seen is not None else None,
            owner=parts.owner,
        )
        for name in _series_names(job)
    }
    reviews = endpoint_of(REVIEWS, job.reviews)
    writer = Writer(
        layout,
        store,
        seen,
        reviews,
        compression=job.output.compression,
        shard_max_records=job.output.shard_max_records,
        commit_every_pages=job.output.commit_every_pages,
        queue_size=max(16, 2 * job.api.concurrency),
        series=series,
        publisher=parts.publisher,
    )
    walker = Walker(
        endpoint=reviews,
        client=client,
        gate=parts.gate(job.api.requests_per_second),
        budget=Budget(job.budget, store, lease_requests=job.api.concurrency),
        door=door,
        writer=writer,
        counters=RunCounters(),
        policy=retry_policy or RetryPolicy.from_settings(job.api.retry),
        refresh_mode=job.refresh,
        max_pages=max_pages,
    )
    # a source walks as a review target does, under the same gate, budget and door; every
    # page of it again on a refresh (new products may be anywhere in a listing)
    sources = {
        source.name: replace(
            walker,
            endpoint=endpoint_of(source.endpoint, job.endpoints[source.endpoint]),
            writer=SourceSink(writer, series[source.endpoint], source),
            refresh_mode="full",
        )
        for source in job.sources
    }
    return _Run(job, store, walker, door, asyncio.Event(), writer, sources)


def _series_names(job: Job) -> list[str]:
    """The endpoints whose items get a shard series: those sources walk."""
    return list(dict.fromkeys(source.endpoint for source in job.sources))


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _crawl(run: _Run, *, live_progress: bool) -> Progress:
    walkable = run.store.totals.count(*WALKABLE)
    workers_count = min(
        run.job.api.concurrency, max(1, walkable, run.job.api.concurrency * bool(run.sources))
    )
    progress = Progress(lambda: _figures(run), live=live_progress)
    async with asyncio.TaskGroup() as group:
        writer = run.writer
        writer_task = group.create_task(writer.run())
        progress_task = group.create_task(progress.run())
        workers = [group.create_task(_worker(run)) for _ in range(workers_count)]
        watchdog = group.create_task(_watchdog(run, workers))
        await asyncio.wait(workers)
        watchdog.cancel()
        await run.walker.budget.give_back()
        await writer.close()
        await writer_task
        progress_task.cancel()
    return progress


async def _worker(run: _Run) -> None:
    while run.door.open:
        claimed = await run.store.claim()
        if claimed is None:
            if not run.store.finding:
                return
            # a source walk is under way: the targets its next commit finds are walked too
            run.store.found.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.store.found.wait(), 0.5)
            continue
        target = claimed.target
        walker = run.sources[target.source] if isinstance(target, SourceTarget) else run.walker
        try:
            status = await walker.walk(claimed)
            if walker is not run.walker and status is Status.FAILED:
                run.sources_failed += 1
        except RunStopped as exc:
            if run.fatal is None:
                run.fatal = exc
                log.error("stopping every walker", reason=str(exc))
            run.door.close(_STOPS.get(type(exc), ("refused", EXIT_REFUSED))[0])
            if isinstance(exc, AuthError | WrongEndpoint):
                run.hurry.set()  # nothing in flight can succeed: a refused key, a wrong URL


# the door's reason and the exit status for each way the API can stop a run
_STOPS: dict[type[RunStopped], tuple[str, int]] = {
    WrongEndpoint: ("wrong_endpoint", EXIT_WRONG_ENDPOINT),
    ComeBackLater: ("come_back_later", EXIT_COME_BACK_LATER),
}


async def _watchdog(run: _Run, workers: list[asyncio.Task[None]]) -> None:
    """Second step of a stop: after the grace period (or at once when hurried), cancel walkers."""
    await run.door.closed.wait()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(run.hurry.wait(), run.job.api.shutdown_grace_seconds)
    for task in workers:
        task.cancel()


@contextlib.contextmanager
def _signals(run: _Run, *, enabled: bool) -> Any:
    if not enabled:
        yield
        return
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        if run.door.open:
            run.signal = signal.Signals[name]
            log.warning(
                "stop: finishing requests in flight",
                signal=name,
                grace_seconds=run.job.api.shutdown_grace_seconds,
            )
            run.door.close("interrupted")
        else:
            log.warning("stopping now", signal=name)
            run.hurry.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _figures(run: _Run) -> Figures:
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


def _snapshot(run: _Run) -> Any:
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
        targets=report.shown_counts(totals.by_status, spent_out=_spent_out(run.job, walker)),
        verdicts={str(v): int(totals.total(v)) for v in VERDICTS},
        reviews_written=int(totals.total("records")),
        reviews_said=completeness["reviews_said"],
        reviews_missing=completeness["reviews_missing"],
        coverage=completeness["coverage"],
    )


def _spent_out(job: Job, walker: Walker) -> bool:
    """What is left of the budget buys no request (``report.spent_out``, from the run's own
    count)."""
    return job.budget.max_credits - walker.budget.spent < job.budget.credits_per_request


async def _finish(
    run: _Run, layout: Layout, started: float, parts: _Parts, progress: Progress
) -> RunResult:
    store = run.store
    budget_stopped = run.door.reason == "budget"
    counters = run.walker.counters
    info: dict[str, Any] = {
        "finished_at": time.time(),
        "stop_reason": run.door.reason,
        "stop_message": str(run.fatal) if run.fatal else None,
        "requests": counters.requests,
        "retries": counters.retries,
        "rate_limited": counters.rate_limited,
        "rate_limit_episodes": run.walker.gate.episodes,
    }
    info["exit_status"] = status = _exit_status(run)
    await store.end_run(info, budget_stopped=budget_stopped)
    if isinstance(parts.publisher, BucketPublisher):
        # a dead worker's shard sealed at the end is listed now (a folder lists open shards)
        await parts.publisher.publish(*await store.manifest(), {})
    # after the run is recorded: a coordinated job's figures are then the job's as Redis has them
    log.info("run finished", **progress.summary(_figures(run)), stop_reason=run.door.reason)
    run_info = {"started_at": started, "refresh": store.refresh, **info}
    if (limited_at := run.walker.gate.limited_at) is not None:
        # the report's, not kept in state; three figures, so that 0.125/s is not 0.1
        run_info["rate_last_limited"] = float(f"{limited_at:.3g}")
        if (held := run.walker.gate.held()) is not None:
            run_info["rate_held"] = float(f"{held:.3g}")
    if parts.owner is not None:
        run_info["worker"] = parts.owner
    doc = await asyncio.to_thread(_write_reports, run.job, layout, run_info, parts.view)
    return RunResult(status, run.door.reason, doc)


def _write_reports(
    job: Job, layout: Layout, run_info: dict[str, Any], open_view: Callable[[], StateView | None]
) -> dict[str, Any]:
    """The run report, from the saved state (off the event loop: its totals read every
    target, a second for a million)."""
    from crawler import report  # noqa: PLC0415 -- at the end: nothing before the first request needs it

    view = open_view()
    assert view is not None  # noqa: S101 -- this run created it at the latest
    try:
        doc = report.build(job, view, run=run_info)
        write_atomically(layout.report, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    finally:
        view.close()
    return doc


def _exit_status(run: _Run) -> int:
    if run.door.reason == "interrupted":  # as a shell reports a process ended by it: 130, 143
        return 128 + int(run.signal)
    if run.fatal is not None:
        return _STOPS.get(type(run.fatal), ("refused", EXIT_REFUSED))[1]
    totals = run.store.totals
    if run.door.reason == "budget" or totals.count(Status.BUDGET):
        return EXIT_BUDGET
    if totals.count(Status.FAILED) or run.sources_failed:
        return EXIT_FAILED_TARGETS
    return EXIT_OK
