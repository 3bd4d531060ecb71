"""The job file: YAML in, validated immutable objects out, errors naming file, line and field."""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import yaml
from annotated_types import Le
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from crawler import declarations
from crawler.declarations import REVIEWS, REVIEWS_PRESET, EndpointSpec, SourceSpec
from crawler.errors import ConfigError
from crawler.sources import Source, UnknownField, read_source
from crawler.targets import (
    MAX_PAGES,
    REGION_INDEX,
    Collector,
    TargetList,
    check_region,
    read_targets_file,
)

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


class _JobModel(_Model):
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
_SECTIONS: dict[str, type[BaseModel]] = {
    "under api": ApiSettings,
    "under api.retry": RetrySettings,
    "under budget": BudgetSettings,
    "under output": OutputSettings,
    "under coordination": CoordinationSettings,
    "under metrics": MetricsSettings,
    "in each target": TargetSpec,
    "in each endpoint": declarations.EndpointSpec,
    "in each source": declarations.SourceSpec,
    "at the top level": _JobModel,
}


@dataclass(frozen=True)
class Job:
    """A validated job: what to fetch, how fast, for how much, and where to."""

    path: Path
    api: ApiSettings
    budget: BudgetSettings
    output: OutputSettings
    targets: TargetList
    refresh: str = "early_stop"  # what --refresh walks of a changed target: see README
    coordination: CoordinationSettings | None = None
    metrics: MetricsSettings | None = None
    # every endpoint the job walks, ``reviews`` among them (the preset unless declared)
    endpoints: Mapping[str, EndpointSpec] = dataclass_field(default_factory=dict)
    sources: tuple[Source, ...] = ()

    @property
    def reviews(self) -> EndpointSpec:
        """The reviews endpoint: the job's own declaration, else the preset at the budget's
        ``credits_per_request``."""
        declared = self.endpoints.get(REVIEWS)
        if declared is not None:
            return declared
        return REVIEWS_PRESET.model_copy(
            update={"credits_per_request": self.budget.credits_per_request}
        )

    @property
    def name(self) -> str:
        """The job's name among the jobs of one Redis: ``coordination.job``, or the file's."""
        named = self.coordination.job if self.coordination else None
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.path.stem)
        return named or stem

    def coordinated(self, redis_url: str | None) -> Job:
        """This job worked through Redis at ``redis_url`` (the command line's ``--redis``, which
        fills in or overrides ``coordination.redis_url``)."""
        if redis_url is None:
            if self.coordination is not None and self.coordination.redis_url is None:
                raise ConfigError(
                    f"{self.path}: coordination.redis_url: not set; give it there, or run with "
                    "--redis URL"
                )
            return self
        try:
            settings = CoordinationSettings.model_validate({"redis_url": redis_url})
        except ValidationError as exc:  # its text holds the URL as given: password and all
            error = exc.errors()[0]
            said = str(error["msg"]).removeprefix("Value error, ")
            if error["type"] != "value_error":
                said = f"'{masked_url(redis_url)}' is not a Redis URL (redis://HOST:PORT/DB)"
            raise ConfigError(f"--redis: {said}") from None
        if self.coordination is not None:
            settings = self.coordination.model_copy(update={"redis_url": settings.redis_url})
        return replace(self, coordination=settings)

    def with_metrics(self, port: int | None, host: str | None) -> Job:
        """This job with the command line's ``--metrics-port`` / ``--metrics-host`` over the
        job file's ``metrics`` section."""
        if port is None and host is None:
            return self
        if port is None and self.metrics is None:
            raise ConfigError("--metrics-host: give --metrics-port too (or metrics.port)")
        given = {"port": port, "host": host}
        merged = {**(self.metrics.model_dump() if self.metrics else {}), **{
            k: v for k, v in given.items() if v is not None
        }}  # fmt: skip
        try:
            settings = MetricsSettings.model_validate(merged)
        except ValidationError as exc:
            error = exc.errors()[0]
            raise ConfigError(f"--metrics-{error['loc'][0]}: {error['msg']}") from None
        return replace(self, metrics=settings)

    @property
    def redis_url(self) -> str:
        """The Redis of a coordinated job (``coordinated`` made sure there is one)."""
        url = self.coordination.redis_url if self.coordination else None
        if url is None:
            raise ConfigError(
                f"{self.path}: coordination.redis_url: not set; give it there, or --redis URL"
            )
        return url

    def api_key(self, environ: Mapping[str, str] | None = None) -> ApiKey:
        """The key from the environment (never from the file); ConfigError names the variable."""
        if self.api.is_sandbox:
            return ApiKey(SANDBOX_KEY)
        env = os.environ if environ is None else environ
        key = env.get(self.api.key_env, "").strip()
        if not key:
            raise ConfigError(
                f"{self.path}: api.key_env: environment variable {self.api.key_env} is not set; "
                "export it with your API key"
            )
        return ApiKey(key)


