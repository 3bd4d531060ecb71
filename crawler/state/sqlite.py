"""The job's state in one SQLite file (WAL): targets, credit ledger, shards, runs; one process.

One transaction per commit batch holds the pages' target rows, the shard events and the writer's
file positions, so they move together; ``synchronous=FULL`` makes each commit durable before it
returns. All writes go through one thread, in order. Users may read the file while a run goes on
(``sqlite3 out/state/state.db "select status, count(*) from targets group by 1"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from crawler.errors import OutputError
from crawler.output.layout import Layout
from crawler.sources import Source
from crawler.state import commits, rules, runs, table
from crawler.state.connection import connect, error_of, forfeit, lock
from crawler.state.events import Commit, PageCommitted, ShardOpened, Status, WriterPosition
from crawler.state.model import Claimed, Ledger, SeriesState, ShardInfo, TargetState, series_listed
from crawler.state.schema import SCHEMA, SOURCES_SCHEMA, VERSION, job_row, state_of
from crawler.state.sources import (
    series_moved,
    series_of,
    source_batch,
    sync_sources,
)
from crawler.state.table import totals_of
from crawler.state.view import SqliteView
from crawler.targets import Target, TargetList

# the crawler, its tests and the benchmark import these from here, where they were first
__all__ = [
    "SCHEMA",
    "SOURCES_SCHEMA",
    "VERSION",
    "SqliteStore",
    "SqliteView",
    "_error",
    "state_of",
    "totals_of",
]

_T = TypeVar("_T")
_error = error_of  # by its old name: the tests import it from here


class SqliteStore:
    """State of one job in ``state/state.db``, locked to one process (flock on ``state/lock``)."""

    def __init__(self, layout: Layout, db: sqlite3.Connection, lock_fd: int) -> None:
        self.layout = layout
        self._db = db
        self._lock_fd = lock_fd
        # one thread, first in first out: commits and leases are durable in the order made
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state")
        job = job_row(db)
        self.ledger = Ledger(job["leased"], job["credits"], job["forfeited"])
        self.refresh: int = job["refresh"]
        self._next_shard: int = job["next_shard"]
        self._open_shard = (
            ShardInfo(job["open_shard"], job["shard_records"], job["shard_bytes"])
            if job["open_shard"]
            else None
        )
        self._position = WriterPosition(
            job["shard_bytes"], job["shard_records"], job["seen"], job["seen_other"]
        )
        self._digest: str | None = job["targets_digest"]
        self._shards = [
            ShardInfo(*row)
            for row in db.execute("SELECT file, records, bytes, sha256 FROM shards ORDER BY seq")
        ]
        self.totals = totals_of(db)
        self._live: dict[int, TargetState] = {}  # handed to walkers, until a final commit
        self._queue: deque[Claimed] = deque()
        self._after = 0  # the last target id handed out
        self._drained = False
        self._run_id: int | None = None
        self._sources: dict[str, Source] = {}
        self._source_queue: deque[Claimed] | None = None  # read at the first claim
        self._live_sources: dict[int, TargetState] = {}
        self.found = asyncio.Event()  # set at each commit of a source page
        self._loading = asyncio.Lock()
        self._series = series_of(db)

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, layout: Layout, output: dict[str, Any], *, fresh: bool = False
    ) -> SqliteStore:
        """Lock the job, open its state (or start one) and check it fits ``output``.

        ``fresh`` first removes every file the job wrote, under the lock, so never under a
        crawler that is still running it.
        """
        try:
            layout.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError.from_os(exc, layout.state_dir) from None
        lock_fd = lock(layout)
        try:
            if fresh:
                layout.remove_job_files()
            db = await asyncio.to_thread(connect, layout, output)
            await asyncio.to_thread(forfeit, db, layout.state_db)
            return cls(layout, db, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    # -- what the run reads --------------------------------------------------------------------

    @property
    def position(self) -> WriterPosition:
        return self._position

    @property
    def open_shard(self) -> ShardInfo | None:
        return self._open_shard

    @property
    def next_shard(self) -> int:
        return self._next_shard

    @property
    def shard_prefix(self) -> str:
        return "reviews-"

    def shards(self) -> list[ShardInfo]:
        return list(self._shards)

    async def manifest(self) -> tuple[list[ShardInfo], list[ShardInfo]]:
        return self.shards(), [self._open_shard] if self._open_shard else []

    async def series_manifest(self) -> dict[str, tuple[list[ShardInfo], list[ShardInfo]]]:
        return {name: series_listed(state) for name, state in sorted(self._series.items())}

    def holds(self, target_id: int) -> bool:
        return True  # one process: nobody can take a target over

    def series(self, name: str) -> SeriesState:
        """An endpoint's shard series as committed (a new one: empty)."""
        return self._series.get(name) or SeriesState(name)

    @property
    def finding(self) -> bool:
        """A source walk is under way: its pages may still add targets to walk."""
        return bool(self._live_sources) or bool(self._source_queue)

    # -- the run's life ------------------------------------------------------------------------

    async def sync_targets(self, targets: TargetList) -> bool:
        """Make the job's targets the active ones; False when they are unchanged since the last
        run (then this costs nothing, whatever their number)."""
        digest = targets.digest()
        if digest == self._digest:
            return False
        await self._run(self._sync, targets, digest)
        self._digest = digest
        self.totals = await self._run(totals_of, self._db)
        return True

    def _sync(self, targets: TargetList, digest: str) -> None:
        with self._transaction():
            table.sync(self._db, targets, digest)

    async def sync_sources(self, sources: tuple[Source, ...]) -> None:
        """Make the job's sources' targets the active ones (a few hundred rows: every run)."""
        self._sources = {s.name: s for s in sources}
        await self._run(self._sync_sources, sources)

    def _sync_sources(self, sources: tuple[Source, ...]) -> None:
        with self._transaction():
            sync_sources(self._db, sources)

    async def begin_run(self, *, refresh: bool, mode: str, probe: bool = False) -> int:
        """Count a new run; with ``refresh``, start a refresh unless one is still under way.
        Returns the refresh the run works on (0: none)."""
        started = time.time()
        self.refresh = await self._run(self._begin, started, refresh, mode, probe)
        if self.totals.count(Status.BUDGET) or refresh:
            self.totals = await self._run(totals_of, self._db)
        return self.refresh

    def _begin(self, started: float, refresh: bool, mode: str, probe: bool) -> int:
        current = self.refresh
        with self._transaction():
            current, self._run_id = runs.begin(
                self._db, current, started, refresh=refresh, mode=mode, probe=probe
            )
        return current

    async def end_run(self, info: dict[str, Any], *, budget_stopped: bool) -> None:
        """Record how the run ended; a job-wide budget stop leaves its pending targets
        ``stopped_budget`` until a run with a larger budget."""
        await self._run(self._end, info, budget_stopped)
        if budget_stopped:
            self.totals = await self._run(totals_of, self._db)

    def _end(self, info: dict[str, Any], budget_stopped: bool) -> None:
        with self._transaction():
            runs.end(self._db, self._run_id, info, budget_stopped=budget_stopped)

    # -- targets -------------------------------------------------------------------------------

    async def claim(self) -> Claimed | None:
        """The next walkable active target, sources' first (what they find is walked next),
        then in the order targets were first listed (found ones after)."""
        if self._source_queue is None:
            async with self._loading:  # every worker claims at once at the start: read once
                if self._source_queue is None:
                    self._source_queue = deque(await self._run(self._source_batch))
        if self._source_queue:
            claimed = self._source_queue.popleft()
            self._live_sources[claimed.saved.id] = claimed.saved
            return claimed
        if not self._queue and not self._drained:
            self._queue.extend(await self._run(self._next_batch))
            self._drained = not self._queue
        if not self._queue:
            return None
        claimed = self._queue.popleft()
        self._live[claimed.saved.id] = claimed.saved
        return claimed

    def _next_batch(self) -> list[Claimed]:
        rows = table.walkable(self._db, self._after)
        if rows:
            self._after = rows[-1][3]
        return [Claimed(Target(r[0], r[1], r[2]), state_of(r[3:])) for r in rows]

    def _source_batch(self) -> list[Claimed]:
        return source_batch(self._db, self._sources)

    # -- credits -------------------------------------------------------------------------------

    async def lease(self, credits: int, cost: int, ceiling: int) -> int:
        return await self._run(self._lease, credits, cost, ceiling)

    async def give_back(self, credits: int) -> None:
        await self._run(self._lease, -credits, 1, None)

    def _lease(self, credits: int, cost: int, ceiling: int | None) -> int:
        """Read, check and add in one transaction, in the store's one thread: atomic."""
        with self._transaction():
            (leased,) = self._db.execute("SELECT leased FROM job").fetchone()
            size = credits if ceiling is None else rules.lease_size(leased, credits, cost, ceiling)
            if size == 0:
                return 0
            self._db.execute(
                "UPDATE job SET leased = ?, outstanding = outstanding + ?", (leased + size, size)
            )
        self.ledger.leased = leased + size
        return size

    # -- commits -------------------------------------------------------------------------------

    async def commit(self, batch: Commit) -> list[TargetState]:
        """Apply a batch; returns the targets it brought to a final status."""
        changed = {c.target_id: self._live[c.target_id] for c in batch.changes}
        delta = rules.committed(changed, batch.changes)
        sources = {
            p.change.target_id: self._live_sources[p.change.target_id] for p in batch.sources
        }
        rules.source_committed(sources, batch.sources)
        self.ledger.credits += sum(p.change.credits for p in batch.sources)
        for status, sums in delta.totals.by_status.items():
            self.totals.by_status[status].merge(sums)
        self.ledger.credits += delta.credits
        added = await self._run(self._write, list(changed.values()), batch, delta, sources)
        self._sources_committed(batch, sources, added)
        for event in batch.shards:
            if isinstance(event, ShardOpened):
                self._open_shard = ShardInfo(event.file)
                self._next_shard += 1
            else:
                self._shards.append(ShardInfo(event.file, event.records, event.bytes, event.sha256))
                self._open_shard = None
        self._position = batch.position
        finished = [t for t in changed.values() if t.status in rules.FINAL]
        for target in finished:
            del self._live[target.id]
        for change in batch.changes:  # a probe's targets stay pending: not held for the run
            if isinstance(change, PageCommitted) and change.last:
                self._live.pop(change.target_id, None)
        return finished

    def _sources_committed(
        self, batch: Commit, sources: dict[int, TargetState], added: int
    ) -> None:
        """What a commit of source pages changes of this store's memory."""
        if added:  # found targets, pending: counted, and claimed by this run
            for _ in range(added):
                self.totals.add(TargetState(0))
            self._drained = False
        for shard in batch.series_shards:
            self._series_moved(shard.series, shard.event)
        for name, position in batch.series_positions.items():
            self._series[name] = replace(self.series(name), position=position)
        last = {
            p.change.target_id
            for p in batch.sources
            if isinstance(p.change, PageCommitted) and p.change.last
        }
        for state in sources.values():
            if state.status in rules.FINAL or state.id in last:
                self._live_sources.pop(state.id, None)
        if batch.sources:
            self.found.set()

    def _series_moved(self, name: str, event: ShardOpened | Any) -> None:
        self._series[name] = series_moved(self.series(name), event)

    def _write(
        self,
        targets: list[TargetState],
        batch: Commit,
        delta: rules.Delta,
        sources: dict[int, TargetState],
    ) -> int:
        with self._transaction():
            added = commits.write(self._db, targets, batch, delta, sources)
        return added

    async def maintain(self) -> None:
        """One process, one file: nothing to keep up."""

    # -- plumbing ------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _error(exc, self.layout.state_db) from None

    async def close(self) -> None:
        await self._run(self._db.close)
        self._executor.shutdown(wait=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
