"""One target's walk: cursor -> page -> writer, until done, failed, out of budget, or stopped."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import structlog

from crawler.budget import Budget
from crawler.client import ApiClient
from crawler.config import Target
from crawler.endpoint import Cursor, CursorEndpoint, Page
from crawler.errors import BudgetExhausted, RateLimited, RetryableError, TargetError
from crawler.limits import RateGate
from crawler.retry import RetryPolicy
from crawler.state import TargetState
from crawler.writer import PageDone, TargetFailed, Writer

# pages of no reviews that still say has_more, in a row, before the walk is given up: a feed that
# never ends would otherwise spend the whole budget on nothing
MAX_EMPTY_PAGES = 3


class Outcome(StrEnum):
    DONE = "done"
    FAILED = "failed"
    BUDGET = "stopped_budget"
    PENDING = "pending"


class Door:
    """Open while walkers may send requests; closed once, with the reason, to stop the run."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.closed = asyncio.Event()

    @property
    def open(self) -> bool:
        return self.reason is None

    def close(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.closed.set()


@dataclass
class RunCounters:
    """What this run sent; the state holds what every run committed."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0


class _GiveUp(Exception):
    def __init__(self, reason: str, cost: _Cost) -> None:
        super().__init__(reason)
        self.reason, self.cost = reason, cost


@dataclass
class _Cost:
    """What one page's tries cost, reported with the page or the failure."""

    credits: int = 0
    retries: int = 0
    rate_limited: int = 0


class _Stopped(Exception):
    pass


@dataclass(frozen=True)
class Walker:
    endpoint: CursorEndpoint
    client: ApiClient
    gate: RateGate
    budget: Budget
    policy: RetryPolicy
    door: Door
    writer: Writer
    counters: RunCounters
    max_pages: int | None = None  # overrides every target's own (plan --probe walks one page)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def walk(  # noqa: PLR0911 -- one return per way a walk can end
        self, target: Target, saved: TargetState
    ) -> tuple[Outcome, str | None]:
        """Walk from the last committed cursor. RunStopped (401/402/403) propagates."""
        log = structlog.get_logger("crawler.walker").bind(
            product_id=target.product_id, region=target.region
        )
        cursor: Cursor = saved.cursor if saved.cursor is not None else self.endpoint.first_cursor
        pages = saved.pages
        limit = self.max_pages if self.max_pages is not None else target.max_pages
        if saved.exhausted:
            return Outcome.DONE, None
        empty_in_a_row = 0
        while limit is None or pages < limit:
            if not self.door.open:
                return Outcome.PENDING, None
            try:
                page, cost, seconds = await self._fetch(target, cursor)
            except BudgetExhausted as exc:
                if exc.job_wide:
                    self.door.close("budget")
                    return Outcome.PENDING, str(exc)
                log.info("target stopped at its credit cap", reason=str(exc))
                return Outcome.BUDGET, str(exc)
            except _Stopped:
                return Outcome.PENDING, None
            except _GiveUp as exc:
                c = exc.cost
                await self.writer.put(
                    TargetFailed(target, exc.reason, c.credits, c.retries, c.rate_limited)
                )
                log.warning("target failed", reason=exc.reason)
                return Outcome.FAILED, exc.reason
            empty_in_a_row = empty_in_a_row + 1 if page.has_more and not page.items else 0
            stuck = page.has_more and page.next_cursor == cursor
            await self.writer.put(
                PageDone(
                    target,
                    page.items,
                    page.next_cursor if page.has_more else cursor,
                    not page.has_more,
                    page.total,
                    _now(),
                    cost.credits,
                    cost.retries,
                    cost.rate_limited,
                    seconds,
                    last=not page.has_more or (limit is not None and pages + 1 >= limit),
                )
            )
            pages += 1
            if stuck or empty_in_a_row >= MAX_EMPTY_PAGES:
                reason = (
                    f"the API gave the same cursor {cursor!r} again"
                    if stuck
                    else f"the API said has_more but sent {empty_in_a_row} empty pages in a row"
                )
                await self.writer.put(TargetFailed(target, reason, 0, 0, 0))
                return Outcome.FAILED, reason
            if not page.has_more:
                return Outcome.DONE, None
            assert page.next_cursor is not None  # noqa: S101 -- endpoint.parse guarantees it
            cursor = page.next_cursor
        return Outcome.DONE, None

    async def _fetch(self, target: Target, cursor: Cursor) -> tuple[Page, _Cost, float]:
        started = self.clock()
        tries = self.policy.start(started)
        cost = _Cost()
        while True:
            credits = await self.budget.reserve(target.key)
            # the gate is the last wait before sending, so a 429 pause that began during any
            # earlier wait (a lease, a backoff) still holds this request back
            await self.gate.acquire()
            if not self.door.open:
                self.budget.unreserve(target.key, credits)
                raise _Stopped
            cost.credits += credits
            self.counters.requests += 1
            try:
                page = await self.client.fetch(self.endpoint, target, cursor)
            except RateLimited as exc:
                cost.rate_limited += 1
                self.counters.rate_limited += 1
                self.policy.check_retry_after(exc.retry_after)
                self.gate.on_rate_limited(exc.retry_after)
                if not tries.may_retry_rate_limited():
                    raise _GiveUp(f"{exc} (too many in a row)", cost) from None
                continue
            except RetryableError as exc:
                delay = tries.next_delay(self.clock())
                if delay is None:
                    raise _GiveUp(
                        f"{exc} (gave up after {tries.attempts} attempts)", cost
                    ) from None
                cost.retries += 1
                self.counters.retries += 1
                await self.sleep(delay)
                continue
            except TargetError as exc:
                raise _GiveUp(str(exc), cost) from None
            return page, cost, self.clock() - started


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
