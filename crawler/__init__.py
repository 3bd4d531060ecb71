"""crawler: harvest product reviews from a paid cursor-paged API, exactly once, within budget.

The API a program calls (what ``crawler run`` does)::

    import asyncio, crawler

    job = crawler.load_job("job.yaml")          # validated; ConfigError names file, line, key
    result = asyncio.run(crawler.run_job(job))  # run or resume to the end, the budget, a stop
    result.exit_status, result.stop_reason, result.report  # as the command line reports them

``run_job(job, refresh=True)`` harvests a finished job again for its new reviews;
``run_job(job, fresh=True)`` starts it over. Errors are split by what the caller does next:
``JobError`` (fix the input), ``OutputError`` (a file cannot be written), ``CoordinationError``
(Redis); every other way a run ends is in the result. The classes below are that tree.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from crawler.errors import (
    ApiError,
    AuthError,
    BudgetExhausted,
    ComeBackLater,
    ConfigError,
    CoordinationError,
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

# a library says nothing unless the program set logging up (the command line configures its own)
logging.getLogger("crawler").addHandler(logging.NullHandler())

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
    "CoordinationError",
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
