"""The job file's settings: one typed, immutable pydantic class per section, each value's
bounds, and the checks a value needs on its own (a URL's scheme, a region's name)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from crawler import declarations
from crawler.declarations import EndpointSpec, SourceSpec
from crawler.errors import ConfigError
from crawler.targets import MAX_PAGES, check_region

SANDBOX = "sandbox"
SANDBOX_KEY = "sk_sandbox_demo"  # the in-process emulator's key: not a secret, never sent elsewhere
MAX_BODY_BYTES = 32 * 1024 * 1024  # api.max_body_bytes's default: a page is tens of kilobytes


class ApiKey(str):
    """The API key: its value where it is used (a header, a fingerprint), ``'***'`` in every
    repr, so no dataclass, traceback or debug print that holds it ever shows it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


# Upper bounds of the numbers a job file gives (README lists them). Past any of them a value is
# a slip (an extra digit, `.inf`), and some break far from the file: an infinite rate was an
# OverflowError when the run started, a cap of 2**32 pages does not fit the 32-bit column.
HOUR, DAY = 3600, 86400
MAX_RATE = 1_000_000  # requests per second; the benchmark says a million to mean "no limit"
MAX_CREDITS = 10**12  # more than any account holds; Redis's Lua counts exactly up to 2**53
MAX_CREDITS_PER_REQUEST = 10_000  # the API charges 2
MAX_SHARD_RECORDS = 100_000_000  # a shard of tens of gigabytes
MAX_COMMIT_EVERY = 10_000  # pages held for one commit; a commit comes every second anyway
MAX_ATTEMPTS = 1000
_NUMBERS = (int, float, int | None)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @field_validator("*", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads yes, no, on, off, true and false as booleans, which pydantic would take
        # for 1 and 0: `max_credits: yes` would be a budget of one credit
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and field.annotation in _NUMBERS:
            raise ValueError(f"Input should be a number, not a boolean (got {value})")
        return value


class RetrySettings(_Model):
    max_attempts: int = Field(6, gt=0, le=MAX_ATTEMPTS)
    max_seconds: float = Field(120.0, gt=0, le=DAY)
    base_seconds: float = Field(0.5, ge=0, le=HOUR)
    cap_seconds: float = Field(30.0, ge=0, le=HOUR)
    max_retry_after_seconds: float = Field(300.0, gt=0, le=DAY)


class ApiSettings(_Model):
    base_url: str = "https://api.keyapi.ai"
    key_env: str = Field("KEYAPI_API_KEY", min_length=1)
    requests_per_second: float = Field(5.0, gt=0, le=MAX_RATE)
    concurrency: int = Field(8, gt=0, le=1024)
    timeout_seconds: float = Field(30.0, gt=0, le=HOUR)
    # an answer's body, decompressed, read at most
    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=64 * 1024, le=1024 * 1024 * 1024)
    retry: RetrySettings = RetrySettings()
    shutdown_grace_seconds: float = Field(10.0, ge=0, le=HOUR)

    @field_validator("base_url")
    @classmethod
    def _https_unless_loopback(cls, url: str) -> str:
        if url == SANDBOX:
            return url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"'{url}' is not an http(s) URL (or the word 'sandbox')")
        if parts.scheme == "http" and not is_loopback(parts.hostname):
            raise ValueError(
                f"'{url}' must use https: the API key must not cross a network in clear"
            )
        return url.rstrip("/")

    @property
    def is_sandbox(self) -> bool:
        return self.base_url == SANDBOX


class BudgetSettings(_Model):
    max_credits: int = Field(gt=0, le=MAX_CREDITS)
    credits_per_request: int = Field(2, gt=0, le=MAX_CREDITS_PER_REQUEST)
    max_credits_per_target: int | None = Field(None, gt=0, le=MAX_CREDITS)


class OutputSettings(_Model):
    # a folder, or s3://bucket/prefix: then ``dir`` is the local working folder (state, the
    # open shard) and ``bucket`` the URL; see README, "Output to a bucket"
    dir: Path
    shard_max_records: int = Field(100_000, gt=0, le=MAX_SHARD_RECORDS)
    compression: Literal["none", "gzip", "zstd"] = "none"
    commit_every_pages: int = Field(1, gt=0, le=MAX_COMMIT_EVERY)
    work_dir: Path | None = None  # a bucket job's local folder; default: beside the job file
    bucket: str | None = Field(None, repr=False)  # set from ``dir``, never written in a file

    @model_validator(mode="before")
    @classmethod
    def _bucket_url(cls, data: Any) -> Any:
        """``dir: s3://...`` kept whole (a Path would fold its '//'); ``bucket`` is not a key
        of the job file."""
        if not isinstance(data, dict):
            return data
        if "bucket" in data:
            raise ValueError("bucket: not a setting; write output.dir: s3://BUCKET/PREFIX")
        folder = data.get("dir")
        if isinstance(folder, str) and folder.startswith("s3://"):
            from crawler.output.bucket import BucketUrl  # noqa: PLC0415 -- the URL's checks only

            try:
                BucketUrl.parse(folder)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
            return {**data, "bucket": folder, "dir": data.get("work_dir") or "."}
        if data.get("work_dir") is not None:
            raise ValueError("work_dir: only for an output.dir that is a bucket (s3://...)")
        return data