def load_job(path: str | os.PathLike[str]) -> Job:
    """Read and validate a job file and its targets; raise ConfigError with one line per
    problem (bad targets: every one, up to a cap)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read job file: {exc.strerror}") from None
    try:
        # newlines as read_text would give them: \r\n and \r are \n
        text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        raise ConfigError(_not_utf8(path, data, exc)) from None
    try:
        if "&" in text:  # without an anchor there is no alias to follow
            _check_aliases(text)
        raw = yaml.load(text, Loader=_LOADER)  # noqa: S506 -- a safe loader: plain data only
    except yaml.reader.ReaderError as exc:  # its own text is two lines, and no line number
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(
            f"{path}:{line}: character U+{exc.character:04X}: {exc.reason} in YAML; remove it"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        kind = "" if isinstance(exc, _Refused) else "YAML syntax error: "
        raise ConfigError(f"{path}{where}: {kind}{problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a job file is a mapping with api, budget, output and targets")
    if "api" in raw and raw["api"] is None:  # a section whose keys are all commented out
        raw["api"] = {}
    try:
        model = _JobModel.model_validate(raw)
    except ValidationError as exc:
        lines = _line_index(text)
        raise ConfigError("\n".join(_describe(path, e, lines) for e in exc.errors())) from None
    out_dir = model.output.dir if model.output.dir.is_absolute() else path.parent / model.output.dir
    if model.output.bucket is not None and model.output.work_dir is None:
        out_dir = _work_dir(path, model.output.bucket)
    output = model.output.model_copy(update={"dir": out_dir})
    sources = _sources(path, text, model)
    targets = _collect(path, text, model, sourced=bool(sources))
    return Job(
        path,
        model.api,
        model.budget,
        output,
        targets,
        model.refresh,
        model.coordination,
        model.metrics,
        dict(model.endpoints),
        sources,
    )


def _work_dir(path: Path, url: str) -> Path:
    """A bucket job's local folder when the job file names none: beside the job file, one per
    bucket and prefix (``.crawler/BUCKET/PREFIX``)."""
    from crawler.output.bucket import BucketUrl  # noqa: PLC0415 -- no client: the URL only

    parsed = BucketUrl.parse(url)
    return path.parent / ".crawler" / parsed.bucket / (parsed.prefix or "_")


def _sources(path: Path, text: str, model: _JobModel) -> tuple[Source, ...]:
    """The declared sources, checked against the endpoints and read (their targets)."""
    found = declarations.problems(model.endpoints, model.sources)
    if found:
        lines = _line_index(text)
        raise ConfigError("\n".join(_located(path, loc, why, lines) for loc, why in found))
    sources = []
    for index, spec in enumerate(model.sources):
        endpoint = model.endpoints[spec.endpoint]
        needed = endpoint.fields()
        if spec.targets:
            given = set().union(*(row.keys() for row in spec.targets))
            if unknown := sorted(needed - given):
                loc = ("endpoints", spec.endpoint, "params")
                why = (
                    f"unknown field {{{unknown[0]}}}: the targets of sources[{index}] give "
                    f"{', '.join(sorted(given)) or 'no fields'}"
                )
                raise ConfigError(_located(path, loc, why, _line_index(text)))
        try:
            sources.append(read_source(path, index, spec, needed, model.default_regions))
        except UnknownField as exc:
            loc = ("endpoints", spec.endpoint, "params")
            raise ConfigError(_located(path, loc, str(exc), _line_index(text))) from None
    return tuple(sources)


def _located(
    path: Path, loc: tuple[str | int, ...], why: str, lines: dict[tuple[str | int, ...], int]
) -> str:
    line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), None)
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return f"{path}{f':{line}' if line else ''}: {field}: {why}"


class _Refused(yaml.constructor.ConstructorError):
    """Valid YAML that a job file must not be; its message needs no "syntax error"."""


class _DuplicateKey(_Refused):
    pass


# values YAML aliases may copy in all: a few shared settings take tens; a "billion laughs" file
# of a few hundred bytes copies 10**9 (each alias level multiplies the one below), hanging the
# load and growing until the OOM killer ends it
MAX_ALIASED_VALUES = 100_000


def _check_aliases(text: str) -> None:
    """Refuse aliases that copy more than ``MAX_ALIASED_VALUES`` values, or a node into itself.

    Counted from the parser's events, before anything is built: an alias costs the values of
    the node it names, aliases in that node included, so the count grows as the copies would.
    """
    sizes: dict[str, int] = {}  # anchor -> values its node holds, aliases expanded
    open_nodes: list[list[Any]] = []  # [values so far, anchor] of each collection being read
    copied = 0
    for event in yaml.parse(text, Loader=_BASE_LOADER):
        if isinstance(event, yaml.AliasEvent):
            name = str(event.anchor)
            mark: Any = event.start_mark  # libyaml's Mark or PyYAML's: the same fields
            if any(anchor == name for _, anchor in open_nodes):
                raise _Refused(
                    problem=f"YAML alias *{name} is inside the node it names (a loop); "
                    "write the values out",
                    problem_mark=mark,
                )
            size = sizes.get(name, 1)  # an unknown anchor: the composer says so
            copied += size
            if copied > MAX_ALIASED_VALUES:
                raise _Refused(
                    problem=f"YAML alias *{name}: aliases copy more than "
                    f"{MAX_ALIASED_VALUES:,} values in all; anchors and aliases are for a few "
                    "shared settings: write the values out, or list targets in a targets_file",
                    problem_mark=mark,
                )
        elif isinstance(event, yaml.ScalarEvent):
            size = 1
            if event.anchor is not None:
                sizes[event.anchor] = size
        elif isinstance(event, yaml.CollectionStartEvent):
            open_nodes.append([1, event.anchor])
            continue
        elif isinstance(event, yaml.CollectionEndEvent):
            size, anchor = open_nodes.pop()
            if anchor is not None:
                sizes[anchor] = size
        else:
            continue
        if open_nodes:
            open_nodes[-1][0] += size


# libyaml's parser when PyYAML was built with it: several times faster on long target lists
_BASE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BASE_LOADER):  # type: ignore[misc]  # PyYAML's loaders are untyped (Any)
    """A safe loader that refuses a key given twice in one mapping: YAML would keep the last one
    silently (``max_credits: 200`` then ``max_credits: 999999`` spends the second)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys it brings may
                continue  # be overridden here, which is what merging is for
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue  # the constructor below says what is wrong with such a key
            if key in lines:
                raise _DuplicateKey(
                    problem=f"{key}: given twice in one mapping (first on line {lines[key]}); "
                    "say it once",
                    problem_mark=key_node.start_mark,
                )
            lines[key] = key_node.start_mark.line + 1
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


