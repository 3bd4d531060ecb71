"""The job file: YAML in, validated immutable objects out, errors naming file, line and field."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from crawler.errors import ConfigError

REGIONS = (
    "US",
    "GB",
    "DE",
    "FR",
    "IT",
    "ID",
    "MY",
    "MX",
    "PH",
    "SG",
    "ES",
    "TH",
    "VN",
    "BR",
    "JP",
    "IE",
)
SANDBOX = "sandbox"
SANDBOX_KEY = "sk_sandbox_demo"  # the in-process emulator's key: not a secret, never sent elsewhere


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class RetrySettings(_Model):
    max_attempts: int = Field(6, gt=0)
    max_seconds: float = Field(120.0, gt=0)
    base_seconds: float = Field(0.5, ge=0)
    cap_seconds: float = Field(30.0, ge=0)
    max_retry_after_seconds: float = Field(300.0, gt=0)


class ApiSettings(_Model):
    base_url: str = "https://api.keyapi.ai"
    key_env: str = Field("KEYAPI_API_KEY", min_length=1)
    requests_per_second: float = Field(5.0, gt=0)
    concurrency: int = Field(8, gt=0, le=1024)
    timeout_seconds: float = Field(30.0, gt=0)
    retry: RetrySettings = RetrySettings()
    shutdown_grace_seconds: float = Field(10.0, ge=0)

    @field_validator("base_url")
    @classmethod
    def _https_unless_loopback(cls, url: str) -> str:
        if url == SANDBOX:
            return url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"'{url}' is not an http(s) URL (or the word 'sandbox')")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ValueError(
                f"'{url}' must use https: the API key must not cross a network in clear"
            )
        return url.rstrip("/")

    @property
    def is_sandbox(self) -> bool:
        return self.base_url == SANDBOX


class BudgetSettings(_Model):
    max_credits: int = Field(gt=0)
    credits_per_request: int = Field(2, gt=0)
    max_credits_per_target: int | None = Field(None, gt=0)


class OutputSettings(_Model):
    dir: Path
    shard_max_records: int = Field(100_000, gt=0)
    compression: Literal["none", "gzip", "zstd"] = "none"
    commit_every_pages: int = Field(1, gt=0)


class TargetSpec(_Model):
    product_id: str
    region: str | None = None
    regions: tuple[str, ...] | None = None
    max_pages: int | None = Field(None, gt=0)

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
    def _one_of_region_or_regions(self) -> TargetSpec:
        if (self.region is None) == (self.regions is None):
            raise ValueError("give exactly one of 'region' or 'regions'")
        return self


class _JobModel(_Model):
    api: ApiSettings = ApiSettings()
    budget: BudgetSettings
    output: OutputSettings
    targets: tuple[TargetSpec, ...] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class Target:
    """One walk: a product in one region."""

    product_id: str
    region: str
    max_pages: int | None = None

    @property
    def key(self) -> str:
        return f"{self.product_id}:{self.region}"


@dataclass(frozen=True)
class Job:
    """A validated job: what to fetch, how fast, for how much, and where to."""

    path: Path
    api: ApiSettings
    budget: BudgetSettings
    output: OutputSettings
    targets: tuple[Target, ...]

    def api_key(self, environ: Mapping[str, str] | None = None) -> str:
        """The key from the environment (never from the file); ConfigError names the variable."""
        if self.api.is_sandbox:
            return SANDBOX_KEY
        env = os.environ if environ is None else environ
        key = env.get(self.api.key_env, "").strip()
        if not key:
            raise ConfigError(
                f"{self.path}: api.key_env: environment variable {self.api.key_env} is not set; "
                "export it with your API key"
            )
        return key


def load_job(path: str | os.PathLike[str]) -> Job:
    """Read and validate a job file; raise ConfigError with one line per problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read job file: {exc.strerror}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: YAML syntax error: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a job file is a mapping with api, budget, output and targets")
    if "api" in raw and raw["api"] is None:  # a section whose keys are all commented out
        raw["api"] = {}
    try:
        model = _JobModel.model_validate(raw)
    except ValidationError as exc:
        lines = _line_index(node)
        errors = exc.errors()
        if any(len(e["loc"]) > 1 and e["loc"][0] == "targets" for e in errors):
            # a target that fails validation is not counted: do not also say "no targets"
            errors = [
                e for e in errors if not (e["type"] == "too_short" and e["loc"] == ("targets",))
            ]
        raise ConfigError("\n".join(_describe(path, err, lines) for err in errors)) from None
    out_dir = model.output.dir if model.output.dir.is_absolute() else path.parent / model.output.dir
    output = model.output.model_copy(update={"dir": out_dir})
    return Job(path, model.api, model.budget, output, _expand(path, model.targets))


def _expand(path: Path, specs: tuple[TargetSpec, ...]) -> tuple[Target, ...]:
    seen: dict[str, int] = {}
    targets = []
    for index, spec in enumerate(specs):
        for region in spec.regions or (spec.region or "",):
            target = Target(spec.product_id, region, spec.max_pages)
            if target.key in seen:
                raise ConfigError(
                    f"{path}: targets[{index}]: product {spec.product_id} in {region} "
                    f"is already listed at targets[{seen[target.key]}]"
                )
            seen[target.key] = index
            targets.append(target)
    return tuple(targets)


def _check_region(value: str) -> str:
    if value not in REGIONS:
        raise ValueError(f"unknown region '{value}'; one of {', '.join(REGIONS)}")
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _line_index(node: yaml.Node | None) -> dict[tuple[str | int, ...], int]:
    """Map each field path of the YAML document to its 1-based line."""
    index: dict[tuple[str | int, ...], int] = {}

    def walk(n: yaml.Node, at: tuple[str | int, ...]) -> None:
        index[at] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                walk(value, (*at, str(key.value)))
                # a key's own line, not its value's: a nested block starts a line below
                index[(*at, str(key.value))] = key.start_mark.line + 1
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, (*at, i))

    if node is not None:
        walk(node, ())
    return index


def _describe(path: Path, err: Any, lines: dict[tuple[str | int, ...], int]) -> str:
    loc = tuple(part for part in err["loc"] if not (isinstance(part, str) and "[" in part))
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), None)
    where = f"{path}:{line}" if line else str(path)
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = f"unknown key '{loc[-1]}'"
    elif err["type"] == "too_short" and loc == ("targets",):
        message = "no targets; list at least one {product_id, region}"
    elif err["type"] == "missing":
        message = "required key is missing"
    elif (
        "input" in err
        and err["type"] not in ("value_error",)
        and not isinstance(err["input"], dict)
    ):
        message = f"{message} (got {err['input']!r})"
    return f"{where}: {field or 'job'}: {message}"
