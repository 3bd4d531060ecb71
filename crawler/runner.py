"""Wires one run: state, client, gate, budget, writer, walkers in a TaskGroup; stops in 2 steps."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from crawler import logs
from crawler.api.client import ApiClient
from crawler.config import Job
from crawler.errors import (
    AuthError,
    ComeBackLater,
    OutputError,
    RunStopped,
    WrongEndpoint,
)
from crawler.monitor import check_metrics_address, figures, run_metrics, serving, snapshot
from crawler.output.layout import Layout, write_atomically
from crawler.output.publisher import BucketPublisher
from crawler.output.recovery import recover
from crawler.output.series import recover_series
from crawler.pacing.retry import RetryPolicy
from crawler.parts import Parts, Run, api_base, assemble, open_parts, publisher_for, series_names
from crawler.progress import Progress
from crawler.sources import SourceTarget
from crawler.state import StateView
from crawler.state.events import WALKABLE, Status

log = logs.get_logger("crawler.runner")

EXIT_OK, EXIT_FAILED_TARGETS, EXIT_USAGE, EXIT_BUDGET, EXIT_REFUSED = 0, 1, 2, 3, 4
EXIT_WRONG_ENDPOINT, EXIT_COME_BACK_LATER, EXIT_OUTPUT = 5, 6, 7


@dataclass
class RunResult:
    exit_status: int
    stop_reason: str | None
    report: dict[str, Any] = field(default_factory=dict)


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
    layout = Layout(job.output.dir)
    output = {
        "shard_max_records": job.output.shard_max_records,
        "compression": job.output.compression,
    }
    if fresh:  # a run refused for its metrics address must not have removed anything first
        check_metrics_address(job)
    publisher = publisher_for(job, layout, retry_policy, environ)
    parts = await open_parts(
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
        metrics = run_metrics(job, metrics_registry, parts.owner)
        options = _Options(
            refresh, max_pages, handle_signals, live_progress, retry_policy, api_key, metrics
        )
        async with serving(job, metrics), asyncio.TaskGroup() as upkeep:
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


async def _run(job: Job, layout: Layout, parts: Parts, options: _Options) -> RunResult:
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
            # every worker's series shards: this worker's own are recovered, as its reviews'
            series=await store.series_manifest(),
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
    for name in series_names(job):
        found.bytes_cut += recover_series(layout, store.series(name), parts.owner)
    await store.sync_targets(job.targets)
    await store.sync_sources(job.sources)
    refreshing = await store.begin_run(
        refresh=options.refresh, mode=job.refresh, probe=options.max_pages is not None
    )
    started = time.time()
    async with (
        api_base(job) as base_url,
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
        run = assemble(job, parts, seen, client, options.max_pages, options.retry_policy)
        if options.metrics is not None:
            options.metrics.watch(lambda: snapshot(run))
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


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _crawl(run: Run, *, live_progress: bool) -> Progress:
    walkable = run.store.totals.count(*WALKABLE)
    workers_count = min(
        run.job.api.concurrency, max(1, walkable, run.job.api.concurrency * bool(run.sources))
    )
    progress = Progress(lambda: figures(run), live=live_progress)
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


async def _worker(run: Run) -> None:
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


async def _watchdog(run: Run, workers: list[asyncio.Task[None]]) -> None:
    """Second step of a stop: after the grace period (or at once when hurried), cancel walkers."""
    await run.door.closed.wait()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(run.hurry.wait(), run.job.api.shutdown_grace_seconds)
    for task in workers:
        task.cancel()


@contextlib.contextmanager
def _signals(run: Run, *, enabled: bool) -> Any:
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


async def _finish(
    run: Run, layout: Layout, started: float, parts: Parts, progress: Progress
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
        await parts.publisher.publish(*await store.manifest(), await store.series_manifest())
    # after the run is recorded: a coordinated job's figures are then the job's as Redis has them
    log.info("run finished", **progress.summary(figures(run)), stop_reason=run.door.reason)
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


def _exit_status(run: Run) -> int:
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