class CoordinationSettings(_Model):
    """Several processes, on one machine or many, working one job through Redis."""

    # None: given on the command line (--redis URL)
    # repr=False: a job in a debugger or a log line never shows the password
    redis_url: str | None = Field(None, pattern=r"^(redis|rediss|unix)://", repr=False)
    job: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")  # default: the job file's name
    lease_seconds: float = Field(30.0, gt=0, le=HOUR)
    unavailable_seconds: float = Field(300.0, gt=0, le=DAY)

    @field_validator("redis_url")
    @classmethod
    def _usable(cls, url: str | None) -> str | None:
        """A URL redis-py can connect with, checked now: a port that is not a number was a
        traceback when the first worker started."""
        if url is None:
            return url
        from redis.connection import parse_url  # noqa: PLC0415 -- only a coordinated job's

        try:
            parse_url(url)  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        except ValueError as exc:
            reason = str(exc)
            if reason.startswith("Port"):  # it quotes the port: a password cut at a '/' is one
                reason = "its port is not a number from 0 to 65535"
            raise ValueError(f"'{masked_url(url)}' is not a Redis URL: {reason}") from None
        return url


class MetricsSettings(_Model):
    """Prometheus metrics served over HTTP while the job runs (``crawler run --metrics-port``)."""

    port: int = Field(ge=0, le=65535)  # 0: any free port (the log line says which)
    host: str = Field("127.0.0.1", min_length=1)  # loopback unless widened on purpose


class TargetSpec(_Model):
    product_id: str
    region: str | None = None
    regions: tuple[str, ...] | None = None  # neither: the job's default_regions
    max_pages: int | None = Field(None, gt=0, le=MAX_PAGES)

    @field_validator("product_id", mode="before")
    @classmethod
    def _digits(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError(f"{value} must be quoted: ids this long lose digits as YAML numbers")
        if not isinstance(value, str) or not value.isascii() or not value.isdigit():
            raise ValueError(f"'{value}' is not a product id (a string of digits)")
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        return None if value is None else _check_region(value)

    @field_validator("regions")
    @classmethod
    def _regions(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and not value:
            raise ValueError("regions is empty")
        return None if value is None else tuple(_check_region(r) for r in value)

    @model_validator(mode="after")
    def _not_both(self) -> TargetSpec:
        if self.region is not None and self.regions is not None:
            raise ValueError("give 'region' or 'regions', not both")
        return self


class JobModel(_Model):
    api: ApiSettings = ApiSettings()
    budget: BudgetSettings
    output: OutputSettings
    targets: tuple[TargetSpec, ...] = ()
    targets_file: Path | None = None
    default_regions: tuple[str, ...] | None = Field(None, min_length=1)
    refresh: Literal["early_stop", "full"] = "early_stop"
    coordination: CoordinationSettings | None = None
    metrics: MetricsSettings | None = None
    endpoints: dict[str, EndpointSpec] = Field(default_factory=dict)
    sources: tuple[SourceSpec, ...] = ()

    @field_validator("default_regions")
    @classmethod
    def _regions(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else tuple(_check_region(r) for r in value)


# where each settings class sits in a job file, for "it goes under ..."
SECTIONS: dict[str, type[BaseModel]] = {
    "under api": ApiSettings,
    "under api.retry": RetrySettings,
    "under budget": BudgetSettings,
    "under output": OutputSettings,
    "under coordination": CoordinationSettings,
    "under metrics": MetricsSettings,
    "in each target": TargetSpec,
    "in each endpoint": declarations.EndpointSpec,
    "in each source": declarations.SourceSpec,
    "at the top level": JobModel,
}


def _check_region(value: str) -> str:
    if (why := check_region(value)) is not None:
        raise ValueError(why)
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# redis-py takes a password from the query too (``?password=...``)
_QUERY_PASSWORD = re.compile(r"(password=)[^&#]*", re.IGNORECASE)


def masked_url(url: object) -> object:
    """A URL without its password (``user:password@``, ``?password=``), for messages; with no
    ``://`` (a mistyped scheme, none at all) everything before an ``@`` is taken for one."""
    if not isinstance(url, str):
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + _QUERY_PASSWORD.sub(r"\1***", rest)
