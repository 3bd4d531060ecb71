"""One target's walk: cursor -> page -> writer, until done, failed, out of budget, or stopped."""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from crawler import logs
from crawler.api.client import ApiClient
from crawler.api.endpoint import Cursor, CursorEndpoint, Page
from crawler.errors import BudgetExhausted, RateLimited, RetryableError, TargetError
from crawler.output.writer import Rendered
from crawler.pacing.budget import Budget
from crawler.pacing.limits import Gate
from crawler.pacing.retry import RetryPolicy
from crawler.state import Claimed, TargetState
from crawler.state.events import Finish, PageCommitted, Status, TargetFailed

# pages of no reviews that still say has_more, in a row, before the walk is given up: a feed that
# never ends would otherwise spend the whole budget on nothing
MAX_EMPTY_PAGES = 3


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


class Sink(Protocol):
    """Where a walker's pages go: the writer for reviews, a source's sink for its items."""

    async def render(
        self, target: Any, page: Page, fetched_at: str, *, first_page: bool = False
    ) -> Rendered: ...

    async def put(
        self, change: PageCommitted | TargetFailed, target: Any, rendered: Rendered | None
    ) -> None: ...


@dataclass
class RunCounters:
    """What this run sent; the state holds what every run committed."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0


@dataclass
class _Cost:
    """What one page's tries cost, reported with the page or the failure."""

    credits: int = 0
    retries: int = 0
    rate_limited: int = 0


class _GiveUp(Exception):
    def __init__(self, reason: str, cost: _Cost, status: Status = Status.FAILED) -> None:
        super().__init__(reason)
        self.reason, self.cost, self.status = reason, cost, status


class _Stopped(Exception):
    pass


@dataclass
class _Walk:
    """Where one walk stands, as far as this walker has got (committed or not)."""

    cursor: Cursor
    pages: int
    new: int
    goal: int | None
    credits: int  # the target's, over all its walks, for its credit cap
    # the reviews this walk has met (hashes: this process only), so a review the feed shows on
    # two pages counts once towards its count; a resumed walk starts it again, empty
    met: set[int] = field(default_factory=set)

    def shown(self, ids: list[str | None]) -> int:
        """The page's reviews this walk had not met, now met."""
        met, before = self.met, len(self.met)
        met.update(hash(i) for i in ids if i is not None)
        return len(met) - before


