"""Which failures are retried, how long to wait between tries, and when to give up."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from crawler.config import RetrySettings

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

    def next_delay(self, now: float) -> float | None:
        """Seconds to wait before the next try of a retryable fault, or None to give up."""
        self.attempts += 1
        if self.attempts >= self.policy.max_attempts:
            return None
        delay = self.policy.backoff(self.attempts)
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
    rng: random.Random = field(default_factory=random.Random, compare=False)

    @classmethod
    def from_settings(cls, settings: RetrySettings) -> RetryPolicy:
        return cls(
            settings.max_attempts, settings.max_seconds, settings.base_seconds, settings.cap_seconds
        )

    def backoff(self, attempt: int) -> float:
        ceiling = min(self.cap_seconds, self.base_seconds * 2 ** (attempt - 1))
        return self.rng.uniform(0, ceiling)

    def start(self, now: float) -> RetryState:
        return RetryState(self, now)
