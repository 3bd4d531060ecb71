"""A job's saved state as the run sees it: per-target state, totals, and the StateStore seam.

The store keeps what is committed: per target its status, cursor and counters; the job's credit
ledger; the shards; the writer's committed position. ``state_sqlite`` keeps it in one file for
one process; a shared store for several processes fits behind the same ``StateStore``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from crawler.events import (
    Commit,
    Cursor,
    Finish,
    PageCommitted,
    Status,
    TargetFailed,
    WriterPosition,
)
from crawler.targets import Target, TargetList

SUMMED = ("pages", "items", "records", "duplicates", "credits", "retries", "rate_limited")


@dataclass(slots=True)
class TargetState:
    """One target's committed state. A walk is one pass over its feed: the first harvest is walk
    0, refresh R is walk R; ``walk_*`` figures are the current walk's, the others cumulative."""

    id: int
    status: Status = Status.PENDING
    finish: Finish | None = None
    cursor: Cursor | None = None  # the next cursor to ask for; None: the first page
    walk: int = 0
    walk_pages: int = 0
    walk_new: int = 0
    walk_goal: int | None = None
    walk_credits: int = 0
    walk_expected: int | None = None  # pages the walk is expected to take in all, once known
    walk_count: int | None = None  # review_count on the walk's page 1: what it set out to see
    base_count: int | None = None  # walk_count of the last walk that finished
    pages: int = 0
    items: int = 0  # items received, duplicates included
    records: int = 0  # reviews written
    duplicates: int = 0
    credits: int = 0
    retries: int = 0
    rate_limited: int = 0
    seconds: float = 0.0
    review_count: int | None = None
    reason: str | None = None

    def apply(self, change: PageCommitted | TargetFailed) -> None:
        """The one place a target's state changes, in every store."""
        self.credits += change.credits
        self.walk_credits += change.credits
        self.retries += change.retries
        self.rate_limited += change.rate_limited
        self.status = change.status
        if isinstance(change, TargetFailed):
            self.reason = change.reason
            return
        self.reason = None
        self.finish = change.finish
        self.cursor = change.cursor
        if self.walk_pages == 0:
            self.walk_count = change.review_count
        self.walk_pages += 1
        self.walk_new += change.new
        self.pages += 1
        self.items += change.items
        self.records += change.new
        self.duplicates += change.duplicates
        self.seconds += change.seconds
        if change.review_count is not None:
            self.review_count = change.review_count
        if change.walk_goal is not None:
            self.walk_goal = change.walk_goal
        if change.expected is not None:
            self.walk_expected = change.expected
        if change.status is Status.DONE:
            # the count when the walk began, not when it ended: a review added meanwhile where
            # the walk had passed was not seen, and the next refresh must count it as new
            self.base_count = self.walk_count if self.walk_count is not None else self.review_count


COLUMNS = tuple(f.name for f in fields(TargetState))


@dataclass(slots=True)
class Sums:
    """Counters summed over the targets of one status."""

    count: int = 0
    pages: int = 0
    items: int = 0
    records: int = 0
    duplicates: int = 0
    credits: int = 0
    retries: int = 0
    rate_limited: int = 0
    seconds: float = 0.0
    expected_known: int = 0  # targets whose current walk's length is estimated
    expected: int = 0  # the estimates summed
    pages_left: int = 0  # their pages still to walk, summed

    def merge(self, other: Sums) -> None:
        for name in _SUMS_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def add(self, t: TargetState, sign: int = 1) -> None:
        self.count += sign
        self.pages += sign * t.pages
        self.items += sign * t.items
        self.records += sign * t.records
        self.duplicates += sign * t.duplicates
        self.credits += sign * t.credits
        self.retries += sign * t.retries
        self.rate_limited += sign * t.rate_limited
        self.seconds += sign * t.seconds
        if t.walk_expected is not None:
            self.expected_known += sign
            self.expected += sign * t.walk_expected
            if t.status is not Status.DONE:
                self.pages_left += sign * max(0, t.walk_expected - t.walk_pages)


_SUMS_FIELDS = tuple(f.name for f in fields(Sums))


