"""A cursor endpoint described as data: path, parameters, and where items, cursor and ids live.

The walker and the client read only this description, so another cursor endpoint of the same API
is added by writing one more ``CursorEndpoint``, not by copying the walker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from crawler.errors import ServerError
from crawler.targets import Target

Cursor = int | str


@dataclass(frozen=True, slots=True)
class Page:
    """One parsed answer: its items, where to go next, and what the API says of the whole."""

    items: list[dict[str, Any]]
    next_cursor: Cursor | None
    has_more: bool
    total: int | None


@dataclass(frozen=True, slots=True)
class CursorEndpoint:
    name: str
    path: str
    cursor_param: str
    first_cursor: Cursor
    items_at: tuple[str, ...]
    has_more_at: tuple[str, ...]
    next_cursor_at: tuple[str, ...]
    total_at: tuple[str, ...]
    item_id_at: tuple[str, ...]

    def params(self, target: Target, cursor: Cursor) -> dict[str, str]:
        return {
            "product_id": target.product_id,
            "region": target.region,
            self.cursor_param: str(cursor),
        }

    def parse(self, body: Mapping[str, Any]) -> Page:
        """Read a successful envelope's page; a shape that does not fit is a server fault."""
        items = _dig(body, self.items_at)
        has_more = _dig(body, self.has_more_at)
        if not isinstance(items, list) or not isinstance(has_more, bool):
            raise ServerError("answer lacks the item list or has_more")
        cursor = _dig(body, self.next_cursor_at)
        if has_more and not isinstance(cursor, int | str):
            raise ServerError("answer says has_more but gives no next cursor")
        total = _dig(body, self.total_at)
        return Page(items, cursor, has_more, total if isinstance(total, int) else None)

    def item_id(self, item: Mapping[str, Any]) -> str | None:
        try:  # the per-review hot path: plain indexing first, the careful walk only on a miss
            value = item
            for key in self.item_id_at:
                value = value[key]  # a miss raises, caught below
        except (KeyError, TypeError, IndexError):
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value if isinstance(value, str) and value else None


def _dig(doc: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(doc, Mapping):
            return None
        doc = doc.get(key)
    return doc


REVIEWS = CursorEndpoint(
    name="reviews",
    path="/v1/tiktok/product/reviews",
    cursor_param="offset",
    first_cursor=1,
    items_at=("data", "review_items"),
    has_more_at=("data", "has_more"),
    next_cursor_at=("data", "next_cursor"),
    total_at=("data", "review_count"),
    item_id_at=("review", "review_id"),
)
