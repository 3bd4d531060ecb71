"""A source endpoint's items: once each by item id, in a shard series of their own
(``shop_products-000001.jsonl``), committed with the source page and the targets it found.

Each series has its own seen-set (``state/seen-<name>.u64``) and its own committed position in
the state; the writer plans, writes and commits a series' segments in the same batch, the same
order (bytes fsynced, then the one transaction) as the reviews'. ``recover_series`` is the
series' crash step, the one ``recovery`` is for the reviews.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import orjson

from crawler import logs
from crawler.api.endpoint import Page
from crawler.errors import OutputError, StateError
from crawler.output.dedup import SeenLog, SeenSet
from crawler.output.layout import SERIES_PATTERN, Layout, series_owner, shard_name
from crawler.output.publisher import Segment
from crawler.output.recovery import truncate
from crawler.output.shards import OpenShard, compressor
from crawler.sources import Source, SourceTarget, found_targets, product_reader
from crawler.state import ShardInfo
from crawler.state.events import (
    PageCommitted,
    SeriesShard,
    ShardOpened,
    ShardSealed,
    SourcePage,
    TargetFailed,
    WriterPosition,
)
from crawler.state.model import SeriesState

if TYPE_CHECKING:
    from crawler.output.writer import Rendered, Writer

# crawler.logs, not structlog: its lines reach the command line's sink (console, JSON log,
# --log-file), a library caller's stdout gets none, and a run does not import structlog (rich)
log = logs.get_logger("crawler.writer")


@dataclass(slots=True)
class SeriesPlan:
    """A batch's segments of one series, its ids, planned ahead of writing."""

    ops: list[tuple[OpenShard, list[bytes]] | ShardOpened] = field(default_factory=list)
    ids: list[bytes] = field(default_factory=list)
    other_ids: list[bytes] = field(default_factory=list)


class Series:
    """One endpoint's shard series and its seen-set."""

    def __init__(
        self,
        layout: Layout,
        state: SeriesState,
        *,
        compression: str,
        shard_max_records: int,
        seen: SeenSet | None = None,
        owner: str | None = None,
    ) -> None:
        """``seen``: the series' seen-set when it is not this folder's seen files (a
        coordinated worker's, held in Redis); ``owner``: that worker, whose name its files bear."""
        self.name = state.name
        self._layout = layout
        if seen is None:
            ids, other = layout.series_seen(self.name)
            position = state.position
            seen = SeenLog(ids, other, position.seen, position.seen_other)
            seen.load()  # a listing's ids: thousands, not millions
        self._seen: SeenSet = seen
        self._prefix = f"{self.name}-{owner}-" if owner else f"{self.name}-"
        self._compression = compression
        self._compress = compressor(compression)
        self._max = shard_max_records
        self._shard = (
            OpenShard(layout.shard(state.open_shard.file), state.open_shard)
            if state.open_shard
            else None
        )
        self._plan_shard = self._shard
        self._plan_records = self._shard.records if self._shard else 0
        self._next = state.next_shard

    def render(
        self, target: SourceTarget, page: Page, fetched_at: str
    ) -> tuple[list[bytes], int, int]:
        """A page's new items as record lines; (lines, new, duplicates)."""
        shared = b',"source":%b,"target":%b,"fetched_at":%b,"item":' % (
            orjson.dumps(target.source),
            orjson.dumps(dict(target.fields)),
            orjson.dumps(fetched_at),
        )
        lines: list[bytes] = []
        dups = missing = 0
        add = self._seen.adder(self.name)
        for item_id, item in zip(page.ids, page.items, strict=True):
            if item_id is None:
                missing += 1
                continue
            if not add(item_id):
                dups += 1
                continue
            lines.append(b"".join((b'{"item_id":', orjson.dumps(item_id), shared, item, b"}\n")))
        if missing:
            log.warning("items without an id skipped", series=self.name, items=missing)
        return lines, len(lines), dups

    def take(self) -> tuple[bytes, bytes]:
        return self._seen.take()

    def plan(self, lines: list[bytes], into: SeriesPlan) -> None:
        """Split lines over this series' shards, opening new ones."""
        start = 0
        while start < len(lines):
            if self._plan_shard is None or self._plan_records >= self._max:
                name = shard_name(self._prefix, self._next, self._compression)
                self._next += 1
                self._plan_shard = OpenShard(self._layout.shard(name), ShardInfo(name))
                self._plan_records = 0
                into.ops.append(ShardOpened(name))
            segment = lines[start : start + self._max - self._plan_records]
            into.ops.append((self._plan_shard, segment))
            self._plan_records += len(segment)
            start += len(segment)

    def write(self, plan: SeriesPlan) -> tuple[list[SeriesShard], list[Segment]]:
        """Off the loop: the segments and ids written and fsynced; full shards sealed. Returns
        the shard events, and the segments written, for the publisher."""
        events: list[SeriesShard] = []
        segments: list[Segment] = []
        for op in plan.ops:
            if isinstance(op, ShardOpened):
                events.append(SeriesShard(self.name, op))
                continue
            shard, lines = op
            self._shard = shard
            data = self._compress(b"".join(lines))
            segments.append(Segment(shard.info.file, shard.bytes, data))
            shard.append(data, len(lines))
            if shard.records >= self._max:
                events.append(SeriesShard(self.name, shard.seal()))
                self._shard = None
        self._seen.write(b"".join(plan.ids), b"".join(plan.other_ids))
        return events, segments

    def position(self) -> WriterPosition:
        shard = self._shard
        return WriterPosition(
            shard.bytes if shard else 0,
            shard.records if shard else 0,
            self._seen.count,
            self._seen.other_bytes,
        )

    def finish(self) -> ShardSealed | None:
        """End of run: the open shard sealed (None when there is none with records)."""
        shard, self._shard = self._shard, None
        if shard is not None and shard.records > 0:
            return shard.seal()
        if shard is not None:
            shard.close()
        return None

    def close(self) -> None:
        if self._shard is not None:
            self._shard.close()
        self._seen.close()


