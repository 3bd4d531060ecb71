"""The emulator's deterministic catalogue: each product/region's reviews, derived from its id.

Nothing is random: the same product id gives the same reviews, pages and duplicates in every
process, so tests can ask the sandbox for the full set of ids a crawl must produce.

Generation 0 is the catalogue as first published. Each later generation adds a few reviews to
about a third of the targets that have any, at scattered places in the feed (and, with
``shrink``, takes one or two away from about a tenth): what a re-crawl of a live shop meets.

With ``feed_cap``, a feed ends (``has_more: false``) after that many reviews while page 1 still
says the whole count: listings capped per sort order, as real review feeds are (about 5,000).
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
    generation: int = 0  # how many times the catalogue has grown since it was first published
    shrink: bool = False  # each generation also removes a review or two from a few targets
    feed_cap: int | None = None  # a feed shows at most this many reviews; its count says all

    def review_count(self, product_id: str, region: str) -> int:
        """What the feed says the target has: at generation 0 the figure below, later that
        figure moved by as many reviews as the generations added and removed."""
        base = _base_count(product_id, region)
        if self.generation == 0:
            return base
        now = _ids(product_id, region, self.generation, self.shrink)
        return base + len(now) - len(_ids(product_id, region, 0, False))

    def shares_reviews(self, product_id: str) -> bool:
        return _shares_reviews(product_id)

    def review_id(self, product_id: str, region: str, index: int) -> str:
        return _review_id(product_id, region, index)

    def ids(self, product_id: str, region: str) -> list[str]:
        """Every distinct review id the target's feed shows at this generation, in feed order:
        what a complete crawl writes (all the count says, unless ``feed_cap`` cuts it)."""
        return list(self._shown(product_id, region))

    def _shown(self, product_id: str, region: str) -> tuple[str, ...]:
        ids = _ids(product_id, region, self.generation, self.shrink)
        return ids if self.feed_cap is None else ids[: self.feed_cap]

    def changes(self, product_id: str, region: str) -> tuple[list[str], list[str]]:
        """Ids present now and not at generation 0, and ids of generation 0 no longer present."""
        first = _ids(product_id, region, 0, False)
        now = _ids(product_id, region, self.generation, self.shrink)
        was, present = set(first), set(now)
        return [i for i in now if i not in was], [i for i in first if i not in present]

    def page(self, product_id: str, region: str, offset: int) -> PageSlice:
        """Page ``offset`` (1-based). Now and then it repeats the last review of the page before,
        as a relevance-sorted feed does."""
        ids = self._shown(product_id, region)
        start = (offset - 1) * self.page_size
        chunk = list(ids[start : start + self.page_size])
        if chunk and offset > 1 and _h("dup", product_id, region, offset) % 4 == 0:
            chunk.insert(0, ids[start - 1])
        has_more = start + self.page_size < len(ids)
        return PageSlice(chunk, has_more, offset + 1)


def _base_count(product_id: str, region: str) -> int:
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


def _shares_reviews(product_id: str) -> bool:
    """About one product in three shows some of its reviews in every region it is sold in."""
    return _h("shared", product_id) % 3 == 0


def _as_id(h: int) -> str:
    return str(10**18 + h % (9 * 10**18))


def _review_id(product_id: str, region: str, index: int) -> str:
    shared = _shares_reviews(product_id) and _h("s", product_id, index) % 3 == 0
    scope = "*" if shared else region
    return _as_id(_h("id", product_id, scope, index))


@lru_cache(maxsize=4096)
def _ids(product_id: str, region: str, generation: int, shrink: bool) -> tuple[str, ...]:
    count = _base_count(product_id, region)
    ids = list(dict.fromkeys(_review_id(product_id, region, i) for i in range(count)))
    # from scratch each time: a loop, not recursion through the cache, so any generation works
    present = set(ids)
    for g in range(1, generation + 1):
        if shrink:
            _lose(ids, present, product_id, region, g)
        if count:
            _gain(ids, present, product_id, region, g)
    return tuple(ids)


def _lose(ids: list[str], present: set[str], product_id: str, region: str, g: int) -> None:
    """About one target in ten loses one or two reviews, from anywhere in its feed."""
    if _h("lose", product_id, region, g) % 10 != 0:
        return
    for k in range(1 + _h("lost", product_id, region, g) % 2):
        if ids:
            present.discard(ids.pop(_h("drop", product_id, region, g, k) % len(ids)))


def _gain(ids: list[str], present: set[str], product_id: str, region: str, g: int) -> None:
    """About one target in three gains 1 to 12 reviews, each at a hashed place in the feed."""
    if _h("grow", product_id, region, g) % 3 != 0:
        return
    for j in range(1 + _h("gain", product_id, region, g) % 12):
        review_id = _new_id(product_id, region, g, j, present)
        ids.insert(_h("at", product_id, region, g, j) % (len(ids) + 1), review_id)
        present.add(review_id)


def _new_id(product_id: str, region: str, g: int, j: int, present: set[str]) -> str:
    """The j-th review generation g adds. Like generation 0's, about a third of a sharing
    product's new reviews are the same in every region that gains a j-th review at g."""
    shared = _shares_reviews(product_id) and _h("s-new", product_id, g, j) % 3 == 0
    scope = "*" if shared else region
    salt = 0
    # a hash collision with a review already listed would make the addition vanish
    while (review_id := _as_id(_h("new", product_id, scope, g, j, salt))) in present:
        salt += 1
    return review_id