@dataclass
class Totals:
    """Every active target's figures summed by status: exact, kept current by the store, so
    progress and status cost nothing per target."""

    by_status: dict[Status, Sums] = field(default_factory=lambda: {s: Sums() for s in Status})

    def add(self, t: TargetState, sign: int = 1) -> None:
        self.by_status[t.status].add(t, sign)

    @property
    def targets(self) -> int:
        return sum(s.count for s in self.by_status.values())

    def count(self, *statuses: Status) -> int:
        return sum(self.by_status[s].count for s in statuses)

    def total(self, name: str) -> float:
        return float(sum(getattr(s, name) for s in self.by_status.values()))


class Held(Protocol):
    """A lease on a target, as a walker sees it: ``lost`` once another process holds it."""

    lost: bool


@dataclass(frozen=True, slots=True)
class Claimed:
    """A target handed to a walker, with its state at that moment and the lease it holds."""

    target: Target
    saved: TargetState
    fence: int = 0
    lease: Held | None = None  # None: this process is the only one (no lease to lose)


@dataclass(frozen=True, slots=True)
class ShardInfo:
    file: str
    records: int = 0
    bytes: int = 0
    sha256: str | None = None


@dataclass(slots=True)
class Ledger:
    """The job's credits: ``leased`` may have been spent by requests, ``credits`` were
    attributed to targets by commits. Spent is at most ``leased`` and at least ``credits``."""

    leased: int = 0
    credits: int = 0


class StateStore(Protocol):
    """What a run needs of saved state. Every method that changes state returns once the change
    is durable; the one-process SQLite store and the Redis store of a coordinated job both fit
    behind it."""

    totals: Totals
    ledger: Ledger
    refresh: int  # the refresh the run works on; 0: none
    runs: int

    @property
    def position(self) -> WriterPosition:
        """The writer's committed position: files past it are a crash's leftovers."""

    @property
    def open_shard(self) -> ShardInfo | None: ...

    @property
    def next_shard(self) -> int: ...

    @property
    def shard_prefix(self) -> str:
        """How this store's shard files are named: ``reviews-`` + (worker + ``-``) + number."""

    def shards(self) -> list[ShardInfo]:
        """This store's sealed shards, in the order they were written."""

    async def manifest(self) -> tuple[list[ShardInfo], list[ShardInfo]]:
        """The job's sealed shards and the committed part of its open ones."""

    def holds(self, target_id: int) -> bool:
        """Whether this process still holds the target (a lease can be lost)."""

    async def sync_targets(self, targets: TargetList) -> bool:
        """Make the job's targets the saved ones; False when nothing changed."""

    async def begin_run(self, *, refresh: bool, mode: str) -> int:
        """Count a run (start a refresh when asked); the refresh it works on."""

    async def end_run(self, info: dict[str, Any], *, budget_stopped: bool) -> None:
        """Record how the run ended."""

    async def claim(self) -> Claimed | None:
        """The next target to walk, or None when there is none left for this process."""

    async def lease(self, credits: int, cost: int, ceiling: int) -> int:
        """Atomically take up to ``credits`` (a multiple of ``cost``) while the job's leased
        credits stay within ``ceiling``; the credits taken, 0 when not even ``cost`` fits."""

    async def give_back(self, credits: int) -> None:
        """Return leased credits no request used (a clean stop)."""

    async def commit(self, batch: Commit) -> list[TargetState]:
        """Apply one batch atomically and durably; the targets it brought to a final status."""

    async def maintain(self) -> None:
        """Upkeep while a run goes on (renewing leases, for a shared store); raises when the
        run cannot go on; returns when there is nothing to do."""

    async def close(self) -> None: ...


class StateView(Protocol):
    """A job's saved state read for status and reports: the SQLite file or Redis."""

    job: dict[str, Any]  # runs, open_shard
    # walks under way in other processes, whose leased credits may still walk pending targets
    walking: bool

    @property
    def ledger(self) -> Ledger: ...

    def totals(self) -> Totals: ...

    def shards(self) -> list[ShardInfo]: ...

    def refreshes(self) -> list[dict[str, Any]]: ...

    def attention(self, limit: int) -> list[dict[str, Any]]: ...

    def rows(self, columns: tuple[str, ...]) -> Iterator[tuple[Any, ...]]: ...

    def last_run(self) -> dict[str, Any] | None: ...

    def close(self) -> None: ...