class SourceSink:
    """What a source's walker hands its pages to (as a review walker hands them to the writer):
    items rendered into the series, the products they name made targets, both queued together."""

    def __init__(self, writer: Writer, series: Series, source: Source) -> None:
        self._writer = writer
        self._series = series
        self._source = source
        self._product: Callable[[bytes | msgspec.Raw], str | None] = product_reader(
            source.product_path
        )

    async def render(
        self, target: SourceTarget, page: Page, fetched_at: str, *, first_page: bool = False
    ) -> Rendered:
        from crawler.output.writer import Rendered  # noqa: PLC0415 -- writer imports this module

        await self._writer.loaded()
        lines, new, dups = self._series.render(target, page, fetched_at)
        ids, other = self._series.take()
        products = [p for item in page.items if (p := self._product(item)) is not None]
        if len(products) < len(page.items):
            log.warning(
                "items without a product id",
                source=self._source.name,
                items=len(page.items) - len(products),
            )
        rendered = Rendered(lines, ids, other, new, dups)
        rendered.found = found_targets(self._source, target, products)
        return rendered

    async def put(
        self, change: PageCommitted | TargetFailed, target: SourceTarget, rendered: Rendered | None
    ) -> None:
        found = (rendered.found or []) if rendered is not None else []
        await self._writer.put_source(SourcePage(change, self._series.name, found), rendered)


def recover_series(layout: Layout, state: SeriesState, owner: str | None = None) -> int:
    """A series' crash step: its open shard and seen files cut back to the committed lengths,
    its shard files no commit recorded removed; the bytes cut. ``owner``: the coordinated
    worker whose files these are (the others' are theirs; its seen-set is in Redis)."""
    known = {s.file for s in state.sealed} | (
        {state.open_shard.file} if state.open_shard else set()
    )
    for path in layout.series_files(state.name):
        if path.name in known or (owner is not None and series_owner(path.name) != owner):
            continue
        match = SERIES_PATTERN.fullmatch(path.name)
        if match is None or int(match["seq"]) < state.next_shard or match["worker"] != owner:
            raise StateError(
                f"{path}: a shard this job's state does not know; move it away or use "
                "another output.dir"
            )
        try:
            path.unlink()  # created by a batch whose commit never came
        except OSError as exc:
            raise OutputError.from_os(exc, path) from None
    cut = 0
    if state.open_shard is not None:
        cut += truncate(layout.shard(state.open_shard.file), state.position.shard_bytes)
    if owner is not None:
        return cut
    ids, other = layout.series_seen(state.name)
    cut += truncate(ids, state.position.seen * 8)
    cut += truncate(other, state.position.seen_other)
    return cut
