"""Sources: the targets an endpoint is walked for (a seller and a region, a category), read from
the job file or a CSV, and what the walk of one turns into review targets."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import orjson

from crawler.declarations import SourceSpec
from crawler.errors import ConfigError
from crawler.targets import REGION_INDEX, check_product_id, check_region

MAX_SOURCE_TARGETS = 100_000  # a source's targets: sellers, categories (not products)
MAX_ERRORS = 20


class UnknownField(ValueError):
    """An endpoint's parameters name a field the source's targets do not give."""

    def __init__(self, field: str, given: list[str], where: str) -> None:
        super().__init__(
            f"unknown field {{{field}}}: {where} gives {', '.join(given) or 'no fields'}"
        )


@dataclass(frozen=True, slots=True)
class SourceTarget:
    """One walk of a source's endpoint: the source and the fields its parameters are filled from."""

    source: str
    fields: tuple[tuple[str, str], ...]  # sorted by name
    max_pages: int | None = None

    def value(self, name: str) -> str:
        for key, value in self.fields:
            if key == name:
                return value
        raise KeyError(name)  # load_job checked every template's fields are there

    @property
    def region(self) -> str:
        return next((v for k, v in self.fields if k == "region"), "")

    @property
    def key(self) -> str:
        """The target as the state keeps it: its fields as JSON."""
        return orjson.dumps(dict(self.fields)).decode()

    @property
    def product_id(self) -> str:
        """What the walker's log lines name it by."""
        return f"{self.source}:" + ",".join(f"{k}={v}" for k, v in self.fields)


@dataclass(frozen=True)
class Source:
    """A validated source: its endpoint, its targets, where a product id is in an item, and the
    regions a product found under a target without a ``region`` is walked in."""

    name: str
    endpoint: str
    targets: tuple[SourceTarget, ...]
    product_path: str
    default_regions: tuple[str, ...]

    def regions_of(self, target: SourceTarget) -> tuple[str, ...]:
        return (target.region,) if target.region else self.default_regions


def read_source(
    job_path: Path,
    index: int,
    spec: SourceSpec,
    needed: set[str],
    default_regions: tuple[str, ...] | None,
) -> Source:
    """A source's targets, checked: every field the endpoint's parameters name, a valid region;
    ConfigError with file, line and column otherwise."""
    errors: list[str] = []
    rows: list[tuple[dict[str, str], str]] = []  # (fields, where)
    if spec.targets_file is not None:
        file = (
            spec.targets_file
            if spec.targets_file.is_absolute()
            else job_path.parent / spec.targets_file
        )
        rows = _read_csv(file, errors, needed)
    else:
        for i, row in enumerate(spec.targets):
            rows.append(
                (
                    {k: str(v).strip() for k, v in row.items()},
                    f"{job_path}: sources[{index}].targets[{i}]",
                )
            )
    targets: dict[str, SourceTarget] = {}
    for fields, where in rows:
        problem = _problem(fields, needed, default_regions)
        if problem:
            errors.append(f"{where}: {problem}")
        else:
            target = SourceTarget(spec.label, tuple(sorted(fields.items())))
            targets.setdefault(target.key, target)  # a row given twice is walked once
        if len(errors) >= MAX_ERRORS:
            break
    if not errors and not targets:
        errors.append(f"{job_path}: sources[{index}]: no targets")
    if len(targets) > MAX_SOURCE_TARGETS:
        errors.append(f"{job_path}: sources[{index}]: over {MAX_SOURCE_TARGETS:,} targets")
    if errors:
        raise ConfigError("\n".join(errors))
    return Source(
        spec.label, spec.endpoint, tuple(targets.values()), spec.product_id, default_regions or ()
    )


def _problem(
    fields: dict[str, str], needed: set[str], default_regions: tuple[str, ...] | None
) -> str | None:
    missing = sorted(n for n in needed if not fields.get(n))
    if missing:
        return (
            f"no value for {', '.join(missing)} (the endpoint's params name "
            f"{', '.join('{' + m + '}' for m in missing)})"
        )
    region = fields.get("region")
    if region:
        return check_region(region)
    if not default_regions:
        return "no region: give a 'region' field, or default_regions for the whole job"
    return None


def _read_csv(file: Path, errors: list[str], needed: set[str]) -> list[tuple[dict[str, str], str]]:
    try:
        text = file.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read targets file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not UTF-8 text; save the file as UTF-8") from None
    lines = text.splitlines()
    if not lines:
        raise ConfigError(f"{file}:1: empty; a CSV with a header naming the fields")
    delimiter = max((",", ";", "\t"), key=lines[0].count)
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = [h.strip() for h in next(reader)]
        if unknown := sorted(needed - set(header)):
            raise UnknownField(unknown[0], header, f"the header of {file.name}")
        rows = []
        for number, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                errors.append(f"{file}:{number}: {len(row)} fields, the header names {len(header)}")
                continue
            rows.append(
                ({h: c.strip() for h, c in zip(header, row, strict=True) if h}, f"{file}:{number}")
            )
    except csv.Error as exc:
        raise ConfigError(f"{file}: unreadable CSV ({exc})") from None
    return rows


def product_reader(path: str) -> Callable[[bytes | msgspec.Raw], str | None]:
    """A product id from an item (at ``path``), checked as a target's id; None without one."""
    from crawler.api.declared import path_reader  # noqa: PLC0415 -- keeps config free of the API

    read = path_reader(path)

    def product(raw: bytes | msgspec.Raw) -> str | None:
        value = read(raw)
        return value if value is not None and check_product_id(value) is None else None

    return product


def found_targets(
    source: Source, target: SourceTarget, products: list[str]
) -> list[tuple[str, str]]:
    """The review targets (product, region) a source page's products make."""
    regions = [r for r in source.regions_of(target) if r in REGION_INDEX]
    return [(p, r) for p in dict.fromkeys(products) for r in regions]
