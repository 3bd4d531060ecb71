"""Wires one run: state, client, gate, budget, writer, walkers in a TaskGroup; stops in 2 steps."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from crawler import report
from crawler.budget import Budget
from crawler.client import ApiClient
from crawler.config import Job, Target
from crawler.dedup import SeenLog
from crawler.endpoint import REVIEWS
from crawler.errors import AuthError, ComeBackLater, RunStopped, StateError, WrongEndpoint
from crawler.layout import Layout, write_atomically
from crawler.limits import RateGate
from crawler.progress import Figures, Progress
from crawler.retry import RetryPolicy
from crawler.sandbox import SandboxOptions, serve
from crawler.shards import remove_uncommitted
from crawler.state import FileStateStore, output_fingerprint
from crawler.walker import Door, Outcome, RunCounters, Walker
from crawler.writer import Writer

log = structlog.get_logger("crawler.runner")

EXIT_OK, EXIT_FAILED_TARGETS, EXIT_USAGE, EXIT_BUDGET, EXIT_REFUSED = 0, 1, 2, 3, 4
EXIT_WRONG_ENDPOINT, EXIT_COME_BACK_LATER, EXIT_OUTPUT = 5, 6, 7
EXIT_INTERRUPTED = 130


@dataclass
class RunResult:
    exit_status: int
    stop_reason: str | None
    outcomes: dict[str, tuple[Outcome, str | None]]
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Run:
    """The live parts of one run, for the workers, the watchdog and the progress display."""

    job: Job
    store: FileStateStore
    walker: Walker
    door: Door
    hurry: asyncio.Event
    pending: deque[Target]
    outcomes: dict[str, tuple[Outcome, str | None]] = field(default_factory=dict)
    fatal: RunStopped | None = None
    # retries and 429s of earlier runs: the display adds this run's live counts to them
    earlier_retries: int = 0
    earlier_rate_limited: int = 0


async def run_job(
    job: Job,
    *,
    fresh: bool = False,
    environ: Mapping[str, str] | None = None,
    max_pages: int | None = None,
    handle_signals: bool = False,
    live_progress: bool = False,
    retry_policy: RetryPolicy | None = None,
) -> RunResult:
    """Run (or resume) a job to the end, to its budget, or to a stop; return how it ended.

    ``max_pages`` caps every target's pages for this run (``plan --probe`` walks page 1 only).
    Raises JobError subclasses for bad input or state; every other stop is in the result.
    """
    api_key = job.api_key(environ)
    layout = Layout(job.output.dir)
    fingerprint = output_fingerprint(job.output.shard_max_records, job.output.compression)
    store = FileStateStore.open(layout, fingerprint, fresh=fresh)
    try:
        remove_uncommitted(layout, store.state)
        layout.shards_dir.mkdir(exist_ok=True)
        seen = _open_seen(layout, store)
        store.state.runs += 1
        store.compact()
        started = time.time()
        async with (
            _api_base(job) as base_url,
            ApiClient(
                base_url,
                api_key,
                concurrency=job.api.concurrency,
                timeout_seconds=job.api.timeout_seconds,
            ) as client,
        ):
            run = _prepare(job, store, seen, client, max_pages, retry_policy)
            with _signals(run, enabled=handle_signals):
                try:
                    await _crawl(run, live_progress=live_progress)
                except ExceptionGroup as group:  # a task's own error, e.g. a full disk
                    raise _first_leaf(group) from None
        store.compact()
        return _finish(run, layout, started)
    finally:
        store.close()


def _open_seen(layout: Layout, store: FileStateStore) -> SeenLog:
    state = store.state
    try:
        return SeenLog(layout.seen_ids, layout.seen_other, state.seen, state.seen_other)
    except ValueError as exc:
        raise StateError(f"{exc}; start over with --fresh") from None


@contextlib.asynccontextmanager
async def _api_base(job: Job) -> AsyncIterator[str]:
    if not job.api.is_sandbox:
        yield job.api.base_url
        return
    # the in-process emulator allows exactly the configured rate, as a real key would
    options = SandboxOptions(rate=job.api.requests_per_second)
    async with serve(options) as (base_url, _):
        yield base_url


def _prepare(  # noqa: PLR0917 -- the run's parts, each passed in once
    job: Job,
    store: FileStateStore,
    seen: SeenLog,
    client: ApiClient,
    max_pages: int | None,
    retry_policy: RetryPolicy | None,
) -> _Run:
    door = Door()
    writer = Writer(
        store.layout,
        store,
        seen,
        REVIEWS,
        compression=job.output.compression,
        shard_max_records=job.output.shard_max_records,
        commit_every_pages=job.output.commit_every_pages,
        queue_size=max(16, 2 * job.api.concurrency),
    )
    walker = Walker(
        endpoint=REVIEWS,
        client=client,
        gate=RateGate(job.api.requests_per_second),
        budget=Budget(job.budget, store, lease_requests=job.api.concurrency),
        door=door,
        writer=writer,
        counters=RunCounters(),
        policy=retry_policy or RetryPolicy.from_settings(job.api.retry),
        max_pages=max_pages,
    )
    limit_of = {t.key: (max_pages if max_pages is not None else t.max_pages) for t in job.targets}
    pending = deque(
        t
        for t in job.targets
        if report.target_status(limit_of[t.key], store.state.target(t.key)) != "done"
    )
    saved = store.state.targets.values()
    return _Run(
        job,
        store,
        walker,
        door,
        asyncio.Event(),
        pending,
        earlier_retries=sum(t.retries for t in saved),
        earlier_rate_limited=sum(t.rate_limited for t in saved),
    )


def _first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _crawl(run: _Run, *, live_progress: bool) -> None:
    workers_count = min(run.job.api.concurrency, len(run.pending))
    progress = Progress(lambda: _figures(run), live=live_progress)
    log.info(
        "run started",
        targets=len(run.job.targets),
        pending=len(run.pending),
        credits_spent=run.walker.budget.spent,
        max_credits=run.job.budget.max_credits,
    )
    async with asyncio.TaskGroup() as group:
        writer = run.walker.writer
        writer_task = group.create_task(writer.run())
        progress_task = group.create_task(progress.run())
        workers = [group.create_task(_worker(run)) for _ in range(workers_count)]
        watchdog = group.create_task(_watchdog(run, workers))
        if workers:
            await asyncio.wait(workers)
        watchdog.cancel()
        await run.walker.budget.give_back()
        await writer.close()
        await writer_task
        progress_task.cancel()
    log.info("run finished", **progress.summary(_figures(run)), stop_reason=run.door.reason)


async def _worker(run: _Run) -> None:
    while run.pending and run.door.open:
        target = run.pending.popleft()
        saved = run.store.state.target(target.key)
        try:
            run.outcomes[target.key] = await run.walker.walk(target, saved)
        except RunStopped as exc:
            run.outcomes[target.key] = (Outcome.PENDING, None)
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
            log.warning(
                "stopping: finishing requests in flight",
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
    state = run.store.state
    done = failed = 0
    pages_left = 0
    walked = [t for t in state.targets.values() if t.pages]
    items_per_page = sum(t.items for t in walked) / sum(t.pages for t in walked) if walked else 0
    finished = [t.pages for t in state.targets.values() if t.exhausted]
    # a target not started yet is guessed at the mean size of the finished ones
    typical = sum(finished) / len(finished) if finished else 0
    for target in run.job.targets:
        saved = state.targets.get(target.key)
        status = report.target_status(target.max_pages, saved) if saved else "pending"
        done += status == "done"
        failed += status == "failed" or run.outcomes.get(target.key, ("",))[0] == Outcome.FAILED
        if status == "done":
            continue
        if saved and saved.review_count is not None and items_per_page:
            expected = saved.review_count / items_per_page
        else:
            expected = typical
        if target.max_pages is not None:
            expected = min(expected, target.max_pages)
        pages_left += max(0, round(expected) - (saved.pages if saved else 0))
    counters = run.walker.counters
    return Figures(
        targets_done=done,
        targets_total=len(run.job.targets),
        pages=sum(t.pages for t in state.targets.values()),
        records=sum(t.records for t in state.targets.values()),
        duplicates=sum(t.duplicates for t in state.targets.values()),
        credits=run.walker.budget.spent,
        max_credits=run.job.budget.max_credits,
        requests=counters.requests,
        rate_limited=run.earlier_rate_limited + counters.rate_limited,
        retries=run.earlier_retries + counters.retries,
        failed=failed,
        pages_left=pages_left if walked else None,
    )


def _finish(run: _Run, layout: Layout, started: float) -> RunResult:
    for target in run.pending:  # never started: the run stopped first
        run.outcomes.setdefault(target.key, (Outcome.PENDING, None))
    status = _exit_status(run)
    if run.door.reason == "budget":  # every unfinished target waits for a larger budget
        why = f"budget.max_credits ({run.job.budget.max_credits}) reached"
        for key, (outcome, _) in run.outcomes.items():
            if outcome == Outcome.PENDING:
                run.outcomes[key] = (Outcome.BUDGET, why)
    counters = run.walker.counters
    run_info = {
        "started_at": started,
        "finished_at": time.time(),
        "exit_status": status,
        "stop_reason": run.door.reason,
        "requests": counters.requests,
        "retries": counters.retries,
        "rate_limited": counters.rate_limited,
        "rate_limit_episodes": run.walker.gate.episodes,
    }
    if run.fatal is not None:
        run_info["stop_message"] = str(run.fatal)
    live = {k: (str(o), why) for k, (o, why) in run.outcomes.items()}
    doc = report.build(run.job, run.store.state, live_status=live, run=run_info)
    write_atomically(layout.report, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    return RunResult(status, run.door.reason, run.outcomes, doc)


def _exit_status(run: _Run) -> int:
    if run.door.reason == "interrupted":
        return EXIT_INTERRUPTED
    if run.fatal is not None:
        return _STOPS.get(type(run.fatal), ("refused", EXIT_REFUSED))[1]
    outcomes = {o for o, _ in run.outcomes.values()}
    if run.door.reason == "budget" or Outcome.BUDGET in outcomes:
        return EXIT_BUDGET
    if Outcome.FAILED in outcomes:
        return EXIT_FAILED_TARGETS
    return EXIT_OK
