"""Pages in, reviews out: drop ids already seen, append to the open shard, commit, roll over.

The writer is the only owner of shards and the seen-set. Its commit order is what makes resume
exact: shard bytes and seen ids are fsynced first, then the state events that count them.

A page is rendered as soon as it is handed over (``put``): its duplicates dropped, its reviews
turned into record lines, and the parsed page freed at once, which keeps memory small and hot.
Then two stages: ``plan`` splits a batch of rendered pages over shards; ``commit`` writes and
fsyncs the previous batch in a thread meanwhile, then records its events. Each page carries
exactly its own lines and ids, so a batch's events never count bytes of another.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from crawler.config import Target
from crawler.dedup import SeenLog
from crawler.endpoint import Cursor, CursorEndpoint
from crawler.journal import Event
from crawler.layout import Layout, shard_name
from crawler.shards import OpenShard, compressor, write_manifest
from crawler.state import ShardInfo, StateStore

log = structlog.get_logger("crawler.writer")


@dataclass(frozen=True, slots=True)
class PageDone:
    """A page fetched by a walker, with what it cost to get it."""

    target: Target
    items: list[dict[str, Any]]
    next_cursor: Cursor | None
    exhausted: bool
    total: int | None
    fetched_at: str
    credits: int
    retries: int
    rate_limited: int
    seconds: float
    last: bool = False  # the target's walk ends with this page: log its summary once committed


@dataclass(frozen=True, slots=True)
class TargetFailed:
    target: Target
    reason: str
    credits: int
    retries: int
    rate_limited: int


@dataclass(frozen=True, slots=True)
class _Rendered:
    event: Event
    lines: list[bytes]
    ids: bytes
    other_ids: bytes
    finishes: Target | None = None


_CLOSE = None


@dataclass
class _Prepared:
    """A rendered batch: file operations in order, then the events that commit them."""

    ops: list[tuple[OpenShard, list[bytes]] | Event]  # a segment to write, or an O event
    ids: list[bytes]
    other_ids: list[bytes]
    page_events: list[Event]
    finished: list[Target]


class Writer:
    """Owns the output: feed it with ``put``; ``run`` commits until ``close``."""

    def __init__(
        self,
        layout: Layout,
        store: StateStore,
        seen: SeenLog,
        endpoint: CursorEndpoint,
        *,
        compression: str,
        shard_max_records: int,
        commit_every_pages: int = 1,
        queue_size: int = 64,
    ) -> None:
        self._layout = layout
        self._store = store
        self._seen = seen
        self._endpoint = endpoint
        self._compression = compression
        self._compress = compressor(compression)
        self._shard_max = shard_max_records
        self._commit_every = commit_every_pages
        self._queue: asyncio.Queue[_Rendered | None] = asyncio.Queue(maxsize=queue_size)
        self._prepared: asyncio.Queue[_Prepared | None] = asyncio.Queue(maxsize=1)
        self._loaded = asyncio.Event()
        state = store.state
        # the shard the committer appends to, and the one the renderer plans for (ahead of it)
        self._shard: OpenShard | None = None
        if state.open_shard is not None:
            self._shard = OpenShard(layout.shard(state.open_shard.file), state.open_shard)
        self._plan_shard = self._shard
        self._plan_records = self._shard.records if self._shard else 0
        self._next_shard = state.next_shard

    async def put(self, work: PageDone | TargetFailed) -> None:
        """Hand over a page or a failure; waits while the queue is full, so a slow disk slows
        the walkers."""
        if not self._loaded.is_set():  # only the first pages of a resumed run wait here
            await self._loaded.wait()
        await self._queue.put(self._render(work))

    async def close(self) -> None:
        await self._queue.put(_CLOSE)

    async def run(self) -> None:
        """Render and commit until ``close``; then seal the open shard and write the manifest."""
        if not self._seen.loaded:  # off the loop: the first requests go out meanwhile
            await asyncio.to_thread(self._seen.load)
        self._loaded.set()
        async with asyncio.TaskGroup() as group:
            group.create_task(self._render_loop())
            group.create_task(self._commit_loop())
        await self._finish()

    async def _render_loop(self) -> None:
        while True:
            batch, closing = await self._next_batch()
            if batch:
                await self._prepared.put(self._prepare(batch))
            if closing:
                await self._prepared.put(None)
                return

    async def _commit_loop(self) -> None:
        while (prepared := await self._prepared.get()) is not None:
            shard_events = await asyncio.to_thread(self._write_files, prepared)
            position = self._position()
            for event in prepared.page_events:
                if event["e"] == "P":
                    event["w"] = position
            await self._store.record(shard_events + prepared.page_events)
            if any(e["e"] == "S" for e in shard_events):
                write_manifest(self._layout, self._store.state)
            for target in prepared.finished:
                self._log_finished(target)

    def _log_finished(self, target: Target) -> None:
        saved = self._store.state.target(target.key)
        log.info(
            "target finished",
            product_id=target.product_id,
            region=target.region,
            pages=saved.pages,
            reviews=saved.records,
            duplicates=saved.duplicates,
            credits=saved.credits,
            retries=saved.retries,
            rate_limited=saved.rate_limited,
            seconds=round(saved.seconds, 3),
            review_count=saved.review_count,
        )

    async def _next_batch(self) -> tuple[list[_Rendered], bool]:
        first = await self._queue.get()
        if first is _CLOSE:
            return [], True
        batch: list[_Rendered] = [first]
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

    def _render(self, work: PageDone | TargetFailed) -> _Rendered:
        if isinstance(work, TargetFailed):
            event = {
                "e": "F",
                "k": work.target.key,
                "why": work.reason,
                "c": work.credits,
                "r": work.retries,
                "q": work.rate_limited,
            }
            return _Rendered(event, [], b"", b"")
        lines: list[bytes] = []
        event = self._add_page(work, lines)
        ids, other_ids = self._seen.take()
        return _Rendered(event, lines, ids, other_ids, work.target if work.last else None)

    def _prepare(self, batch: list[_Rendered]) -> _Prepared:
        lines = [line for page in batch for line in page.lines]
        return _Prepared(
            self._plan(lines),
            [page.ids for page in batch],
            [page.other_ids for page in batch],
            [page.event for page in batch],
            [page.finishes for page in batch if page.finishes is not None],
        )

    def _add_page(self, work: PageDone, lines: list[bytes]) -> Event:
        """Dedup a page's items into record lines; the page's commit event."""
        new = dups = missing = 0
        target = work.target
        # the per-review hot path: one line is the same bytes orjson would give for the record
        # {"review_id", "product_id", "region", "fetched_at", "item"}, with the fields the whole
        # page shares encoded once, and no dict built per review
        shared = b',"product_id":%b,"region":%b,"fetched_at":%b,"item":' % (
            orjson.dumps(target.product_id),
            orjson.dumps(target.region),
            orjson.dumps(work.fetched_at),
        )
        item_id, seen_add, dumps, append = (
            self._endpoint.item_id,
            self._seen.add,
            orjson.dumps,
            lines.append,
        )
        for item in work.items:
            review_id = item_id(item)
            if review_id is None:
                missing += 1
                continue
            if not seen_add(review_id):
                dups += 1
                continue
            append(b"".join((b'{"review_id":', dumps(review_id), shared, dumps(item), b"}\n")))
            new += 1
        if missing:  # the contract says every item has one: say so rather than guess an id
            log.warning(
                "items without a review id skipped",
                product_id=target.product_id,
                region=target.region,
                items=missing,
            )
        return {
            "e": "P",
            "k": target.key,
            "cur": work.next_cursor,
            "x": work.exhausted,
            "i": len(work.items),
            "n": new,
            "d": dups,
            "c": work.credits,
            "r": work.retries,
            "q": work.rate_limited,
            "t": round(work.seconds, 3),
            "tot": work.total,
        }

    def _plan(self, lines: list[bytes]) -> list[tuple[OpenShard, list[bytes]] | Event]:
        """Split record lines over shards of at most ``shard_max_records``, opening new ones."""
        ops: list[tuple[OpenShard, list[bytes]] | Event] = []
        start = 0
        while start < len(lines):
            if self._plan_shard is None or self._plan_records >= self._shard_max:
                name = shard_name(self._next_shard, self._compression)
                self._next_shard += 1
                self._plan_shard = OpenShard(self._layout.shard(name), ShardInfo(name))
                self._plan_records = 0
                ops.append({"e": "O", "file": name})
            room = self._shard_max - self._plan_records
            segment = lines[start : start + room]
            ops.append((self._plan_shard, segment))
            self._plan_records += len(segment)
            start += len(segment)
        return ops

    def _write_files(self, prepared: _Prepared) -> list[Event]:
        """Off the loop: write and fsync the batch's segments and ids; seal full shards.

        Returns the shard events in the order they happened: each seal before the next open.
        """
        events: list[Event] = []
        for op in prepared.ops:
            if isinstance(op, dict):
                events.append(op)
                continue
            shard, lines = op
            self._shard = shard
            shard.append(self._compress(b"".join(lines)), len(lines))
            if shard.records >= self._shard_max:
                events.append(shard.seal())
                self._shard = None
        self._seen.write(b"".join(prepared.ids), b"".join(prepared.other_ids))
        return events

    def _position(self) -> list[int]:
        shard = self._shard
        return [
            shard.bytes if shard else 0,
            shard.records if shard else 0,
            self._seen.count,
            self._seen.other_bytes,
        ]

    async def _finish(self) -> None:
        """End of run: seal the open shard so every shard a run leaves is final."""
        shard = self._shard
        if shard is not None and shard.records > 0:
            event = await asyncio.to_thread(shard.seal)
            await self._store.record([event])
            self._shard = None
        elif shard is not None:
            shard.close()
        write_manifest(self._layout, self._store.state)
        self._seen.close()
