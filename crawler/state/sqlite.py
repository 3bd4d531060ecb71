"""The job's state in one SQLite file (WAL): targets, credit ledger, shards, runs; one process.

One transaction per commit batch holds the pages' target rows, the shard events and the writer's
file positions, so they move together; ``synchronous=FULL`` makes each commit durable before it
returns. All writes go through one thread, in order. Users may read the file while a run goes on
(``sqlite3 out/state/state.db "select status, count(*) from targets group by 1"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import operator
import os
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import orjson

from crawler.errors import OutputError, StateError
from crawler.output.layout import Layout, hold, shard_owner
from crawler.sources import Source, SourceTarget
from crawler.state import rules
from crawler.state.events import (
    WALKABLE,
    Commit,
    Finish,
    PageCommitted,
    ShardOpened,
    Status,
    WriterPosition,
)
from crawler.state.model import (
    COLUMNS,
    Claimed,
    Ledger,
    SeriesState,
    ShardInfo,
    Sums,
    TargetState,
    Totals,
    series_listed,
)
from crawler.state.verdict import MISSING_SQL, VERDICTS, Verdict
from crawler.targets import Target, TargetList

VERSION = 5
_CLAIM_BATCH = 256  # rows read per query while handing out targets
_T = TypeVar("_T")

# version 5: sources (their targets' walks, in a target's columns: ``COLUMNS``), the
# endpoints' own shard series, found targets
SOURCES_SCHEMA = """
CREATE TABLE source_targets (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    max_pages INTEGER,
    active INTEGER NOT NULL DEFAULT 1,
    found INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'pending',
    finish TEXT,
    cursor,
    walk INTEGER NOT NULL DEFAULT 0,
    walk_pages INTEGER NOT NULL DEFAULT 0,
    walk_new INTEGER NOT NULL DEFAULT 0,
    walk_goal INTEGER,
    walk_credits INTEGER NOT NULL DEFAULT 0,
    walk_expected INTEGER,
    walk_count INTEGER,
    base_count INTEGER,
    pages INTEGER NOT NULL DEFAULT 0,
    items INTEGER NOT NULL DEFAULT 0,
    records INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    credits INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    rate_limited INTEGER NOT NULL DEFAULT 0,
    seconds REAL NOT NULL DEFAULT 0,
    review_count INTEGER,
    reason TEXT,
    walk_shown INTEGER NOT NULL DEFAULT 0,
    seen INTEGER,
    verdict TEXT,
    UNIQUE (source, key)
);
CREATE TABLE series (
    name TEXT PRIMARY KEY,
    next_shard INTEGER NOT NULL DEFAULT 1,
    open_shard TEXT,
    shard_bytes INTEGER NOT NULL DEFAULT 0,
    shard_records INTEGER NOT NULL DEFAULT 0,
    seen INTEGER NOT NULL DEFAULT 0,
    seen_other INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE series_shards (
    seq INTEGER PRIMARY KEY,
    series TEXT NOT NULL,
    file TEXT NOT NULL UNIQUE,
    records INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
"""

SCHEMA = (
    """
CREATE TABLE job (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL,
    output TEXT NOT NULL,
    runs INTEGER NOT NULL DEFAULT 0,
    leased INTEGER NOT NULL DEFAULT 0,
    credits INTEGER NOT NULL DEFAULT 0,
    outstanding INTEGER NOT NULL DEFAULT 0,
    forfeited INTEGER NOT NULL DEFAULT 0,
    next_shard INTEGER NOT NULL DEFAULT 1,
    open_shard TEXT,
    shard_bytes INTEGER NOT NULL DEFAULT 0,
    shard_records INTEGER NOT NULL DEFAULT 0,
    seen INTEGER NOT NULL DEFAULT 0,
    seen_other INTEGER NOT NULL DEFAULT 0,
    targets_digest TEXT,
    refresh INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE targets (
    id INTEGER PRIMARY KEY,
    product_id TEXT NOT NULL,
    region TEXT NOT NULL,
    max_pages INTEGER,
    active INTEGER NOT NULL DEFAULT 1,
    status TEXT NOT NULL DEFAULT 'pending',
    finish TEXT,
    cursor,
    walk INTEGER NOT NULL DEFAULT 0,
    walk_pages INTEGER NOT NULL DEFAULT 0,
    walk_new INTEGER NOT NULL DEFAULT 0,
    walk_goal INTEGER,
    walk_credits INTEGER NOT NULL DEFAULT 0,
    walk_expected INTEGER,
    walk_count INTEGER,
    base_count INTEGER,
    pages INTEGER NOT NULL DEFAULT 0,
    items INTEGER NOT NULL DEFAULT 0,
    records INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    credits INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    rate_limited INTEGER NOT NULL DEFAULT 0,
    seconds REAL NOT NULL DEFAULT 0,
    review_count INTEGER,
    reason TEXT,
    walk_shown INTEGER NOT NULL DEFAULT 0,
    seen INTEGER,
    verdict TEXT,
    found_by TEXT,
    UNIQUE (product_id, region)
);
CREATE TABLE shards (
    seq INTEGER PRIMARY KEY,
    file TEXT NOT NULL UNIQUE,
    records INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    sha256 TEXT NOT NULL
);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    finished_at REAL,
    refresh INTEGER,
    exit_status INTEGER,
    stop_reason TEXT,
    stop_message TEXT,
    requests INTEGER,
    retries INTEGER,
    rate_limited INTEGER,
    rate_limit_episodes INTEGER
);
CREATE TABLE refreshes (
    id INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    mode TEXT NOT NULL,
    targets INTEGER NOT NULL DEFAULT 0,
    probed INTEGER NOT NULL DEFAULT 0,
    changed INTEGER NOT NULL DEFAULT 0,
    new_reviews INTEGER NOT NULL DEFAULT 0,
    credits INTEGER NOT NULL DEFAULT 0,
    pages INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    short INTEGER NOT NULL DEFAULT 0,
    by_plan INTEGER NOT NULL DEFAULT 0
);
"""
    + SOURCES_SCHEMA
)

_STATE_COLUMNS = ", ".join(COLUMNS)
_UPDATE_TARGET = f"UPDATE targets SET {', '.join(f'{c} = ?' for c in COLUMNS[1:])} WHERE id = ?"  # noqa: S608 -- column names are ours
_UPDATE_SOURCE = _UPDATE_TARGET.replace("UPDATE targets", "UPDATE source_targets", 1)
_row_of: Callable[[TargetState], tuple[Any, ...]] = operator.attrgetter(*COLUMNS[1:], "id")
_SUMS = (
    "count(*), sum(pages), sum(items), sum(records), sum(duplicates), sum(credits), "
    "sum(retries), sum(rate_limited), sum(seconds), count(walk_expected), sum(walk_expected), "
    "sum(CASE WHEN status != 'done' THEN max(0, walk_expected - walk_pages) ELSE 0 END), "
    + ", ".join(f"sum(verdict = '{v}')" for v in VERDICTS)
    + f", sum({MISSING_SQL}), sum(review_count), "
    "sum(CASE WHEN review_count IS NOT NULL THEN records ELSE 0 END)"
    ", sum(walk_pages > 0)"
)


def state_of(row: tuple[Any, ...]) -> TargetState:
    """A TargetState from a row of ``SELECT {COLUMNS} FROM targets``."""
    t = TargetState(*row)
    t.status = Status(t.status)
    t.finish = Finish(t.finish) if t.finish else None
    t.verdict = Verdict(t.verdict) if t.verdict else None
    return t


class SqliteStore:
    """State of one job in ``state/state.db``, locked to one process (flock on ``state/lock``)."""

    def __init__(self, layout: Layout, db: sqlite3.Connection, lock_fd: int) -> None:
        self.layout = layout
        self._db = db
        self._lock_fd = lock_fd
        # one thread, first in first out: commits and leases are durable in the order made
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state")
        job = _job_row(db)
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
        self._series = _series_of(db)

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
        lock_fd = _lock(layout)
        try:
            if fresh:
                layout.remove_job_files()
            db = await asyncio.to_thread(_connect, layout, output)
            await asyncio.to_thread(_forfeit, db, layout.state_db)
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
            # a target no longer in the job file is kept (with what it harvested) but inactive:
            # never walked, never counted, until the file lists it again
            # a target a source found stays: the job file never listed it
            self._db.execute("UPDATE targets SET active = 0 WHERE active AND found_by IS NULL")
            self._db.executemany(
                "INSERT INTO targets (product_id, region, max_pages) VALUES (?, ?, ?) "
                "ON CONFLICT (product_id, region) DO UPDATE SET active = 1, "
                "max_pages = excluded.max_pages",
                targets.rows(),
            )
            # rules.configured changes only targets with a cap, or whose walk ended at one
            self._update_where(
                "active AND (max_pages IS NOT NULL OR finish = 'cap')",
                rules.configured,
            )
            self._db.execute("UPDATE job SET targets_digest = ?", (digest,))

    def _update_where(
        self,
        where: str,
        change: Callable[[TargetState, int | None], bool],
        *args: Any,
        table: str = "targets",
    ) -> int:
        """Apply ``change`` to the state of every target matching ``where`` (inside a
        transaction); the number changed. Source targets are in no total nor refresh."""
        rows = self._db.execute(
            f"SELECT max_pages, {_STATE_COLUMNS} FROM {table} WHERE {where}",  # noqa: S608 -- ours
            args,
        ).fetchall()
        changed: list[TargetState] = []
        delta = rules.Delta()
        for row in rows:
            state, cap = state_of(row[1:]), row[0]

            def rule(s: TargetState, cap: int | None = cap) -> bool:
                return change(s, cap)

            if rules.changed(state, rule, delta):
                changed.append(state)
        if table != "targets":
            self._db.executemany(_UPDATE_SOURCE, map(_row_of, changed))
            return len(changed)
        self._db.executemany(_UPDATE_TARGET, map(_row_of, changed))
        self._count_refreshes(delta)
        return len(changed)

    def _count_refreshes(self, delta: rules.Delta) -> None:
        for refresh, figures in delta.refreshes.items():
            names = [n for n in rules.REFRESH_FIGURES if figures[n]]
            if names:
                self._db.execute(
                    f"UPDATE refreshes SET {', '.join(f'{n} = {n} + ?' for n in names)} "  # noqa: S608 -- ours
                    "WHERE id = ?",
                    [*(figures[n] for n in names), refresh],
                )

    def _apply(self, rule: rules.Rule) -> int:
        """A rule over every active target of the statuses it changes, sources' too."""
        marks = ", ".join("?" * len(rule.statuses))
        where = f"active AND status IN ({marks})"
        self._update_where(
            where, lambda state, _cap: rule(state), *rule.statuses, table="source_targets"
        )
        return self._update_where(where, lambda state, _cap: rule(state), *rule.statuses)

    async def sync_sources(self, sources: tuple[Source, ...]) -> None:
        """Make the job's sources' targets the active ones (a few hundred rows: every run)."""
        self._sources = {s.name: s for s in sources}
        await self._run(self._sync_sources, sources)

    def _sync_sources(self, sources: tuple[Source, ...]) -> None:
        with self._transaction():
            self._db.execute("UPDATE source_targets SET active = 0 WHERE active")
            self._db.executemany(
                "INSERT INTO source_targets (source, key) VALUES (?, ?) "
                "ON CONFLICT (source, key) DO UPDATE SET active = 1",
                ((s.name, t.key) for s in sources for t in s.targets),
            )

    async def begin_run(self, *, refresh: bool, mode: str, probe: bool = False) -> int:
        """Count a new run; with ``refresh``, start a refresh unless one is still under way.
        Returns the refresh the run works on (0: none)."""
        started = time.time()
        self.refresh = await self._run(self._begin, started, refresh, mode, probe)
        if self.totals.count(Status.BUDGET) or refresh:
            self.totals = await self._run(totals_of, self._db)
        return self.refresh

    def _begin(self, started: float, refresh: bool, mode: str, probe: bool) -> int:
        db = self._db
        current = self.refresh
        with self._transaction():
            self._apply(rules.BUDGET_REOPENED)
            under_way = self._refresh_open(current)
            row = db.execute("SELECT by_plan FROM refreshes WHERE id = ?", (current,)).fetchone()
            by_plan = bool(row and row[0])
            walked = rules.refresh_to_walk(
                current, asked=refresh, under_way=under_way, by_plan=by_plan
            )
            if walked != current:
                current = walked
                db.execute(
                    "INSERT INTO refreshes (id, started_at, mode, by_plan) VALUES (?, ?, ?, ?)",
                    (current, started, mode, int(probe)),
                )
                self._apply(rules.refresh_started(current))
                under_way = True
            elif by_plan and not probe:  # a run walks it now: the next --refresh is a new one
                db.execute("UPDATE refreshes SET by_plan = 0 WHERE id = ?", (current,))
                under_way = under_way or refresh
            db.execute("UPDATE job SET runs = runs + 1, refresh = ?", (current,))
            cursor = db.execute(
                "INSERT INTO runs (started_at, refresh) VALUES (?, ?)",
                (started, current if under_way else None),
            )
            self._run_id = cursor.lastrowid
        return current

    def _refresh_open(self, refresh: int) -> bool:
        if refresh == 0:
            return False
        row = self._db.execute(
            "SELECT 1 FROM targets WHERE active AND walk = ? AND status IN ('pending', "
            "'stopped_budget') UNION ALL SELECT 1 FROM source_targets WHERE active AND walk = ? "
            "AND status IN ('pending', 'stopped_budget') LIMIT 1",
            (refresh, refresh),
        ).fetchone()
        return row is not None

    async def end_run(self, info: dict[str, Any], *, budget_stopped: bool) -> None:
        """Record how the run ended; a job-wide budget stop leaves its pending targets
        ``stopped_budget`` until a run with a larger budget."""
        await self._run(self._end, info, budget_stopped)
        if budget_stopped:
            self.totals = await self._run(totals_of, self._db)

    def _end(self, info: dict[str, Any], budget_stopped: bool) -> None:
        with self._transaction():
            if budget_stopped:
                self._apply(rules.BUDGET_STOPPED)
            # a clean end: every credit leased and not given back went out with a request
            self._db.execute("UPDATE job SET outstanding = 0")
            names = list(info)
            self._db.execute(
                f"UPDATE runs SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",  # noqa: S608 -- names are ours
                [*(info[n] for n in names), self._run_id],
            )

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
        rows = self._db.execute(
            f"SELECT product_id, region, max_pages, {_STATE_COLUMNS} FROM targets "  # noqa: S608 -- column names are ours
            "WHERE id > ? AND active AND status IN (?, ?, ?) ORDER BY id LIMIT ?",
            (self._after, *WALKABLE, _CLAIM_BATCH),
        ).fetchall()
        if rows:
            self._after = rows[-1][3]
        return [Claimed(Target(r[0], r[1], r[2]), state_of(r[3:])) for r in rows]

    def _source_batch(self) -> list[Claimed]:
        rows = self._db.execute(
            f"SELECT source, key, {_STATE_COLUMNS} FROM source_targets "  # noqa: S608 -- ours
            "WHERE active AND status IN (?, ?, ?) ORDER BY id",
            WALKABLE,
        ).fetchall()
        claimed = []
        for source, key, *state in rows:
            if source in self._sources:
                target = SourceTarget(source, tuple(sorted(orjson.loads(key).items())))
                claimed.append(Claimed(target, state_of(tuple(state))))  # type: ignore[arg-type]  # a source target walks as a Target does (Fields)
        return claimed

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
        series = self.series(name)
        if isinstance(event, ShardOpened):
            series = replace(
                series, open_shard=ShardInfo(event.file), next_shard=series.next_shard + 1
            )
        else:
            sealed = ShardInfo(event.file, event.records, event.bytes, event.sha256)
            series = replace(series, open_shard=None, sealed=(*series.sealed, sealed))
        self._series[name] = series

    def _write_sources(self, batch: Commit, sources: dict[int, TargetState]) -> int:
        """The source pages' targets, their found targets, the series' shards and positions
        (in the commit's transaction); the targets added."""
        db = self._db
        added = 0
        for page in batch.sources:
            found = rules.found(page)
            source = self._db.execute(
                "SELECT source FROM source_targets WHERE id = ?", (page.change.target_id,)
            ).fetchone()[0]
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO targets (product_id, region, found_by) VALUES (?, ?, ?)",
                ((p, r, source) for p, r in found),
            )
            new = db.total_changes - before
            added += new
            # one the job file lists is the source's too: it stays when the file drops it
            db.executemany(
                "UPDATE targets SET found_by = ? WHERE product_id = ? AND region = ? "
                "AND found_by IS NULL AND active",
                ((source, p, r) for p, r in found),
            )
            db.execute(
                "UPDATE source_targets SET found = found + ? WHERE id = ?",
                (new, page.change.target_id),
            )
        db.executemany(_UPDATE_SOURCE, map(_row_of, sources.values()))
        for shard in batch.series_shards:
            db.execute("INSERT OR IGNORE INTO series (name) VALUES (?)", (shard.series,))
            done = shard.event
            if isinstance(done, ShardOpened):
                db.execute(
                    "UPDATE series SET open_shard = ?, next_shard = next_shard + 1 WHERE name = ?",
                    (done.file, shard.series),
                )
            else:
                db.execute(
                    "INSERT INTO series_shards (series, file, records, bytes, sha256) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (shard.series, done.file, done.records, done.bytes, done.sha256),
                )
                db.execute("UPDATE series SET open_shard = NULL WHERE name = ?", (shard.series,))
        for name, p in batch.series_positions.items():
            db.execute("INSERT OR IGNORE INTO series (name) VALUES (?)", (name,))
            db.execute(
                "UPDATE series SET shard_bytes = ?, shard_records = ?, seen = ?, seen_other = ? "
                "WHERE name = ?",
                (p.shard_bytes, p.shard_records, p.seen, p.seen_other, name),
            )
        return added

    def _write(
        self,
        targets: list[TargetState],
        batch: Commit,
        delta: rules.Delta,
        sources: dict[int, TargetState],
    ) -> int:
        db = self._db
        with self._transaction():
            added = (
                self._write_sources(batch, sources)
                if batch.sources or batch.series_shards or batch.series_positions
                else 0
            )
            for event in batch.shards:
                if isinstance(event, ShardOpened):
                    db.execute(
                        "UPDATE job SET open_shard = ?, next_shard = next_shard + 1", (event.file,)
                    )
                else:
                    db.execute(
                        "INSERT INTO shards (file, records, bytes, sha256) VALUES (?, ?, ?, ?)",
                        (event.file, event.records, event.bytes, event.sha256),
                    )
                    db.execute("UPDATE job SET open_shard = NULL")
            db.executemany(_UPDATE_TARGET, map(_row_of, targets))
            self._count_refreshes(delta)
            credits = delta.credits + sum(p.change.credits for p in batch.sources)
            p = batch.position
            db.execute(
                "UPDATE job SET credits = credits + ?, outstanding = outstanding - ?, "
                "shard_bytes = ?, shard_records = ?, seen = ?, seen_other = ?",
                (credits, credits, p.shard_bytes, p.shard_records, p.seen, p.seen_other),
            )
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


def _connect(layout: Layout, output: dict[str, Any]) -> sqlite3.Connection:
    path = layout.state_db
    if not path.exists() and layout.old_snapshot.exists():
        raise StateError(
            f"{layout.old_snapshot}: state saved by an older crawler; finish the job with that "
            "version, or start over with --fresh"
        )
    created = not path.exists() or _never_begun(path)
    if created and layout.coordinated.exists():
        raise StateError(
            f"{layout.root}: holds a coordinated job's shards: its state is in Redis (run it "
            "with --redis URL), or use an empty output.dir"
        )
    if created and not layout.shard_files() and layout.series_files(None):
        raise StateError(
            f"{layout.shards_dir}: holds shards but no job state; use an empty output.dir"
        )
    if created and layout.shard_files():  # before any state exists: never theirs to cut
        advice = (
            "holds a coordinated job's shards: its state is in Redis (run it with --redis URL), "
            "or use an empty output.dir"
            if _coordinated(layout)
            else "holds shards but no job state; use an empty output.dir"
        )
        raise StateError(f"{layout.shards_dir}: {advice}")
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        if created:  # the schema and the job row in one transaction: a kill leaves neither
            db.executescript(f"BEGIN; {SCHEMA};")
            db.execute(
                "INSERT INTO job (id, version, output) VALUES (1, ?, ?)",
                (VERSION, orjson.dumps(output).decode()),
            )
            db.execute("COMMIT")
        job = _job_row(db)
    except sqlite3.Error as exc:
        raise _error(exc, path) from None
    if job["version"] in (2, 3):
        try:
            _migrate(db, job["version"])
            job = _job_row(db)
        except sqlite3.Error as exc:
            raise _error(exc, path) from None
    if job["version"] == 4:
        try:
            _migrate_to_sources(db)
            job = _job_row(db)
        except sqlite3.Error as exc:
            raise _error(exc, path) from None
    if job["version"] != VERSION:
        db.close()
        raise StateError(
            f"{path}: state version {job['version']}, this crawler reads version {VERSION}; "
            "start over with --fresh"
        )
    saved = orjson.loads(job["output"])
    if saved != output:
        db.close()
        changed = ", ".join(
            f"{k}={saved.get(k)!r}, now {output.get(k)!r}"
            for k in output
            if saved.get(k) != output.get(k)
        )
        raise StateError(
            f"{layout.root}: the output settings changed since this job started (saved "
            f"{changed}); put them back, or use another output.dir, or start over with --fresh"
        )
    return db


def _never_begun(path: Path) -> bool:
    """Whether ``path`` is a state file a kill left during a job's first start: no job row and
    no target (an empty file, or, from an earlier crawler, the schema without its job row).
    Such a file holds nothing of the job, so it is begun again rather than called unreadable;
    it is removed with its WAL, never read as a state."""
    try:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            names = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if names and not {"job", "targets"} <= names:
                return False  # not a file of ours: left for the error that names it
            if names and (
                db.execute("SELECT 1 FROM job").fetchone()
                or db.execute("SELECT 1 FROM targets LIMIT 1").fetchone()
            ):
                return False
        finally:
            db.close()
    except sqlite3.Error:
        return False  # unreadable: the connection that follows says so
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    return True


def _migrate(db: sqlite3.Connection, version: int) -> None:
    """Version 2 -> 3: the lease a crash forfeits, and each refresh's figures kept for good
    (worked out once from the targets, by ``rules.refresh_figures``). 3 -> 4: each target's
    verdict (``rules.VERDICTS_JUDGED``)."""
    figures = ", ".join(
        f"{n} INTEGER NOT NULL DEFAULT 0" for n in (*rules.REFRESH_FIGURES, "by_plan")
    )
    # one transaction (SQLite's ALTER TABLE is transactional): a kill leaves the old version whole
    db.execute("BEGIN IMMEDIATE")
    try:
        if version == 2:
            for column in (
                "outstanding INTEGER NOT NULL DEFAULT 0",
                "forfeited INTEGER NOT NULL DEFAULT 0",
            ):
                db.execute(f"ALTER TABLE job ADD COLUMN {column}")
            for column in figures.split(", "):
                db.execute(f"ALTER TABLE refreshes ADD COLUMN {column}")
        else:  # each refresh's targets found still short
            db.execute("ALTER TABLE refreshes ADD COLUMN short INTEGER NOT NULL DEFAULT 0")
        for column in ("walk_shown INTEGER NOT NULL DEFAULT 0", "seen INTEGER", "verdict TEXT"):
            db.execute(f"ALTER TABLE targets ADD COLUMN {column}")
        if version == 2:
            _count_old_refreshes(db)
        _judge_old_targets(db)
        db.execute("UPDATE job SET version = 4")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _judge_old_targets(db: sqlite3.Connection) -> None:
    rule = rules.VERDICTS_JUDGED
    marks = ", ".join("?" * len(rule.statuses))
    rows = db.execute(
        f"SELECT {_STATE_COLUMNS} FROM targets WHERE status IN ({marks})",  # noqa: S608 -- ours
        rule.statuses,
    ).fetchall()
    states = [state for state in map(state_of, rows) if rule(state)]
    db.executemany(_UPDATE_TARGET, map(_row_of, states))


def _migrate_to_sources(db: sqlite3.Connection) -> None:
    """Version 4 -> 5: sources, the endpoints' series, and which source found a target; one
    transaction (a kill leaves version 4 whole)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("ALTER TABLE targets ADD COLUMN found_by TEXT")
        for statement in SOURCES_SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute("UPDATE job SET version = 5")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _series_of(db: sqlite3.Connection) -> dict[str, SeriesState]:
    series = {}
    for name, next_shard, open_shard, size, records, seen, other in db.execute(
        "SELECT name, next_shard, open_shard, shard_bytes, shard_records, seen, seen_other "
        "FROM series"
    ):
        sealed = tuple(
            ShardInfo(*row)
            for row in db.execute(
                "SELECT file, records, bytes, sha256 FROM series_shards WHERE series = ? "
                "ORDER BY seq",
                (name,),
            )
        )
        series[name] = SeriesState(
            name,
            WriterPosition(size, records, seen, other),
            ShardInfo(open_shard, records, size) if open_shard else None,
            next_shard,
            sealed,
        )
    return series


def _count_old_refreshes(db: sqlite3.Connection) -> None:
    rows = db.execute(f"SELECT walk, {_STATE_COLUMNS} FROM targets WHERE active AND walk > 0")  # noqa: S608 -- ours
    sums: dict[int, Counter[str]] = {}
    for row in rows:
        sums.setdefault(row[0], Counter()).update(rules.refresh_figures(state_of(row[1:])))
    for refresh, counted in sums.items():
        db.execute(
            f"UPDATE refreshes SET {', '.join(f'{n} = ?' for n in rules.REFRESH_FIGURES)} "  # noqa: S608 -- ours
            "WHERE id = ?",
            [*(counted[n] for n in rules.REFRESH_FIGURES), refresh],
        )


def _forfeit(db: sqlite3.Connection, path: Path) -> None:
    """The lease of a run that ended without giving it back (a crash) counts as forfeited."""
    (outstanding,) = db.execute("SELECT outstanding FROM job").fetchone()
    if outstanding:
        ledger = Ledger()
        rules.crashed(ledger, outstanding)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "UPDATE job SET forfeited = forfeited + ?, outstanding = 0", (ledger.forfeited,)
            )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _error(exc, path) from None


def _job_row(db: sqlite3.Connection) -> dict[str, Any]:
    cursor = db.execute("SELECT * FROM job WHERE id = 1")
    row = cursor.fetchone()
    if row is None:
        raise sqlite3.DatabaseError("the job row is missing")
    return {d[0]: v for d, v in zip(cursor.description, row, strict=True)}


def totals_of(db: sqlite3.Connection) -> Totals:
    """Every active target's figures, summed by status: one pass over the table."""
    totals = Totals()
    query = f"SELECT status, {_SUMS} FROM targets WHERE active GROUP BY status"  # noqa: S608 -- ours
    for status, *figures in db.execute(query):
        totals.by_status[Status(status)] = Sums(*(f or 0 for f in figures))
    return totals


def _error(exc: sqlite3.Error, path: Path) -> Exception:
    """A full disk or a read-only folder is an output problem; anything else, bad state."""
    text = str(exc)
    for words, code in _OUTPUT_ERRORS:
        if isinstance(exc, sqlite3.OperationalError) and words in text:
            if code == errno.EROFS and _read_only_file(path):  # not its file system
                return OutputError(
                    f"{path}: cannot write: the file is read-only; make it writable (chmod u+w "
                    f"{path}), then run the same command again: the state is saved",
                    path=str(path),
                )
            return OutputError.from_os(OSError(code, os.strerror(code)), path)
    return StateError(f"{path}: unreadable state ({text}); start over with --fresh")


def _read_only_file(path: Path) -> bool:
    try:
        return not path.stat().st_mode & 0o200
    except OSError:
        return False


# sqlite3 reports errno only as words in its message
_OUTPUT_ERRORS = (
    ("full", errno.ENOSPC),
    ("readonly", errno.EROFS),
    ("disk I/O", errno.EIO),
    ("unable to open", errno.EACCES),
)


def _lock(layout: Layout) -> int:
    fd = hold(layout.lock)
    if fd is None:
        raise StateError(f"{layout.root}: another crawler is running this job")
    return fd


class SqliteView:
    """A job's saved state, read-only: for status, plan and the run report, beside a run or not
    (WAL lets readers and the one writer go on together)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.job = _job_row(db)
        self.walking = False  # one process stores its own stopped_budget at a budget stop
        self.budget_stopped = False

    @classmethod
    def open(cls, layout: Layout) -> SqliteView | None:
        """None before the job's first run."""
        if not layout.state_db.exists():
            if layout.old_snapshot.exists():
                raise StateError(f"{layout.old_snapshot}: state saved by an older crawler")
            return None
        try:
            db = sqlite3.connect(
                f"file:{layout.state_db}?mode=ro", uri=True, check_same_thread=False
            )
            return cls(db)
        except sqlite3.Error as exc:
            raise _error(exc, layout.state_db) from None

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.job["leased"], self.job["credits"], self.job["forfeited"])

    def totals(self) -> Totals:
        return totals_of(self._db)

    def shards(self) -> list[ShardInfo]:
        query = "SELECT file, records, bytes, sha256 FROM shards ORDER BY seq"
        return [ShardInfo(*row) for row in self._db.execute(query)]

    def last_run(self) -> dict[str, Any] | None:
        runs = self._dicts("SELECT * FROM runs ORDER BY id DESC LIMIT 1", ())
        return runs[0] if runs else None

    def refreshes(self) -> list[dict[str, Any]]:
        """Per refresh: targets it covered, how many changed, new reviews, credits, pages
        (``rules.refresh_figures``, kept as they happened: a later refresh changes none)."""
        return self._dicts(
            f"SELECT id AS refresh, mode, started_at, {', '.join(rules.REFRESH_FIGURES)} "  # noqa: S608 -- ours
            "FROM refreshes ORDER BY id",
            (),
        )

    def attention(self, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` targets a person should look at: failed first, then those whose feed
        ended short of its count, then stopped at a credit cap, then walks under way."""
        rows: list[dict[str, Any]] = []
        for where in (
            "status = 'failed'",
            "status = 'done' AND verdict = 'short'",
            "status = 'stopped_budget' AND walk_pages > 0",
            "status = 'pending' AND walk_pages > 0",
        ):
            if len(rows) >= limit:
                break
            rows += self._dicts(
                f"SELECT *, {MISSING_SQL} AS missing FROM targets "  # noqa: S608 -- ours
                f"WHERE active AND {where} ORDER BY id LIMIT ?",
                (limit - len(rows),),
            )
        return rows

    def rows(self, columns: tuple[str, ...]) -> Iterator[tuple[Any, ...]]:
        """Every active target's ``columns``, in the order first listed; a million in a few
        seconds (seconds rounded to milliseconds)."""
        chosen = ", ".join(_SELECTED.get(c, c) for c in columns)
        yield from self._db.execute(
            f"SELECT {chosen} FROM targets WHERE active ORDER BY id"  # noqa: S608 -- ours
        )

    def sources(self) -> list[dict[str, Any]]:
        """Per source: its targets, those done, pages, products found, items, credits."""
        if self.job["version"] < 5:  # a state no run of this version has opened yet
            return []
        return self._dicts(
            "SELECT source, count(*) AS targets, sum(status = 'done') AS targets_done, "
            "sum(pages) AS pages, sum(found) AS products_found, sum(records) AS items, "
            "sum(credits) AS credits, sum(status = 'failed') AS failed "
            "FROM source_targets WHERE active GROUP BY source ORDER BY min(id)",
            (),
        )

    def _dicts(self, query: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        cursor = self._db.execute(query, args)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]

    def close(self) -> None:
        self._db.close()


_SELECTED = {"seconds": "round(seconds, 3)", "missing": MISSING_SQL}


def _coordinated(layout: Layout) -> bool:
    """Whether the folder's shards are a coordinated job's: named for their workers (every
    manifest has the same version now, so it cannot tell)."""
    return any(shard_owner(path.name) for path in layout.shard_files())
