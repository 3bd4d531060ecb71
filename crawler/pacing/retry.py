"""Which failures are retried, how long to wait between tries, and when to give up."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from crawler.config import RetrySettings
from crawler.errors import ComeBackLater

# consecutive 429s on one request before the target is given up; the shared pause and the lowered
# rate normally end an episode long before this
MAX_RATE_LIMITED_IN_A_ROW = 50


@dataclass
class RetryState:
    """The tries of one request: counted against the attempt and time caps."""

    policy: RetryPolicy
    started: float
    attempts: int = 0
    rate_limited_in_a_row: int = 0

    def next_delay(self, now: float, *, asked: float | None = None) -> float | None:
        """Seconds to wait before the next try of a retryable fault (at least what the server
        ``asked`` in a Retry-After), or None to give up."""
        self.attempts += 1
        if self.attempts >= self.policy.max_attempts:
            return None
        delay = self.policy.backoff(self.attempts)
        if asked is not None:
            delay = max(delay, asked)
        if now + delay - self.started > self.policy.max_seconds:
            return None
        return delay

    def may_retry_rate_limited(self) -> bool:
        self.rate_limited_in_a_row += 1
        return self.rate_limited_in_a_row < MAX_RATE_LIMITED_IN_A_ROW


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, capped in attempts and in total seconds.

    ``base_seconds=0`` is the zero-wait mode tests use: same decisions, no sleeping.
    """

    max_attempts: int = 6
    max_seconds: float = 120.0
    base_seconds: float = 0.5
    cap_seconds: float = 30.0
    max_retry_after: float = 300.0
    rng: random.Random = field(default_factory=random.Random, compare=False)

    @classmethod
    def from_settings(cls, settings: RetrySettings) -> RetryPolicy:
        return cls(
            settings.max_attempts,
            settings.max_seconds,
            settings.base_seconds,
            settings.cap_seconds,
            settings.max_retry_after_seconds,
        )

    def check_retry_after(self, retry_after: float | None) -> None:
        """Raise ComeBackLater when a 429 asks for a longer pause than the job allows: a run
        that sleeps for days looks like a hung one, and a cron job would pile up behind it."""
        if retry_after is None or retry_after <= self.max_retry_after:
            return
        try:
            when = (datetime.now(UTC) + timedelta(seconds=retry_after)).strftime(
                "%Y-%m-%d %H:%M UTC"
            )
        except OverflowError:
            when = "a date too far away to print (the server's Retry-After is probably wrong)"
        raise ComeBackLater(
            f"the API asked to wait {retry_after:,.0f} s before the next request (429 "
            f"Retry-After), more than api.retry.max_retry_after_seconds "
            f"({self.max_retry_after:g}); the state is saved: run again after {when}",
            retry_after=retry_after,
        )

    def backoff(self, attempt: int) -> float:
        ceiling = min(self.cap_seconds, self.base_seconds * 2 ** (attempt - 1))
        return self.rng.uniform(0, ceiling)

    def start(self, now: float) -> RetryState:
        return RetryState(self, now)
