"""What a run needs of saved state (``StateStore``) and what status reads (``StateView``).

The one-process store (``sqlite``) and the Redis store of a coordinated job both fit behind it;
neither decides anything of the job: ``rules`` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from crawler.state.events import Commit, WriterPosition
from crawler.state.model import Claimed, Ledger, SeriesState, ShardInfo, TargetState, Totals
from crawler.targets import TargetList

if TYPE_CHECKING:
    from crawler.sources import Source


class StateStore(Protocol):
    """What a run needs of saved state. Every method that changes state returns once the change
    is durable; the one-process SQLite store and the Redis store of a coordinated job both fit
    behind it."""

    totals: Totals
    ledger: Ledger
    refresh: int  # the refresh the run works on; 0: none
    found: asyncio.Event  # set when a commit of a source page may have added targets

    @property
    def finding(self) -> bool:
        """A source walk is under way here: a claim that found nothing may find more later."""

    def series(self, name: str) -> SeriesState:
        """An endpoint's own shard series, as committed."""

    async def sync_sources(self, sources: tuple[Source, ...]) -> None:
        """Make the job's sources' targets the saved ones."""

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

    async def series_manifest(self) -> dict[str, tuple[list[ShardInfo], list[ShardInfo]]]:
        """The same of each endpoint's own series, by name."""

    def holds(self, target_id: int) -> bool:
        """Whether this process still holds the target (a lease can be lost)."""

    async def sync_targets(self, targets: TargetList) -> bool:
        """Make the job's targets the saved ones; False when nothing changed."""

    async def begin_run(self, *, refresh: bool, mode: str, probe: bool = False) -> int:
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
    # the last run was stopped by the budget, and the store keeps no stopped_budget of its own
    budget_stopped: bool

    @property
    def ledger(self) -> Ledger: ...

    def totals(self) -> Totals: ...

    def shards(self) -> list[ShardInfo]: ...

    def refreshes(self) -> list[dict[str, Any]]: ...

    def attention(self, limit: int) -> list[dict[str, Any]]: ...

    def rows(self, columns: tuple[str, ...]) -> Iterator[tuple[Any, ...]]: ...

    def last_run(self) -> dict[str, Any] | None: ...

    def sources(self) -> list[dict[str, Any]]:
        """Per source: targets, done, pages, products found, items, credits."""

    def close(self) -> None: ...
