"""Pages in, reviews out: drop ids already seen, append to the open shard, commit, roll over.

The writer is the only owner of shards and the seen-set. Its commit order is what makes resume
exact: shard bytes and seen ids are fsynced first, then the state change that counts them.

A walker renders its page at once (``render``): duplicates dropped, reviews turned into record
lines, the parsed page freed, which keeps memory small and hot. It hands over the rendered page
with the state change it makes (``put``). Then two stages: ``plan`` splits a batch of pages over
shards; ``commit`` writes and fsyncs the previous batch in a thread meanwhile, then commits its
changes to the store. Each page carries exactly its own lines and ids, so a batch's commit never
counts bytes of another.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import orjson

from crawler import logs
from crawler.api.endpoint import CursorEndpoint, Page
from crawler.output.dedup import SeenSet
from crawler.output.layout import Layout, shard_name
from crawler.output.publisher import FolderPublisher, Publisher, Segment
from crawler.output.series import Series, SeriesPlan
from crawler.output.shards import OpenShard, compressor
from crawler.state import ShardInfo, StateStore, TargetState
from crawler.state.events import (
    Commit,
    PageCommitted,
    SeriesShard,
    ShardOpened,
    ShardSealed,
    SourcePage,
    Status,
    TargetFailed,
    WriterPosition,
)
from crawler.state.verdict import missing
from crawler.targets import Target

log = logs.get_logger("crawler.writer")


@dataclass(slots=True)
class Rendered:
    """A page's new reviews as record lines, and their ids."""

    lines: list[bytes]
    ids: bytes
    other_ids: bytes
    new: int
    duplicates: int
    found: list[tuple[str, str]] | None = None  # a source page's: the targets it names


@dataclass(slots=True)
class _Work:
    change: PageCommitted | TargetFailed | SourcePage
    target: Target | None
    rendered: Rendered | None


_CLOSE = None


@dataclass(slots=True)
class Committed:
    """What this writer committed in this run (the metrics' counters)."""

    pages: int = 0
    records: int = 0
    duplicates: int = 0


@dataclass
class _Prepared:
    """A batch planned over shards: file operations in order, then the changes they commit."""

    ops: list[tuple[OpenShard, list[bytes]] | ShardOpened]  # a segment to write, or an opening
    ids: list[bytes] = field(default_factory=list)
    other_ids: list[bytes] = field(default_factory=list)
    changes: list[PageCommitted | TargetFailed] = field(default_factory=list)
    targets: dict[int, Target] = field(default_factory=dict)
    sources: list[SourcePage] = field(default_factory=list)
    series: dict[str, SeriesPlan] = field(default_factory=dict)


# a batch written and on its way to the bucket, to be recorded once its upload is done
_Written = tuple[_Prepared, Commit, asyncio.Task[None]]


