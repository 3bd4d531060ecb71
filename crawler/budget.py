"""The credit ledger: credits are leased on disk before the requests that use them are sent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from crawler.config import BudgetSettings
from crawler.errors import BudgetExhausted
from crawler.state import StateStore


class Budget:
    """Hard ceilings for the job (over every run of it) and for each target.

    Credits are leased in blocks: one durable ``L`` event (one fsync) covers many requests, and
    no request is sent before its credits are covered. A crash counts the whole unused lease as
    spent, so the job-wide ceiling holds through any crash; a clean stop gives the unused part
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
        self._per_target: dict[str, int] = {}

    @property
    def spent(self) -> int:
        """Credits of every request sent for the job so far, over every run (an upper bound)."""
        state = self._store.state
        return max(state.leased - self._left, state.credits)

    def _target_spent(self, target_key: str) -> int:
        if target_key not in self._per_target:
            saved = self._store.state.targets.get(target_key)
            self._per_target[target_key] = saved.credits if saved else 0
        return self._per_target[target_key]

    async def reserve(self, target_key: str) -> int:
        """Take one request's credits; raise BudgetExhausted instead if over a ceiling."""
        cost = self._settings.credits_per_request
        cap = self._settings.max_credits_per_target
        spent_here = self._target_spent(target_key)
        if cap is not None and spent_here + cost > cap:
            raise BudgetExhausted(
                f"budget.max_credits_per_target reached: {spent_here} of {cap} credits",
                job_wide=False,
            )
        while self._left < cost:
            async with self._lock:
                if self._left < cost:
                    await self._lease(cost)
        self._left -= cost
        self._per_target[target_key] = spent_here + cost
        return cost

    def unreserve(self, target_key: str, credits: int) -> None:
        """A reserved request that was not sent (the run stopped first): its credits return."""
        self._left += credits
        self._per_target[target_key] -= credits

    async def _lease(self, cost: int) -> None:
        state = self._store.state
        now = self._clock()
        if now - self._last_lease < 1.0:
            self._block = min(self._block * 2, self._base * 64)
        else:
            self._block = max(self._base, self._block // 2)
        self._last_lease = now
        room = self._settings.max_credits - state.leased
        size = min(self._block, room - room % cost)
        if size < cost:
            raise BudgetExhausted(
                f"budget.max_credits reached: {self.spent} of {self._settings.max_credits} "
                f"credits spent, a request costs {cost}",
                job_wide=True,
            )
        await self._store.record([{"e": "L", "c": size}])
        self._left += size

    async def give_back(self) -> None:
        """End of run, no request in flight: return the unused lease to the budget."""
        if self._left:
            left, self._left = self._left, 0
            await self._store.record([{"e": "L", "c": -left}])
