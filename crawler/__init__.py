"""crawler: harvest product reviews from a paid cursor-paged API, exactly once, within budget."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from crawler.errors import (
    ApiError,
    AuthError,
    BudgetExhausted,
    ComeBackLater,
    ConfigError,
    CrawlerError,
    CreditsExhausted,
    JobError,
    OutputError,
    RateLimited,
    RetryableError,
    RunStopped,
    ServerError,
    StateError,
    TargetError,
    WrongEndpoint,
)

if TYPE_CHECKING:
    from crawler.config import Job, load_job
    from crawler.runner import RunResult, run_job
    from crawler.targets import Target

# loaded on first use: the command line's quick commands (--help, status, a bad job file) must
# not pay for the HTTP client and the job model they do not use
_LAZY = {
    "Job": "crawler.config",
    "load_job": "crawler.config",
    "RunResult": "crawler.runner",
    "run_job": "crawler.runner",
    "Target": "crawler.targets",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'crawler' has no attribute {name!r}")
    import importlib  # noqa: PLC0415 -- only on first use of a lazy name

    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [
    "ApiError",
    "AuthError",
    "BudgetExhausted",
    "ComeBackLater",
    "ConfigError",
    "CrawlerError",
    "CreditsExhausted",
    "Job",
    "JobError",
    "OutputError",
    "RateLimited",
    "RetryableError",
    "RunResult",
    "RunStopped",
    "ServerError",
    "StateError",
    "Target",
    "TargetError",
    "WrongEndpoint",
    "load_job",
    "run_job",
]