@dataclass(frozen=True)
class Walker:
    endpoint: CursorEndpoint
    client: ApiClient
    gate: Gate
    budget: Budget
    policy: RetryPolicy
    door: Door
    writer: Sink
    counters: RunCounters
    refresh_mode: str = "early_stop"
    max_pages: int | None = None  # this run only: plan --probe walks one page, leaves it pending
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def walk(self, claimed: Claimed) -> Status:
        """Walk from the last committed cursor. RunStopped (401/402/403, ...) propagates."""
        target, saved = claimed.target, claimed.saved
        log = logs.get_logger("crawler.walker").bind(
            product_id=target.product_id, region=target.region
        )
        first = self.endpoint.first_cursor
        walk = _Walk(
            saved.cursor if saved.cursor is not None else first,
            saved.walk_pages,
            saved.walk_new,
            saved.walk_goal,
            saved.credits,
        )
        empty_in_a_row = 0
        # every cursor this walk asked for: a feed whose cursors cycle (1 -> 2 -> 1) with items
        # on every page would otherwise spend the whole budget on the same reviews
        visited = {_mark(walk.cursor)}
        while self.max_pages is None or walk.pages < self.max_pages:
            if not self.door.open or (claimed.lease is not None and claimed.lease.lost):
                return Status.PENDING
            try:
                page, cost, seconds = await self._fetch(claimed, walk)
            except _Stopped:
                return Status.PENDING
            except _GiveUp as exc:
                c = exc.cost
                failed = TargetFailed(
                    saved.id,
                    claimed.fence,
                    exc.reason,
                    c.credits,
                    c.retries,
                    c.rate_limited,
                    exc.status,
                )
                await self.writer.put(failed, target, None)
                log.warning(
                    "target stopped at its credit cap"
                    if exc.status is Status.BUDGET
                    else "target failed",
                    reason=exc.reason,
                )
                return exc.status
            empty_in_a_row = empty_in_a_row + 1 if page.has_more and not page.items else 0
            change = await self._page_done(claimed, walk, page, cost, seconds)
            if change.status is Status.DONE:
                return Status.DONE
            assert page.next_cursor is not None  # noqa: S101 -- endpoint.parse guarantees it
            again = _mark(page.next_cursor) in visited
            if again or empty_in_a_row >= MAX_EMPTY_PAGES:
                reason = (  # a cursor may be 4,096 characters long: a reason stays one line
                    f"the API gave cursor {page.next_cursor!r:.100}, already walked in this "
                    f"walk ({'the same page' if page.next_cursor == walk.cursor else 'a cycle'})"
                    if again
                    else f"the API said has_more but sent {empty_in_a_row} empty pages in a row"
                )
                failed = TargetFailed(saved.id, claimed.fence, reason, 0, 0, 0)
                await self.writer.put(failed, target, None)
                log.warning("target failed", reason=reason)
                return Status.FAILED
            walk.cursor = page.next_cursor
            visited.add(_mark(walk.cursor))
        return Status.PENDING

    async def _page_done(
        self, claimed: Claimed, walk: _Walk, page: Page, cost: _Cost, seconds: float
    ) -> PageCommitted:
        """Render a fetched page, decide whether the walk ends with it, hand both over."""
        target, saved = claimed.target, claimed.saved
        first_page = walk.pages == 0
        rendered = await self.writer.render(target, page, _now(), first_page=first_page)
        walk.pages += 1
        walk.new += rendered.new
        same = False
        if first_page and saved.walk > 0:  # page 1 of a refresh tells how much changed
            walk.goal, same = self._refresh_goal(saved, page.total, rendered.new)
        finish = _finish(page, walk, same, target.max_pages)
        change = PageCommitted(
            saved.id,
            claimed.fence,
            page.next_cursor if page.has_more else walk.cursor,
            Status.DONE if finish else Status.PENDING,
            finish,
            len(page.items),
            rendered.new,
            rendered.duplicates,
            cost.credits,
            cost.retries,
            cost.rate_limited,
            seconds,
            page.total,
            walk.goal if first_page else None,
            _expected(page, walk.goal, target.max_pages) if first_page else None,
            last=self.max_pages is not None and walk.pages >= self.max_pages,
            shown=walk.shown(page.ids),
        )
        await self.writer.put(change, target, rendered)
        return change

    def _refresh_goal(
        self, saved: TargetState, count: int | None, unseen: int
    ) -> tuple[int | None, bool]:
        """(new reviews to stop after, or None to walk it all; whether nothing changed).

        The feed is sorted by relevance, so new reviews can be anywhere in it: only a count
        that grew by k, with no more than k unseen reviews on page 1, allows stopping early.
        """
        base = saved.base_count
        if self.refresh_mode == "full" or count is None or base is None or count < base:
            return None, False  # asked for, or the count shrank or is unknown: walk it all
        if count == base:
            return None, unseen == 0  # unseen reviews under an unchanged count: walk it all
        grew = count - base
        if unseen > grew:
            return None, False
        return grew, False

    async def _fetch(self, claimed: Claimed, walk: _Walk) -> tuple[Page, _Cost, float]:
        target = claimed.target
        started = self.clock()
        tries = self.policy.start(started)
        cost = _Cost()
        while True:
            try:
                credits = await self.budget.reserve(walk.credits, self.endpoint.credits_per_request)
            except BudgetExhausted as exc:
                if exc.job_wide:
                    self.door.close("budget")
                    raise _Stopped from None
                raise _GiveUp(str(exc), cost, Status.BUDGET) from None
            # the gate is the last wait before sending, so a 429 pause that began during any
            # earlier wait (a lease, a backoff) still holds this request back
            try:
                await self.gate.acquire()
            except asyncio.CancelledError:  # a run cut short (a refused key): nothing was sent
                self.budget.unreserve(credits)
                raise
            # a budget stop ends the leasing, not the requests already covered: they go, so a
            # ceiling is used up by the run that meets it
            stopped = not self.door.open and self.door.reason != "budget"
            if stopped or (claimed.lease is not None and claimed.lease.lost):
                self.budget.unreserve(credits)
                raise _Stopped
            cost.credits += credits
            walk.credits += credits
            self.counters.requests += 1
            sent = self.clock()
            try:
                page = await self.client.fetch(self.endpoint, target, walk.cursor)
            except RateLimited as exc:
                _raise_if_cancelling()
                cost.rate_limited += 1
                self.counters.rate_limited += 1
                self.policy.check_retry_after(exc.retry_after)
                await self.gate.on_rate_limited(exc.retry_after, self.clock() - sent)
                if not tries.may_retry_rate_limited():
                    raise _GiveUp(f"{exc} (too many in a row)", cost) from None
                continue
            except RetryableError as exc:
                _raise_if_cancelling()
                asked = getattr(exc, "retry_after", None)  # a 503's Retry-After is honoured
                self.policy.check_retry_after(asked)
                delay = tries.next_delay(self.clock(), asked=asked)
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


def _mark(cursor: Cursor) -> int | bytes:
    """A cursor as the walk remembers it: a long text cursor as a short digest."""
    if isinstance(cursor, int):
        return cursor
    return hashlib.blake2b(cursor.encode(errors="surrogatepass"), digest_size=16).digest()


def _raise_if_cancelling() -> None:
    """A cancellation a library turned into an error (on Python 3.11 a timeout expiring at the
    moment the task is cancelled becomes a TimeoutError; after SIGSTOP every timer expires at
    once) must still end the task, not be retried."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _finish(page: Page, walk: _Walk, same: bool, max_pages: int | None) -> Finish | None:
    """Why the walk ends with this page, or None when it goes on."""
    if not page.has_more:
        return Finish.END
    if same:
        return Finish.SAME
    if walk.goal is not None and walk.new >= walk.goal:
        return Finish.GOAL
    if max_pages is not None and walk.pages >= max_pages:
        return Finish.CAP
    return None


def _expected(page: Page, goal: int | None, max_pages: int | None) -> int:
    """Pages the walk will take in all, guessed from its first page."""
    if not page.has_more or not page.items or page.total is None:
        return 1
    pages = math.ceil(page.total / len(page.items))
    if goal is not None:  # the last of k new reviews lies, on average, k/(k+1) of the way in
        pages = math.ceil(pages * goal / (goal + 1))
    return max(1, min(pages, max_pages) if max_pages is not None else pages)


def _now() -> str:
    """The time a page was fetched, to the millisecond, as ISO 8601 UTC."""
    now = time.time()
    second = int(now)
    if second != _second[0]:  # formatting a date costs more than the rest of this: once a second
        _second[:] = [second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second[1]}.{int((now - second) * 1000):03d}Z"


_second: list[Any] = [None, ""]
