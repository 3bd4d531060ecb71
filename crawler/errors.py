"""The exception tree, split by what the caller does next.

    CrawlerError                      root: anything this package raises on purpose
    +-- JobError                      the job cannot start: fix the input (exit 2)
    |   +-- ConfigError               the job file or the environment is wrong
    |   +-- StateError                saved state is unreadable, or does not fit the job
    +-- ApiError                      an answer of the API that is not a page
        +-- RetryableError            try the same request again, after a pause
        |   +-- RateLimited           429: pause every walker on the key
        |   +-- ServerError           5xx, non-zero ``code``, bad body, network fault
        +-- TargetError               give up this target, go on with the others (400)
        +-- RunStopped                stop every walker, keep state, exit 4
            +-- AuthError             401 / 403: the key is refused
            +-- CreditsExhausted      402: the account has no credits left

Budget exhaustion on our side is not an error of the API: it is ``BudgetExhausted``,
raised before a request is sent, never after.

Messages never carry request headers: the API key rides in them.
"""

from __future__ import annotations


class CrawlerError(Exception):
    """Root of every error this package raises on purpose."""


class JobError(CrawlerError):
    """The job cannot start; the message says what to fix."""


class ConfigError(JobError):
    """The job file or the environment is wrong."""


class StateError(JobError):
    """Saved state is unreadable or does not fit the job."""


class BudgetExhausted(CrawlerError):
    """The next request would pass a credit ceiling; it was not sent."""

    def __init__(self, message: str, *, job_wide: bool) -> None:
        super().__init__(message)
        self.job_wide = job_wide


class ApiError(CrawlerError):
    """An answer of the API that is not a page."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetryableError(ApiError):
    """The same request may succeed if sent again after a pause."""


class RateLimited(RetryableError):
    """429: every walker on the key pauses."""

    def __init__(self, message: str, *, retry_after: float | None) -> None:
        super().__init__(message, status=429)
        self.retry_after = retry_after


class ServerError(RetryableError):
    """5xx, a 200 with a non-zero code, a bad body, or a network fault."""


class TargetError(ApiError):
    """This target cannot be fetched (400); the others go on."""


class RunStopped(ApiError):
    """The whole run must stop: no walker sends another request."""


class AuthError(RunStopped):
    """401 or 403: the API refused the key."""


class CreditsExhausted(RunStopped):
    """402: the account's balance is spent; resumable after a top-up."""
