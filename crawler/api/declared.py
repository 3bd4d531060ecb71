"""A declared endpoint made usable: its answers decoded by the dotted paths the job file gives.

Only the declared fields are decoded (a msgspec struct is built for them once, at load): the
item list stays the bytes the API sent (``msgspec.Raw``), as on the reviews endpoint, so items
are written as they came. The built-in reviews preset gets the hand-written decoder of
``endpoint``, which reads ids without decoding items; any other declaration, this one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from crawler.api.endpoint import (
    MAX_CURSOR,
    MAX_ID,
    REVIEWS,
    UNREADABLE,
    Cursor,
    CursorEndpoint,
    Page,
    as_lines,
    unfit,
    unreadable,
)
from crawler.api.redact import NOTHING, Redactor
from crawler.declarations import REVIEWS_PRESET, EndpointSpec
from crawler.errors import ServerError

_LEAF = msgspec.Raw  # a declared leaf is decoded as it is, then read by kind


def endpoint_of(name: str, spec: EndpointSpec) -> CursorEndpoint:
    """The runtime endpoint of a declaration."""
    if spec.model_copy(update={"credits_per_request": 2}) == REVIEWS_PRESET:
        return CursorEndpoint(
            name,
            REVIEWS.path,
            REVIEWS.cursor_param,
            REVIEWS.first_cursor,
            REVIEWS.decode,
            credits_per_request=spec.credits_per_request,
        )
    paging = spec.pagination
    fixed: tuple[tuple[str, str], ...] = ()
    if paging.page_number is not None:
        first: Cursor = paging.page_number.first
        if paging.page_number.size_param:
            fixed = ((paging.page_number.size_param, str(paging.page_number.size)),)
    else:
        assert paging.cursor is not None  # noqa: S101 -- Pagination has exactly one
        first = paging.cursor.first
    return CursorEndpoint(
        name,
        spec.path,
        paging.param,
        first,
        _Decoder(spec),
        templates=tuple(spec.params.items()),
        fixed=fixed,
        credits_per_request=spec.credits_per_request,
    )


class _Decoder:
    """Bytes -> Page by the declaration's paths."""

    def __init__(self, spec: EndpointSpec) -> None:
        paging = spec.pagination
        self._items = spec.items.split(".")
        self._next = paging.cursor.next.split(".") if paging.cursor else None
        self._more = (
            paging.cursor.has_more.split(".") if paging.cursor and paging.cursor.has_more else None
        )
        self._size = paging.page_number.size if paging.page_number else None
        self._total = spec.total.split(".") if spec.total else None
        paths = [p for p in (self._items, self._next, self._more, self._total) if p]
        code = None if any(p[0] == "code" for p in paths) else ["code"]
        self._code = code
        self._page = msgspec.json.Decoder(_struct([*paths, *([code] if code else [])], "Answer"))
        self.item_id = path_reader(spec.item_id)
        self._what = spec.items

    def __call__(self, body: bytes, redact: Redactor = NOTHING, cursor: Cursor = 0) -> Page:
        try:
            doc = self._page.decode(body)
        except msgspec.DecodeError:
            raise ServerError(unfit(body, redact, self._what), status=200) from None
        except UNREADABLE as exc:
            raise ServerError(unreadable(exc), status=200) from None
        if self._code is not None:
            code = _read(_at(doc, self._code))
            if code not in (None, 0):
                raise ServerError(unfit(body, redact, self._what), status=200)
        raws = _at(doc, self._items)
        if not isinstance(raws, list):
            raise ServerError(
                f"answer does not fit the declaration: no item list at '{self._what}'", status=200
            )
        ids = [self.item_id(raw) for raw in raws]
        total = _read(_at(doc, self._total)) if self._total else None
        if not isinstance(total, int) or isinstance(total, bool) or not 0 <= total <= MAX_ID:
            total = None
        if self._size is not None:  # numbered pages: a short or empty page is the last
            has_more = len(raws) >= self._size
            next_cursor: Cursor | None = int(cursor) + 1
        else:
            next_cursor, has_more = self._cursor(doc, bool(raws))
        return Page(as_lines(body, raws), ids, next_cursor, has_more, total)

    def _cursor(self, doc: Any, any_items: bool) -> tuple[Cursor | None, bool]:
        assert self._next is not None  # noqa: S101 -- a cursor endpoint has its path
        value = _read(_at(doc, self._next))
        if value == "" or isinstance(value, bool | float):
            value = None
        if isinstance(value, int) and not -MAX_ID - 1 <= value <= MAX_ID:
            raise ServerError("next cursor is a number too large to keep", status=200)
        if isinstance(value, str) and len(value) > MAX_CURSOR:
            raise ServerError(f"next cursor is over {MAX_CURSOR:,} characters long", status=200)
        if value is not None and not isinstance(value, int | str):
            raise ServerError("next cursor is neither a number nor a string", status=200)
        more = (
            _read(_at(doc, self._more)) is True if self._more else value is not None and any_items
        )
        if more and value is None:
            raise ServerError("answer says has_more but gives no next cursor", status=200)
        return value, more


def _struct(paths: list[list[str]], name: str) -> type[msgspec.Struct]:
    """A struct decoding only the fields on ``paths`` (each absent one None)."""
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = None
    return _build(tree, name)


def _build(tree: dict[str, Any], name: str) -> type[msgspec.Struct]:
    fields: list[tuple[str, Any, Any]] = []
    for i, (key, sub) in enumerate(tree.items()):
        # a raw leaf takes any JSON, null included (a Raw in a union would not); a branch may
        # be null or absent
        kind: Any = _LEAF if sub is None else _build(sub, f"{name}_{i}") | None
        fields.append((key, kind, None))
    return msgspec.defstruct(name, fields)


def _at(doc: Any, path: list[str] | None) -> Any:
    """The value at ``path``: a list of raw items for the item list, else one raw value."""
    if path is None:
        return None
    node = doc
    for part in path:
        node = getattr(node, part, None)
        if node is None:
            return None
    if isinstance(node, msgspec.Raw):
        return _raw_list(node) if path is not None and _is_list(node) else node
    return node


def _is_list(raw: msgspec.Raw) -> bool:
    return bytes(memoryview(raw)[:1]) == b"["


_RAWS = msgspec.json.Decoder(list[msgspec.Raw])
_ANY = msgspec.json.Decoder()


def _raw_list(raw: msgspec.Raw) -> list[msgspec.Raw]:
    return _RAWS.decode(raw)


def _read(value: Any) -> Any:
    """A declared leaf as Python: a number, a string, a boolean; None when absent or null."""
    if isinstance(value, msgspec.Raw):
        try:
            return _ANY.decode(value)
        except UNREADABLE:
            return None
    return value


def path_reader(path: str) -> Callable[[msgspec.Raw | bytes], str | None]:
    """The value at a dotted path inside an item, as a string of an id; None without one."""
    decoder = msgspec.json.Decoder(_struct([path.split(".")], "Item"))
    parts = path.split(".")

    def read(raw: msgspec.Raw | bytes) -> str | None:
        try:
            value = _read(_at(decoder.decode(raw), parts))
        except msgspec.DecodeError:
            return None
        except UnicodeDecodeError:
            raise ServerError("an item id is not valid UTF-8", status=200) from None
        if isinstance(value, bool) or value is None:
            return None
        if isinstance(value, int):
            return str(value) if value >= 0 else None
        return value if isinstance(value, str) and value else None

    return read
