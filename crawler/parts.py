"""A run's parts, assembled: where its state, seen-set, rate gate and published shards live
(one process, or a worker of many), and the writer and walkers over them."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from crawler.api.client import ApiClient
from crawler.api.declared import endpoint_of
from crawler.config import Job
from crawler.declarations import REVIEWS
from crawler.errors import RunStopped
from crawler.output.dedup import SeenLog, SeenSet
from crawler.output.layout import Layout
from crawler.output.publisher import BucketPublisher, FolderPublisher, Publisher
from crawler.output.series import Series, SourceSink
from crawler.output.writer import Writer
from crawler.pacing.budget import Budget
from crawler.pacing.limits import Gate, RateGate
from crawler.pacing.retry import RetryPolicy
from crawler.state import StateStore, StateView
from crawler.state.sqlite import SqliteStore, SqliteView
from crawler.walker import Door, RunCounters, Walker

# ``base_url: sandbox`` ends a feed after this many reviews: the real API's ~5,000 per sort order,
# scaled to the emulator's catalogue (a few hundred reviews a target), so the demo meets one
IN_PROCESS_FEED_CAP = 600


@dataclass
class Run:
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


@dataclass
class Parts:
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


async def open_parts(
    job: Job,
    layout: Layout,
    output: dict[str, Any],
    *,
    fresh: bool,
    worker: str | None,
    api_key: str,
    publisher: Publisher,
) -> Parts:
    if job.coordination is None:
        store = await SqliteStore.open(layout, output, fresh=fresh)
        position = store.position

        def seen() -> SeenSet:
            return SeenLog(layout.seen_ids, layout.seen_other, position.seen, position.seen_other)

        return Parts(store, seen, RateGate, lambda: SqliteView.open(layout))
    # only a coordinated job needs Redis: imported here, not above
    from crawler.coordination import SharedRateGate, key_fingerprint, open_worker  # noqa: PLC0415
    from crawler.coordination.view import RedisView  # noqa: PLC0415

    # a bucket: a dead worker's open shard is fetched from its parts, wherever its machine is
    shared = publisher if isinstance(publisher, BucketPublisher) else None
    redis_store = await open_worker(job, layout, output, worker, fresh=fresh, shared=shared)
    fingerprint = key_fingerprint(api_key)
    url, name = job.redis_url, job.name
    return Parts(
        redis_store,
        lambda: redis_store.seen,
        lambda rate: SharedRateGate(redis_store.link, fingerprint, rate, job=name),
        lambda: RedisView(url, name, job.budget),
        series_seen=redis_store.item_seen,
        owner=redis_store.worker,
    )


@contextlib.asynccontextmanager
async def api_base(job: Job) -> AsyncIterator[str]:
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


def assemble(  # noqa: PLR0917 -- the run's parts, each passed in once
    job: Job,
    parts: Parts,
    seen: SeenSet,
    client: ApiClient,
    max_pages: int | None,
    retry_policy: RetryPolicy | None,
) -> Run:
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
        for name in series_names(job)
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
    return Run(job, store, walker, door, asyncio.Event(), writer, sources)


def series_names(job: Job) -> list[str]:
    """The endpoints whose items get a shard series: those sources walk."""
    return list(dict.fromkeys(source.endpoint for source in job.sources))


def publisher_for(
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