class Writer:
    """Owns the output: ``render`` a page, ``put`` it; ``run`` commits until ``close``."""

    def __init__(
        self,
        layout: Layout,
        store: StateStore,
        seen: SeenSet,
        endpoint: CursorEndpoint,
        *,
        compression: str,
        shard_max_records: int,
        commit_every_pages: int = 1,
        queue_size: int = 64,
        series: dict[str, Series] | None = None,
        publisher: Publisher | None = None,
    ) -> None:
        self._layout = layout
        # the folder's manifest, or a bucket's parts, sealed objects and manifest
        self._publisher = publisher or FolderPublisher(layout)
        self._store = store
        self._seen = seen
        self._endpoint = endpoint
        self._compression = compression
        self._compress = compressor(compression)
        self._shard_max = shard_max_records
        self._commit_every = commit_every_pages
        self._queue: asyncio.Queue[_Work | None] = asyncio.Queue(maxsize=queue_size)
        self.committed = Committed()
        self._gone = False  # the commit loop failed: no page is taken any more
        self._prepared: asyncio.Queue[_Prepared | None] = asyncio.Queue(maxsize=1)
        self._loaded = asyncio.Event()
        # the shard the committer appends to, and the one the planner plans for (ahead of it)
        self._shard: OpenShard | None = None
        if store.open_shard is not None:
            self._shard = OpenShard(layout.shard(store.open_shard.file), store.open_shard)
        self._plan_shard = self._shard
        self._plan_records = self._shard.records if self._shard else 0
        self._next_shard = store.next_shard
        self._series = series or {}  # the source endpoints' own shard series, by name

    async def loaded(self) -> None:
        """Returns once the seen-set is loaded (pages may be rendered)."""
        await self._loaded.wait()

    async def put_source(self, page: SourcePage, rendered: Rendered | None) -> None:
        """Hand over a source page with its items and the targets it found, for one commit."""
        if rendered is not None and isinstance(page.change, PageCommitted):
            page.change.ids, page.change.other_ids = rendered.ids, rendered.other_ids
        if self._gone:
            raise asyncio.CancelledError
        await self._queue.put(_Work(page, None, rendered))

    async def render(
        self, target: Target, page: Page, fetched_at: str, *, first_page: bool = False
    ) -> Rendered:
        """Dedup a page's items into record lines (in the caller's task: the page is freed
        as soon as this returns). The first line written from a walk's first page also carries
        the product's figures as that page gave them (``product``: review_count and
        product_rating), once, for the export's product snapshots."""
        if not self._loaded.is_set():  # only the first pages of a resumed run wait here
            await self._loaded.wait()
        lines: list[bytes] = []
        new = dups = missing = 0
        # the per-review hot path: a line is the record {"review_id", "product_id", "region",
        # "fetched_at", "item"} with the item's bytes as the API sent them, the fields the whole
        # page shares encoded once, and no object built per review
        shared = b',"product_id":%b,"region":%b,"fetched_at":%b,"item":' % (
            orjson.dumps(target.product_id),
            orjson.dumps(target.region),
            orjson.dumps(fetched_at),
        )
        head = shared
        if first_page:
            head = b'%b"product":{"review_count":%b,"product_rating":%b},"item":' % (
                shared.removesuffix(b'"item":'),
                orjson.dumps(page.total),
                bytes(page.rating) if page.rating is not None else b"null",
            )
        seen_add = self._seen.adder(target.product_id)
        dumps, append, join = orjson.dumps, lines.append, b"".join
        for review_id, item in zip(page.ids, page.items, strict=True):
            if not isinstance(review_id, str):  # None, or not an id (another endpoint's page)
                missing += 1
                continue
            if not seen_add(review_id):
                dups += 1
                continue
            append(join((b'{"review_id":', dumps(review_id), head, item, b"}\n")))
            head = shared
            new += 1
        if missing:  # the contract says every item has one: say so rather than guess an id
            log.warning(
                "items without a review id skipped",
                product_id=target.product_id,
                region=target.region,
                items=missing,
            )
        ids, other_ids = self._seen.take()
        return Rendered(lines, ids, other_ids, new, dups)

    async def put(
        self, change: PageCommitted | TargetFailed, target: Target, rendered: Rendered | None
    ) -> None:
        """Hand over a page (or a failure) for commit; waits while the queue is full, so a slow
        disk slows the walkers."""
        if rendered is not None and isinstance(change, PageCommitted):
            change.ids, change.other_ids = rendered.ids, rendered.other_ids
        if self._gone:  # the writer's own error ends the run: nothing will take this page
            raise asyncio.CancelledError
        await self._queue.put(_Work(change, target, rendered))

    async def close(self) -> None:
        await self._queue.put(_CLOSE)

    async def run(self) -> None:
        """Commit until ``close``; then seal the open shard and write the manifest."""
        if not self._seen.loaded:  # off the loop: the first requests go out meanwhile
            await asyncio.to_thread(self._seen.load)
        self._loaded.set()
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._plan_loop())
                group.create_task(self._commit_loop())
        except BaseException:
            # walkers waiting to hand over a page would wait for ever: let them go, and stop
            # the next one at the door
            self._gone = True
            while not self._queue.empty():
                self._queue.get_nowait()
            raise
        await self._finish()

    async def _plan_loop(self) -> None:
        while True:
            batch, closing = await self._next_batch()
            if batch:
                await self._prepared.put(self._prepare(batch))
            if closing:
                await self._prepared.put(None)
                return

    async def _commit_loop(self) -> None:
        """Write each batch, put it where it is published, record it. Into a bucket, the next
        batch is written while this one is being put (its round trip off the critical path);
        batches are recorded in order, each only once its own bytes are published. Into a
        folder, each batch is recorded as soon as it is written: nothing to wait for, and a
        second stage only cost the event loop a task switch per batch."""
        written: asyncio.Queue[_Written | None] = asyncio.Queue(maxsize=1)
        pipelined = self._publisher.puts_parts
        async with asyncio.TaskGroup() as group:
            if pipelined:
                group.create_task(self._record_loop(written))
            while (prepared := await self._prepared.get()) is not None:
                events, series, segments = await asyncio.to_thread(self._write_files, prepared)
                # the positions as this batch left the files: the next one may be written
                # before this one is recorded
                batch = Commit(prepared.changes, events, self._position())
                if prepared.sources or series:
                    batch.sources, batch.series_shards = prepared.sources, series
                    batch.series_positions = {n: s.position() for n, s in self._series.items()}
                if not pipelined:
                    await self._record(prepared, batch)
                    continue
                # the batch's bytes in the bucket before the state counts them
                upload = group.create_task(self._publisher.before_commit(segments))
                await written.put((prepared, batch, upload))
            await written.put(None)

    async def _record_loop(self, written: asyncio.Queue[_Written | None]) -> None:
        while (item := await written.get()) is not None:
            prepared, batch, upload = item
            await upload
            await self._record(prepared, batch)

    async def _record(self, prepared: _Prepared, batch: Commit) -> None:
        finished = await self._store.commit(batch)
        self._count(prepared.changes)
        if any(isinstance(e, ShardSealed) for e in batch.shards) or (
            # a bucket lists a sealed series shard at once, so its parts go; a folder's manifest
            # lists it with the next reviews' seal or at the end, as it always has
            self._publisher.puts_parts
            and any(isinstance(e.event, ShardSealed) for e in batch.series_shards)
        ):
            await self._write_manifest()
        for state in finished:
            if state.status is Status.DONE:  # failures were told as they happened
                _log_finished(prepared.targets[state.id], state)

    def _count(self, changes: list[PageCommitted | TargetFailed]) -> None:
        committed = self.committed
        for change in changes:
            if isinstance(change, PageCommitted):
                committed.pages += 1
                committed.records += change.new
                committed.duplicates += change.duplicates

    @property
    def queued(self) -> tuple[int, int]:
        """(pages waiting in the queue, its capacity)."""
        return self._queue.qsize(), self._queue.maxsize

    async def _next_batch(self) -> tuple[list[_Work], bool]:
        first = await self._queue.get()
        if first is _CLOSE:
            return [], True
        batch: list[_Work] = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                if len(batch) >= self._commit_every:
                    return batch, False
                try:  # saving rarely: wait for more pages, up to a second
                    item = await asyncio.wait_for(self._queue.get(), deadline - loop.time())
                except TimeoutError:
                    return batch, False
            if item is _CLOSE:
                return batch, True
            batch.append(item)

    def _prepare(self, batch: list[_Work]) -> _Prepared:
        sourced = [work for work in batch if isinstance(work.change, SourcePage)]
        if sourced:
            batch = [work for work in batch if not isinstance(work.change, SourcePage)]
            # a series this worker no longer holds (coordinated: its lease moved on) is another's
            held = self._store.holds
            sourced = [w for w in sourced if held(w.change.change.target_id)]  # type: ignore[union-attr]  # SourcePages only
        # a target this process no longer holds (its lease moved on) is another's to commit
        batch = [work for work in batch if self._store.holds(work.change.target_id)]  # type: ignore[union-attr]  # source pages are out
        lines = [line for work in batch if work.rendered for line in work.rendered.lines]
        prepared = _Prepared(self._plan(lines))
        for work in sourced:
            page = work.change
            assert isinstance(page, SourcePage)  # noqa: S101 -- sorted above
            prepared.sources.append(page)
            if work.rendered is not None:
                plan = prepared.series.setdefault(page.series, SeriesPlan())
                self._series[page.series].plan(work.rendered.lines, plan)
                plan.ids.append(work.rendered.ids)
                plan.other_ids.append(work.rendered.other_ids)
        for work in batch:
            assert not isinstance(work.change, SourcePage) and work.target is not None  # noqa: S101
            if work.rendered is not None:
                prepared.ids.append(work.rendered.ids)
                prepared.other_ids.append(work.rendered.other_ids)
            prepared.changes.append(work.change)
            prepared.targets[work.change.target_id] = work.target
        return prepared

    def _plan(self, lines: list[bytes]) -> list[tuple[OpenShard, list[bytes]] | ShardOpened]:
        """Split record lines over shards of at most ``shard_max_records``, opening new ones."""
        ops: list[tuple[OpenShard, list[bytes]] | ShardOpened] = []
        start = 0
        while start < len(lines):
            if self._plan_shard is None or self._plan_records >= self._shard_max:
                name = shard_name(self._store.shard_prefix, self._next_shard, self._compression)
                self._next_shard += 1
                self._plan_shard = OpenShard(self._layout.shard(name), ShardInfo(name))
                self._plan_records = 0
                ops.append(ShardOpened(name))
            room = self._shard_max - self._plan_records
            segment = lines[start : start + room]
            ops.append((self._plan_shard, segment))
            self._plan_records += len(segment)
            start += len(segment)
        return ops

    def _write_files(
        self, prepared: _Prepared
    ) -> tuple[list[ShardOpened | ShardSealed], list[SeriesShard], list[Segment]]:
        """Off the loop: write and fsync the batch's segments and ids; seal full shards.

        Returns the shard events in the order they happened (each seal before the next open),
        and the segments written, for the publisher.
        """
        series: list[SeriesShard] = []
        segments: list[Segment] = []
        for name, plan in prepared.series.items():
            written, added = self._series[name].write(plan)
            series += written
            segments += added
        events: list[ShardOpened | ShardSealed] = []
        for op in prepared.ops:
            if isinstance(op, ShardOpened):
                events.append(op)
                continue
            shard, lines = op
            self._shard = shard
            data = self._compress(b"".join(lines))
            segments.append(Segment(shard.info.file, shard.bytes, data))
            shard.append(data, len(lines))
            if shard.records >= self._shard_max:
                events.append(shard.seal())
                self._shard = None
        self._seen.write(b"".join(prepared.ids), b"".join(prepared.other_ids))
        return events, series, segments

    def _position(self) -> WriterPosition:
        shard = self._shard
        return WriterPosition(
            shard.bytes if shard else 0,
            shard.records if shard else 0,
            self._seen.count,
            self._seen.other_bytes,
        )

    async def _write_manifest(self) -> None:
        """The job's manifest. Other workers of a coordinated job write it too: read again after
        writing, and written again until what it lists was still current after the rename."""
        listed = await self._store.manifest()
        while True:
            series = await self._store.series_manifest()
            await self._publisher.publish(*listed, series)
            current = await self._store.manifest()
            # the open shards' committed lengths move with every commit: a snapshot is fine
            if current[0] == listed[0] and _files(current[1]) == _files(listed[1]):
                return
            listed = current

    async def _finish(self) -> None:
        """End of run: seal the open shard so every shard a run leaves is final."""
        shard = self._shard
        if shard is not None and shard.records > 0:
            sealed = await asyncio.to_thread(shard.seal)
            self._shard = None
            await self._store.commit(Commit(shards=[sealed], position=self._position()))
        elif shard is not None:
            shard.close()
        sealed_series = []
        for name, series in self._series.items():
            if (seal := await asyncio.to_thread(series.finish)) is not None:
                sealed_series.append(SeriesShard(name, seal))
        if sealed_series:
            positions = {n: s.position() for n, s in self._series.items()}
            batch = Commit(position=self._position(), series_shards=sealed_series)
            batch.series_positions = positions
            await self._store.commit(batch)
        for series in self._series.values():
            series.close()
        await self._write_manifest()
        self._seen.close()


def _files(shards: list[ShardInfo]) -> list[str]:
    return [s.file for s in shards]


def _log_finished(target: Target, state: TargetState) -> None:
    """One line per finished target, for the JSON log and the log file (not the console)."""
    log.info(
        "target finished",
        product_id=target.product_id,
        region=target.region,
        status=str(state.status),
        verdict=str(state.verdict) if state.verdict else None,
        missing=missing(state.verdict, state.base_count, state.seen) or None,
        pages=state.pages,
        reviews=state.records,
        duplicates=state.duplicates,
        credits=state.credits,
        retries=state.retries,
        rate_limited=state.rate_limited,
        seconds=round(state.seconds, 3),
        review_count=state.review_count,
        walk=state.walk,
        walk_new=state.walk_new,
    )