_LOADER: Any = _Loader


def _not_utf8(path: Path, data: bytes, exc: UnicodeDecodeError) -> str:
    line = data.count(b"\n", 0, exc.start) + 1
    utf16 = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
    return (
        f"{path}:{line}: not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
        f"({exc.reason}){utf16}; save the file as UTF-8"
    )


def _collect(path: Path, text: str, model: _JobModel, *, sourced: bool = False) -> TargetList:
    """Inline targets, then the targets file's; every problem found, up to a cap."""
    into = Collector()
    defaults = model.default_regions
    source = into.source(f"{path}: targets[{{}}]", "targets[{}]")
    for index, spec in enumerate(model.targets):
        regions = spec.regions or ((spec.region,) if spec.region else defaults)
        if not regions:
            into.problem(
                f"{path}: targets[{index}]: give 'region' or 'regions' "
                "(or default_regions for the whole job)"
            )
            continue
        for region in regions:
            into.add(spec.product_id, REGION_INDEX[region], spec.max_pages, source, index)
    if model.targets_file is not None:
        file = model.targets_file
        located = file if file.is_absolute() else path.parent / file
        read_targets_file(located, defaults, into, shown=str(located))
    if into.bad:
        raise ConfigError("\n".join(_with_lines(path, text, into.summary())))
    if not into.targets and not sourced:
        line = _line_index(text).get(("targets",))
        raise ConfigError(
            f"{path}{f':{line}' if line else ''}: targets: no targets; list at least one "
            "{product_id, region} or name a targets_file"
        )
    return into.targets


def _with_lines(path: Path, text: str, messages: list[str]) -> list[str]:
    """Put the YAML line into messages about inline targets: parsing the document again for
    line numbers is only worth it once there is something to say."""
    lines = _line_index(text)
    prefix = f"{path}: targets["

    def located(message: str) -> str:
        if not message.startswith(prefix):
            return message
        index = int(message[len(prefix) : message.index("]", len(prefix))])
        line = lines.get(("targets", index))
        return message.replace(f"{path}: ", f"{path}:{line}: ", 1) if line else message

    return [located(m) for m in messages]


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


