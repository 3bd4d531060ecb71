"""crawler: harvest product reviews from a paid cursor-paged API, exactly once, within budget."""

from crawler.config import Job, Target, load_job
from crawler.errors import (
    ApiError,
    AuthError,
    BudgetExhausted,
    ConfigError,
    CrawlerError,
    CreditsExhausted,
    JobError,
    RateLimited,
    RetryableError,
    RunStopped,
    ServerError,
    StateError,
    TargetError,
)
from crawler.runner import RunResult, run_job

__all__ = [
    "ApiError",
    "AuthError",
    "BudgetExhausted",
    "ConfigError",
    "CrawlerError",
    "CreditsExhausted",
    "Job",
    "JobError",
    "RateLimited",
    "RetryableError",
    "RunResult",
    "RunStopped",
    "ServerError",
    "StateError",
    "Target",
    "TargetError",
    "load_job",
    "run_job",
]
