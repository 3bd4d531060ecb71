"""What the writer commits to the state, typed: page and failure changes, shard events, positions.

One batch of these is one commit: a store applies all of it atomically (one SQLite transaction,
one Redis script) or none of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

Cursor = int | str


class Status(StrEnum):
    """A target's status: the walker decides it, the store keeps it, everyone else reads it."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    BUDGET = "stopped_budget"  # at its own credit cap, or the job's budget ran out first


WALKABLE = (Status.PENDING, Status.FAILED, Status.BUDGET)  # a run walks these again


class Finish(StrEnum):
    """Why a walk ended done."""

    END = "end"  # the API said has_more: false
    CAP = "cap"  # the target's max_pages
    GOAL = "goal"  # a refresh found as many new reviews as the count grew by
    SAME = "same"  # a refresh's page 1: same count, no review unseen


@dataclass(slots=True)
class PageCommitted:
    """One page of one target, with its reviews written."""

    target_id: int
    fence: int  # the lease epoch it was fetched under (coordinated mode); 0 otherwise
    cursor: Cursor | None  # where this target's walk goes on from
    status: Status  # PENDING, or DONE when this page ends the walk
    finish: Finish | None
    items: int
    new: int
    duplicates: int
    credits: int
    retries: int
    rate_limited: int
    seconds: float
    review_count: int | None
    walk_goal: int | None  # set by page 1 of a refresh walk: new reviews it stops after
    expected: int | None  # pages the walk is expected to take in all, once page 1 tells
    # the page's new review ids, as the seen-set gave them (u64s; others one a line), for a store
    # that keeps the seen-set itself
    ids: bytes = b""
    other_ids: bytes = b""
    last: bool = False  # the walker walks this target no further in this run (plan --probe)
    # reviews on the page its walk had not met on an earlier page (None: every item counts)
    shown: int | None = None


@dataclass(slots=True)
class TargetFailed:
    """A target given up: its last tries' cost and the reason."""

    target_id: int
    fence: int
    reason: str
    credits: int
    retries: int
    rate_limited: int
    status: Status = Status.FAILED  # or BUDGET: stopped at its own credit cap


@dataclass(frozen=True, slots=True)
class ShardOpened:
    file: str


@dataclass(frozen=True, slots=True)
class ShardSealed:
    file: str
    records: int
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class WriterPosition:
    """How far the writer's files are committed: the open shard and the seen files."""

    shard_bytes: int = 0
    shard_records: int = 0
    seen: int = 0  # ids in seen.u64
    seen_other: int = 0  # bytes of seen-other.txt


@dataclass(slots=True)
class SourcePage:
    """A source target's page (or failure), with the review targets its items yield: committed
    with them, so a found product is never lost nor walked twice."""

    change: PageCommitted | TargetFailed  # target_id: the source target's id
    series: str  # the endpoint whose shard series its items went to
    found: list[tuple[str, str]] = field(default_factory=list)  # (product_id, region)


@dataclass(frozen=True, slots=True)
class SeriesShard:
    """A shard event of an endpoint's own series (``shop_products-000001.jsonl``)."""

    series: str
    event: ShardOpened | ShardSealed


@dataclass(slots=True)
class Commit:
    changes: list[PageCommitted | TargetFailed] = field(default_factory=list)
    shards: list[ShardOpened | ShardSealed] = field(default_factory=list)
    position: WriterPosition = WriterPosition()
    sources: list[SourcePage] = field(default_factory=list)
    series_shards: list[SeriesShard] = field(default_factory=list)
    series_positions: dict[str, WriterPosition] = field(default_factory=dict)
