"""The job file's ``endpoints:`` and ``sources:``: more endpoints of the API, declared as data, and
the sources that turn their items into review targets (validated with pydantic, like the rest).

An endpoint is a path, its parameters (``"{field}"``: a field of the walked target), where the
item list, each item's id and the pagination live in an answer, and its cost. The built-in
``reviews`` endpoint is one such declaration (``REVIEWS_PRESET``); a job may declare its own
``reviews`` to replace it. What must hold across declarations (a source's endpoint exists, its
targets give every field the endpoint's parameters name) is checked by ``problems``.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_CREDITS_PER_REQUEST = 10_000
MAX_PAGE_SIZE = 10_000
REVIEWS = "reviews"
# the review walk's own fields: what the reviews endpoint's parameters may name
REVIEW_FIELDS = ("product_id", "region")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


def _dotted(value: str) -> str:
    if not _DOTTED.fullmatch(value):
        raise ValueError(
            f"'{value:.60}' is not a dotted path (names joined by dots, like data.next_cursor)"
        )
    return value


class CursorPaging(_Model):
    """The next page is asked for with the cursor the answer gives."""

    param: str = Field(min_length=1, max_length=100)
    first: int | str
    next: str  # dotted path of the next cursor in an answer
    has_more: str | None = None  # dotted path; None: more while a next cursor is given

    @field_validator("next", "has_more")
    @classmethod
    def _paths(cls, value: str | None) -> str | None:
        return value if value is None else _dotted(value)


class PageNumberPaging(_Model):
    """Pages numbered from ``first``; a page shorter than ``size`` (or empty) is the last."""

    param: str = Field(min_length=1, max_length=100)
    first: int = Field(1, ge=0, le=1_000_000)
    size_param: str | None = Field(None, min_length=1, max_length=100)
    size: int = Field(gt=0, le=MAX_PAGE_SIZE)


class Pagination(_Model):
    cursor: CursorPaging | None = None
    page_number: PageNumberPaging | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Pagination:
        if (self.cursor is None) == (self.page_number is None):
            said = "both" if self.cursor is not None else "neither"
            raise ValueError(f"give exactly one of 'cursor' or 'page_number' ({said} given)")
        return self

    @property
    def param(self) -> str:
        paging = self.cursor or self.page_number
        assert paging is not None  # noqa: S101 -- _exactly_one
        return paging.param


class EndpointSpec(_Model):
    path: str = Field(max_length=500)
    params: dict[str, str] = Field(default_factory=dict)
    items: str  # dotted path of the item list; "data" for a bare array under data
    item_id: str  # dotted path inside an item
    total: str | None = None  # dotted path of an item count, when the answer gives one
    pagination: Pagination
    credits_per_request: int = Field(gt=0, le=MAX_CREDITS_PER_REQUEST)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"'{value:.60}' must start with '/' (a path on api.base_url)")
        if any(c in value for c in "?#{} \t") or "//" in value:
            raise ValueError(f"'{value:.60}' is not a plain path (no query, spaces or braces)")
        return value

    @field_validator("items", "item_id", "total")
    @classmethod
    def _paths(cls, value: str | None) -> str | None:
        return value if value is None else _dotted(value)

    @field_validator("params")
    @classmethod
    def _templates(cls, value: dict[str, str]) -> dict[str, str]:
        for name, template in value.items():
            fields_of(template, name)  # raises on a malformed one
        return value

    @model_validator(mode="after")
    def _consistent(self) -> EndpointSpec:
        paging = self.pagination
        taken = [paging.param]
        if paging.page_number is not None and paging.page_number.size_param:
            taken.append(paging.page_number.size_param)
        for name in taken:
            if name in self.params:
                raise ValueError(f"params.{name}: set by the pagination; leave it out of params")
        paths: list[str] = [self.items]
        if paging.cursor is not None:
            paths.append(paging.cursor.next)
            if paging.cursor.has_more is not None:
                paths.append(paging.cursor.has_more)
        paths += [self.total] if self.total else []
        for i, a in enumerate(paths):
            for b in paths[i + 1 :]:
                if a == b or b.startswith(a + ".") or a.startswith(b + "."):
                    raise ValueError(f"paths '{a}' and '{b}' overlap: each must be its own field")
        return self

    def fields(self) -> set[str]:
        """The target fields the parameters name."""
        return {f for name, t in self.params.items() for f in fields_of(t, name)}


def fields_of(template: str, name: str = "") -> list[str]:
    """The ``{field}`` names in a parameter's template; ValueError on a malformed one."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        raise ValueError(f"params.{name}: '{template:.60}' has an unmatched brace") from None
    found = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not _FIELD.fullmatch(field) or spec or conversion:
            raise ValueError(
                f"params.{name}: '{{{field}}}' is not a field name (letters, digits, _)"
            )
        found.append(field)
    return found