def _line_index(text: str) -> dict[tuple[str | int, ...], int]:
    """Map each field path of the YAML document to its 1-based line."""
    index: dict[tuple[str | int, ...], int] = {}
    node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))

    # a loop, not recursion: a document nested 990 deep (libyaml's limit is 1,000) would pass
    # Python's recursion limit
    todo: list[tuple[yaml.Node, tuple[str | int, ...]]] = [] if node is None else [(node, ())]
    while todo:
        n, at = todo.pop()
        index.setdefault(at, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                # a key's own line, not its value's: a nested block starts a line below
                index.setdefault((*at, str(key.value)), key.start_mark.line + 1)
                todo.append((value, (*at, str(key.value))))
        elif isinstance(n, yaml.SequenceNode):
            todo.extend((item, (*at, i)) for i, item in enumerate(n.value))
    return index


def _describe(path: Path, err: Any, lines: dict[tuple[str | int, ...], int]) -> str:
    loc = tuple(part for part in err["loc"] if not (isinstance(part, str) and "[" in part))
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), None)
    where = f"{path}:{line}" if line else str(path)
    message = str(err["msg"]).removeprefix("Value error, ")
    kind = err["type"]
    if kind == "extra_forbidden":
        message = f"unknown key '{loc[-1]}'{_meant(loc)}"
    elif kind == "missing":
        message = "required key is missing"
    elif "input" in err and kind != "value_error" and not isinstance(err["input"], dict):
        value = err["input"]
        ceiling = _ceiling(loc)  # every number has one
        if ceiling is not None and _is_nan(value):
            message = "Input should be a number"
        elif kind == "less_than_equal":
            message = f"Input should be at most {_number(err['ctx']['le'])}"
        elif (
            kind == "int_parsing_size"  # too many digits to be an integer at all
            and ceiling is not None
            and not str(value).lstrip().startswith("-")
        ):
            message = f"Input should be at most {_number(ceiling)}"
        elif kind == "greater_than_equal":
            message = f"Input should be at least {_number(err['ctx']['ge'])}"
        message = f"{message} (got {_shown(value)})"
    return f"{where}: {field or 'job'}: {message}"


def _meant(loc: tuple[Any, ...]) -> str:
    """The key an unknown one was meant to be: a close name here, or the same name elsewhere."""
    key, model = str(loc[-1]), _model_at(loc[:-1])
    if model is None:
        return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.75)
    if close:
        return f"; did you mean '{close[0]}'?"
    home = next((at for at, m in _SECTIONS.items() if key in m.model_fields and m is not model), "")
    return f"; it goes {home}" if home else ""


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The settings class of the mapping at ``loc`` in the job file (None: not one)."""
    model: type[BaseModel] | None = _JobModel
    keyed = False  # the part is a key of a mapping of settings (an endpoint's name)
    for part in loc:
        if isinstance(part, int) or keyed:  # an item of a list of targets
            keyed = False
            continue
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        model = _inner_model(field.annotation)
        keyed = getattr(field.annotation, "__origin__", None) is dict
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """The settings class in an annotation: ``X``, ``X | None``, ``tuple[X, ...]``."""
    if not get_args(annotation) and isinstance(annotation, type):
        return annotation if issubclass(annotation, BaseModel) else None
    return next((m for a in get_args(annotation) if (m := _inner_model(a)) is not None), None)


def _ceiling(loc: tuple[Any, ...]) -> float | None:
    """The upper bound of the number at ``loc``, if it has one."""
    model = _model_at(loc[:-1])
    field = model.model_fields.get(loc[-1]) if model is not None and loc else None
    metadata = field.metadata if field is not None else []
    bounds = [m.le for m in metadata if isinstance(m, Le) and isinstance(m.le, int | float)]
    return float(bounds[0]) if bounds else None


def _is_nan(value: object) -> bool:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, float) and math.isnan(value)


def _number(bound: float) -> str:
    """A bound as the job file would give it: 3600, not 3600.0."""
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _shown(value: object) -> str:
    """A value as a message quotes it: any URL's password masked, cut short when long or deep."""
    return _REPR.repr(_masked(value, _REPR.maxlevel))


def _masked(value: object, depth: int) -> object:
    # below reprlib's depth nothing is shown, so nothing needs masking (or recursing into)
    if isinstance(value, str):
        return masked_url(value)
    if depth < 0:
        return value
    if isinstance(value, list | tuple):
        return type(value)(_masked(v, depth - 1) for v in value)
    if isinstance(value, dict):
        return {_masked(k, depth - 1): _masked(v, depth - 1) for k, v in value.items()}
    return value


_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 4


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
