"""The credit ledger: every request's credits are counted on disk before the request is sent."""

from __future__ import annotations

from crawler.config import BudgetSettings
from crawler.errors import BudgetExhausted
from crawler.state import StateStore


class Budget:
    """Hard ceilings for the job (over every run of it) and for each target.

    A reservation is applied to the in-memory state at once, so concurrent walkers can never
    reserve the same last credits twice, and awaited until durable, so a crash can never forget
    a request that may have been sent. Retries are requests: each one reserves again.
    """

    def __init__(self, settings: BudgetSettings, store: StateStore) -> None:
        self._settings = settings
        self._store = store

    @property
    def spent(self) -> int:
        return self._store.state.credits

    @property
    def remaining(self) -> int:
        return max(0, self._settings.max_credits - self.spent)

    def check(self, target_key: str) -> None:
        """Raise BudgetExhausted if the next request of this target would pass a ceiling."""
        cost = self._settings.credits_per_request
        if self.spent + cost > self._settings.max_credits:
            raise BudgetExhausted(
                f"budget.max_credits reached: {self.spent} of {self._settings.max_credits} "
                f"credits spent, a request costs {cost}",
                job_wide=True,
            )
        cap = self._settings.max_credits_per_target
        target = self._store.state.targets.get(target_key)
        spent_here = target.credits if target else 0
        if cap is not None and spent_here + cost > cap:
            raise BudgetExhausted(
                f"budget.max_credits_per_target reached: {spent_here} of {cap} credits",
                job_wide=False,
            )

    async def reserve(self, target_key: str) -> None:
        """Count one request's credits durably; raise BudgetExhausted instead if over a ceiling."""
        self.check(target_key)
        await self._store.record(
            [{"e": "R", "k": target_key, "c": self._settings.credits_per_request}]
        )
