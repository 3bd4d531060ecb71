"""The job file: YAML in, validated immutable objects out, errors naming file, line and field."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from pathlib import Path

from pydantic import ValidationError

from crawler import declarations
from crawler.declarations import REVIEWS, REVIEWS_PRESET, EndpointSpec
from crawler.errors import ConfigError
from crawler.job_yaml import line_index, read_yaml
from crawler.settings import (
    MAX_BODY_BYTES,
    SANDBOX_KEY,
    ApiKey,
    ApiSettings,
    BudgetSettings,
    CoordinationSettings,
    JobModel,
    MetricsSettings,
    OutputSettings,
    RetrySettings,
    is_loopback,
    masked_url,
)
from crawler.settings_errors import describe, located
from crawler.sources import Source, UnknownField, read_source
from crawler.targets import REGION_INDEX, Collector, TargetList
from crawler.targets_file import read_targets_file

# what the rest of the code and a library user import from here
__all__ = [
    "MAX_BODY_BYTES",
    "ApiKey",
    "ApiSettings",
    "BudgetSettings",
    "CoordinationSettings",
    "Job",
    "MetricsSettings",
    "OutputSettings",
    "RetrySettings",
    "is_loopback",
    "load_job",
    "masked_url",
]


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
    text, raw = read_yaml(path, data)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a job file is a mapping with api, budget, output and targets")
    if "api" in raw and raw["api"] is None:  # a section whose keys are all commented out
        raw["api"] = {}
    try:
        model = JobModel.model_validate(raw)
    except ValidationError as exc:
        lines = line_index(text)
        raise ConfigError("\n".join(describe(path, e, lines) for e in exc.errors())) from None
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


def _sources(path: Path, text: str, model: JobModel) -> tuple[Source, ...]:
    """The declared sources, checked against the endpoints and read (their targets)."""
    found = declarations.problems(model.endpoints, model.sources)
    if found:
        lines = line_index(text)
        raise ConfigError("\n".join(located(path, loc, why, lines) for loc, why in found))
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
                raise ConfigError(located(path, loc, why, line_index(text)))
        try:
            sources.append(read_source(path, index, spec, needed, model.default_regions))
        except UnknownField as exc:
            loc = ("endpoints", spec.endpoint, "params")
            raise ConfigError(located(path, loc, str(exc), line_index(text))) from None
    return tuple(sources)


def _collect(path: Path, text: str, model: JobModel, *, sourced: bool = False) -> TargetList:
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
        line = line_index(text).get(("targets",))
        raise ConfigError(
            f"{path}{f':{line}' if line else ''}: targets: no targets; list at least one "
            "{product_id, region} or name a targets_file"
        )
    return into.targets


def _with_lines(path: Path, text: str, messages: list[str]) -> list[str]:
    """Put the YAML line into messages about inline targets: parsing the document again for
    line numbers is only worth it once there is something to say."""
    lines = line_index(text)
    prefix = f"{path}: targets["

    def located(message: str) -> str:
        if not message.startswith(prefix):
            return message
        index = int(message[len(prefix) : message.index("]", len(prefix))])
        line = lines.get(("targets", index))
        return message.replace(f"{path}: ", f"{path}:{line}: ", 1) if line else message

    return [located(m) for m in messages]
