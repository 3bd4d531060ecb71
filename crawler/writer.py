"""Pages in, reviews out: drop ids already seen, append to the open shard, commit, roll over.

The writer is the only task that touches shards and the seen-set. Its commit order is what makes
resume exact: shard bytes and seen ids are fsynced first, then the state events that count them.
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


@dataclass(frozen=True, slots=True)
class TargetFailed:
    target: Target
    reason: str
    credits: int
    retries: int
    rate_limited: int


Work = PageDone | TargetFailed
_CLOSE = None


@dataclass
class WriterCounters:
    records: int = 0
    duplicates: int = 0
    pages: int = 0
    without_id: int = 0


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
        self._queue: asyncio.Queue[Work | None] = asyncio.Queue(maxsize=queue_size)
        self._shard: OpenShard | None = None
        self.counters = WriterCounters()
        state = store.state
        if state.open_shard is not None:
            self._shard = OpenShard(layout.shard(state.open_shard.file), state.open_shard)

    async def put(self, work: Work) -> None:
        """Hand over a page; waits while the queue is full, so a slow disk slows the walkers."""
        await self._queue.put(work)

    async def close(self) -> None:
        await self._queue.put(_CLOSE)

    async def run(self) -> None:
        """Commit batches until ``close``; then seal the open shard and write the manifest."""
        while True:
            batch, closing = await self._next_batch()
            if batch:
                await self._commit(batch)
            if closing:
                break
        await self._finish()

    async def _next_batch(self) -> tuple[list[Work], bool]:
        first = await self._queue.get()
        if first is _CLOSE:
            return [], True
        batch: list[Work] = [first]
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

    async def _commit(self, batch: list[Work]) -> None:
        lines: list[bytes] = []
        page_events: list[Event] = []
        for work in batch:
            if isinstance(work, TargetFailed):
                page_events.append(
                    {
                        "e": "F",
                        "k": work.target.key,
                        "why": work.reason,
                        "c": work.credits,
                        "r": work.retries,
                        "q": work.rate_limited,
                    }
                )
            else:
                page_events.append(self._add_page(work, lines))
        segments, shard_events = self._plan(lines)
        shard_events = await asyncio.to_thread(self._write_files, segments, shard_events)
        position = self._position()
        for event in page_events:
            if event["e"] == "P":
                event["w"] = position
        await self._store.record(shard_events + page_events)
        if any(e["e"] == "S" for e in shard_events):
            write_manifest(self._layout, self._store.state)

    def _add_page(self, work: PageDone, lines: list[bytes]) -> Event:
        """Dedup a page's items into record lines; the page's commit event."""
        new = dups = 0
        target = work.target
        for item in work.items:
            review_id = self._endpoint.item_id(item)
            if review_id is None:
                self.counters.without_id += 1
                continue
            if not self._seen.add(review_id):
                dups += 1
                continue
            lines.append(
                orjson.dumps(
                    {
                        "review_id": review_id,
                        "product_id": target.product_id,
                        "region": target.region,
                        "fetched_at": work.fetched_at,
                        "item": item,
                    },
                    option=orjson.OPT_APPEND_NEWLINE,
                )
            )
            new += 1
        self.counters.records += new
        self.counters.duplicates += dups
        self.counters.pages += 1
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

    def _plan(self, lines: list[bytes]) -> tuple[list[tuple[OpenShard, list[bytes]]], list[Event]]:
        """Split record lines over shards of at most ``shard_max_records``, opening new ones."""
        segments: list[tuple[OpenShard, list[bytes]]] = []
        events: list[Event] = []
        shard = self._shard
        start = 0
        while start < len(lines):
            if shard is None or shard.records + _pending(segments, shard) >= self._shard_max:
                name = shard_name(self._store.state.next_shard + len(events), self._compression)
                shard = OpenShard(self._layout.shard(name), ShardInfo(name))
                events.append({"e": "O", "file": name})
            room = self._shard_max - shard.records - _pending(segments, shard)
            segments.append((shard, lines[start : start + room]))
            start += room
        self._shard = shard
        return segments, events

    def _write_files(
        self, segments: list[tuple[OpenShard, list[bytes]]], opened: list[Event]
    ) -> list[Event]:
        """Off the loop: write and fsync each segment and the seen ids; seal full shards.

        Returns the shard events in the order they happened: each seal before the next open.
        """
        events: list[Event] = []
        unannounced = {event["file"]: event for event in opened}
        for shard, lines in segments:
            if shard.info.file in unannounced:
                events.append(unannounced.pop(shard.info.file))
            shard.append(self._compress(b"".join(lines)), len(lines))
            if shard.records >= self._shard_max:
                events.append(shard.seal())
                if shard is self._shard:
                    self._shard = None
        self._seen.write()
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


def _pending(segments: list[tuple[OpenShard, list[bytes]]], shard: OpenShard) -> int:
    return sum(len(lines) for s, lines in segments if s is shard)
