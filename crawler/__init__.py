"""crawler: harvest product reviews from a paid cursor-paged API, exactly once, within budget."""

from crawler.config import Job, load_job
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
from crawler.runner import RunResult, run_job
from crawler.targets import Target

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