class SourceSpec(_Model):
    """Review targets found through the API: each item of the endpoint's pages names a product."""

    name: str | None = None  # default: the endpoint's name
    endpoint: str
    targets: tuple[dict[str, str | int], ...] = ()
    targets_file: Path | None = None
    product_id: str = "product_id"  # dotted path of the product id in an item

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.fullmatch(value):
            raise ValueError(f"'{value:.60}' is not a name (lower case letters, digits, _)")
        return value

    @field_validator("product_id")
    @classmethod
    def _product_path(cls, value: str) -> str:
        return _dotted(value)

    @field_validator("targets")
    @classmethod
    def _values(cls, value: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], ...]:
        for row in value:
            for key, item in row.items():
                if isinstance(item, bool) or not _FIELD.fullmatch(str(key)):
                    raise ValueError(f"{key}: {item!r:.60} is not a field and value")
        return value

    @model_validator(mode="after")
    def _one_list(self) -> SourceSpec:
        if bool(self.targets) == (self.targets_file is not None):
            raise ValueError("give 'targets' or 'targets_file' (one of them)")
        return self

    @property
    def label(self) -> str:
        return self.name or self.endpoint


REVIEWS_PRESET = EndpointSpec(
    path="/v1/tiktok/product/reviews",
    params={"product_id": "{product_id}", "region": "{region}"},
    items="data.review_items",
    item_id="review.review_id",
    total="data.review_count",
    pagination=Pagination(
        cursor=CursorPaging(
            param="offset", first=1, next="data.next_cursor", has_more="data.has_more"
        )
    ),
    credits_per_request=2,
)


def problems(
    endpoints: dict[str, EndpointSpec], sources: tuple[SourceSpec, ...]
) -> list[tuple[tuple[str | int, ...], str]]:
    """What the declarations get wrong together: (field path, why) each."""
    found: list[tuple[tuple[str | int, ...], str]] = []
    for name in endpoints:
        if not _NAME.fullmatch(name):
            found.append((("endpoints", name), f"'{name:.60}' is not a name (a-z, 0-9, _)"))
    reviews = endpoints.get(REVIEWS)
    if reviews is not None and (extra := reviews.fields() - set(REVIEW_FIELDS)):
        found.append(
            (
                ("endpoints", REVIEWS, "params"),
                f"unknown field {{{sorted(extra)[0]}}}: the reviews endpoint's targets have "
                f"{', '.join(REVIEW_FIELDS)}",
            )
        )
    labels: dict[str, int] = {}
    for index, source in enumerate(sources):
        if source.endpoint == REVIEWS:
            found.append((("sources", index, "endpoint"), "a source cannot walk the reviews"))
        elif source.endpoint not in endpoints:
            declared = ", ".join(sorted(n for n in endpoints if n != REVIEWS)) or "none"
            found.append(
                (
                    ("sources", index, "endpoint"),
                    f"unknown endpoint '{source.endpoint:.60}'; declared under endpoints: "
                    f"{declared}",
                )
            )
        if source.label in labels:
            found.append(
                (
                    ("sources", index),
                    f"a second source named '{source.label}' (sources[{labels[source.label]}]); "
                    "give each a distinct 'name'",
                )
            )
        labels.setdefault(source.label, index)
    return found
