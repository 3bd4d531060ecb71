"""A job's saved state as data: per-target state, totals by status, the ledger, shards.

``rules`` decides how each event changes these; a store (``sqlite``, the Redis store of the
coordinated mode) only keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Protocol

from crawler.state.events import Cursor, Finish, Status, WriterPosition
from crawler.state.verdict import Verdict, missing
from crawler.targets import Target

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
    # reviews the current walk's feed showed, each once: written, or met as another target's
    walk_shown: int = 0
    # the reviews the last finished walk accounted for (``verdict.seen_after``); None: not known
    seen: int | None = None
    verdict: Verdict | None = None  # the last walk's, once it ended (``verdict.judged``)


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
    complete: int = 0  # targets of each verdict
    short: int = 0
    capped: int = 0
    unknown: int = 0
    missing: int = 0  # reviews the short ones lack, summed
    said: int = 0  # review_count summed where the API gave one: the reviews it said exist
    said_records: int = 0  # reviews written for those targets
    started: int = 0  # targets whose current walk has a page (the rest have not started it)

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
        if t.verdict is not None:
            setattr(self, t.verdict, getattr(self, t.verdict) + sign)
            self.missing += sign * missing(t.verdict, t.base_count, t.seen)
        if t.review_count is not None:
            self.said += sign * t.review_count
            self.said_records += sign * t.records
        if t.walk_pages:
            self.started += sign
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
    forfeited: int = 0  # leased by processes that died holding them: maybe never sent


@dataclass(frozen=True, slots=True)
class SeriesState:
    """An endpoint's own shard series, as committed: its open shard, the writer's position in
    it and in its seen files, its sealed shards."""

    name: str
    position: WriterPosition = WriterPosition()  # noqa: RUF009 -- frozen: one shared is fine
    open_shard: ShardInfo | None = None
    next_shard: int = 1
    sealed: tuple[ShardInfo, ...] = ()


def series_listed(series: SeriesState) -> tuple[list[ShardInfo], list[ShardInfo]]:
    """A series as the manifest lists it: sealed shards, and the committed part of its open one."""
    opened = series.open_shard
    if opened is None:
        return list(series.sealed), []
    position = series.position
    return list(series.sealed), [
        ShardInfo(opened.file, position.shard_records, position.shard_bytes)
    ]
