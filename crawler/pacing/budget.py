"""The credit ledger: credits are leased durably before the requests that use them are sent."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from crawler.config import BudgetSettings
from crawler.errors import BudgetExhausted
from crawler.state import StateStore

_MAX_GROWTH = 64  # a lease grows to at most this many base blocks


class Budget:
    """Hard ceilings for the job (over every run of it, and every process) and for each target.

    Credits are leased in blocks: one durable, atomic call to the store covers many requests,
    and no request is sent before its credits are covered. A crash counts the whole unused lease
    as spent, so the job-wide ceiling holds through any crash; a clean stop gives the unused part
    back. Retries are requests: each one takes credits again.

    A block starts at ``lease_requests`` requests and doubles while leases come less than a
    second apart (up to 64 times), halving again when they slow down: a lease lasts about a
    second at any pace, so a crash costs at most about a second of requests' allowance.
    """

    def __init__(
        self,
        settings: BudgetSettings,
        store: StateStore,
        *,
        lease_requests: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._store = store
        self._base = settings.credits_per_request * max(1, lease_requests)
        self._block = self._base
        self._clock = clock
        self._last_lease = -1e9
        self._left = 0  # leased, durable, not used yet
        self._lock = asyncio.Lock()
        self._cut_short: set[asyncio.Future[int]] = set()  # leases their walker left

    @property
    def spent(self) -> int:
        """Credits of every request sent for the job so far, over every run (an upper bound)."""
        ledger = self._store.ledger
        return max(ledger.leased - self._left, ledger.credits)

    @property
    def block(self) -> int:
        """The size of the next lease, in credits."""
        return self._block

    async def reserve(self, target_spent: int, cost: int | None = None) -> int:
        """One request's credits (``cost``: its endpoint's, by default the reviews'), for a
        target that has spent ``target_spent`` so far; raises BudgetExhausted instead when a
        ceiling would be passed."""
        if cost is None:
            cost = self._settings.credits_per_request
        cap = self._settings.max_credits_per_target
        if cap is not None and target_spent + cost > cap:
            raise BudgetExhausted(
                f"budget.max_credits_per_target reached: {target_spent} of {cap} credits",
                job_wide=False,
            )
        while self._left < cost:
            async with self._lock:
                if self._left < cost:
                    await self._lease(cost)
        self._left -= cost
        return cost

    def unreserve(self, credits: int) -> None:
        """A reserved request that was not sent (the run stopped first): its credits return."""
        self._left += credits

    async def _lease(self, cost: int) -> None:
        now = self._clock()
        if now - self._last_lease < 1.0:
            self._block = min(self._block * 2, self._base * _MAX_GROWTH)
        else:
            self._block = max(self._base, self._block // 2)
        self._last_lease = now
        ceiling = self._settings.max_credits
        # shielded: a walker cancelled while the store writes the lease (a stop's second step)
        # must not lose it; the task ends on its own and give_back returns what it took
        taking = asyncio.ensure_future(self._store.lease(self._block, cost, ceiling))
        try:
            granted = await asyncio.shield(taking)
        except asyncio.CancelledError:
            self._cut_short.add(taking)
            # a lease that fails after its walker is gone (the store unreachable) ends the run
            # through the store's other callers; its error read here is not printed at exit as
            # "Task exception was never retrieved" with a traceback
            taking.add_done_callback(_read_error)
            raise
        if granted < cost:
            raise BudgetExhausted(
                f"budget.max_credits reached: {self.spent} of {ceiling} credits spent, a "
                f"request costs {cost}",
                job_wide=True,
            )
        self._left += granted

    async def give_back(self) -> None:
        """End of run, no request in flight: return the unused lease to the budget."""
        for taking in self._cut_short:  # their walkers were cancelled: the leases are the run's
            with contextlib.suppress(Exception):  # a lease that failed took nothing
                self._left += await taking
        self._cut_short.clear()
        if self._left:
            left, self._left = self._left, 0
            await self._store.give_back(left)


def _read_error(task: asyncio.Future[int]) -> None:
    if not task.cancelled():
        task.exception()
