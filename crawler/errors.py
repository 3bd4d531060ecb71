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
        +-- RunStopped                stop every walker, keep state
            +-- AuthError             401 / 403: the key is refused (exit 4)
            +-- CreditsExhausted      402: the account has no credits left (exit 4)
            +-- WrongEndpoint         3xx, 404, 405, 410...: not this API's answer (exit 5)
            +-- ComeBackLater         Retry-After longer than the job allows (exit 6)
    +-- OutputError                   output or state cannot be written: disk full, read-only
    |                                 folder, permission; the run stops, resumable (exit 7)
    +-- CoordinationError             Redis unreachable too long, or this worker's lease was
        |                             taken over; the worker stops, nothing is lost (exit 8)
        +-- LeaseLost                 a product this worker walked is another's now

Budget exhaustion on our side is not an error of the API: it is ``BudgetExhausted``,
raised before a request is sent, never after.

Messages never carry request headers: the API key rides in them. What the server says (it holds
the key, and may say it back) enters a message only through ``crawler.api.redact.Redactor``.
"""

from __future__ import annotations

import errno


class CrawlerError(Exception):
    """Root of every error this package raises on purpose."""


class JobError(CrawlerError):
    """The job cannot start; the message says what to fix."""


class ConfigError(JobError):
    """The job file or the environment is wrong."""


class StateError(JobError):
    """Saved state is unreadable or does not fit the job."""


class OutputError(CrawlerError):
    """A file of the job cannot be written; the message names it and says what to do."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path

    @classmethod
    def from_os(cls, exc: OSError, path: object) -> OutputError:
        reason = exc.strerror or type(exc).__name__
        advice = _ADVICE.get(exc.errno or 0, "fix the cause")
        return cls(
            f"{path}: cannot write: {reason}; {advice}, then run the same command again: "
            "the state is saved and the run carries on where it stopped",
            path=str(path),
        )


_ADVICE = {
    errno.ENOSPC: "free space on that disk (or point output.dir at another one)",
    errno.EDQUOT: "free space within your disk quota (or point output.dir elsewhere)",
    errno.EFBIG: "the file system refuses files this large: lower output.shard_max_records",
    errno.EROFS: "the file system is read-only: remount it writable or point output.dir elsewhere",
    errno.EACCES: "give this user write permission on that folder",
    errno.EPERM: "give this user write permission on that folder",
    errno.EIO: "the disk reported an I/O error: check it",
}


class CoordinationError(CrawlerError):
    """The coordinated mode cannot go on: Redis unreachable, or a lease lost. Start again."""


class LeaseLost(CoordinationError):
    """Another worker holds what this one was walking: it was paused longer than its lease."""


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

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after  # a 503 in maintenance says when to come back


class TargetError(ApiError):
    """This target cannot be fetched (400); the others go on."""


class RunStopped(ApiError):
    """The whole run must stop: no walker sends another request."""


class AuthError(RunStopped):
    """401 or 403: the API refused the key."""


class CreditsExhausted(RunStopped):
    """402: the account's balance is spent; resumable after a top-up."""


class WrongEndpoint(RunStopped):
    """A status no answer of this API has (3xx, 404, 405, 410...): wrong base_url or a proxy.

    Every target would get the same answer, so the run stops instead of failing each one.
    """


class ComeBackLater(RunStopped):
    """429 with a Retry-After longer than ``api.max_retry_after_seconds``."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, status=429)
        self.retry_after = retry_after
