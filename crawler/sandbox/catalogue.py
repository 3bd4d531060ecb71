"""The emulator's deterministic catalogue: each product/region's reviews, derived from its id.

Nothing is random: the same product id gives the same reviews, pages and duplicates in every
process, so tests can ask the sandbox for the full set of ids a crawl must produce.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache


def _h(*parts: object) -> int:
    data = "|".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@dataclass(frozen=True)
class PageSlice:
    ids: list[str]
    has_more: bool
    next_cursor: int


@dataclass(frozen=True)
class Catalogue:
    page_size: int = 10

    def review_count(self, product_id: str, region: str) -> int:
        """0 for about 1 in 7 targets; most have tens to hundreds; a few have thousands."""
        h = _h("count", product_id, region)
        bucket, rest = h % 100, h // 100
        if bucket < 15:
            return 0
        if bucket < 65:
            return 1 + rest % 120
        if bucket < 95:
            return 120 + rest % 600
        return 700 + rest % 3000

    def shares_reviews(self, product_id: str) -> bool:
        """About one product in three shows some of its reviews in every region it is sold in."""
        return _h("shared", product_id) % 3 == 0

    def review_id(self, product_id: str, region: str, index: int) -> str:
        shared = self.shares_reviews(product_id) and _h("s", product_id, index) % 3 == 0
        scope = "*" if shared else region
        return str(10**18 + _h("id", product_id, scope, index) % (9 * 10**18))

    def ids(self, product_id: str, region: str) -> list[str]:
        """Every distinct review id of the target, in feed order."""
        return list(_ids(self, product_id, region))

    def page(self, product_id: str, region: str, offset: int) -> PageSlice:
        """Page ``offset`` (1-based). Now and then it repeats the last review of the page before,
        as a relevance-sorted feed does."""
        ids = _ids(self, product_id, region)
        start = (offset - 1) * self.page_size
        chunk = list(ids[start : start + self.page_size])
        if chunk and offset > 1 and _h("dup", product_id, region, offset) % 4 == 0:
            chunk.insert(0, ids[start - 1])
        has_more = start + self.page_size < len(ids)
        return PageSlice(chunk, has_more, offset + 1)


@lru_cache(maxsize=4096)
def _ids(catalogue: Catalogue, product_id: str, region: str) -> tuple[str, ...]:
    count = catalogue.review_count(product_id, region)
    unique = dict.fromkeys(catalogue.review_id(product_id, region, i) for i in range(count))
    return tuple(unique)
