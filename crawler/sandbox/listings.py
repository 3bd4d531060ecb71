"""The emulator's product lists: a seller's listing and an Analytics-style list, deterministic.

Every product listed is in the catalogue with reviews in the list's region, so a discovery job
ends with reviews to walk. Products are drawn from one pool of ids, so two sellers (or a seller
and a list) share some: a product found twice must be walked once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

from crawler.sandbox.catalogue import Catalogue

POOL_START = 1729679758111249333  # the catalogue's products of the tests and demos
POOL = 60
SELLER_PAGE = 4  # products per page of a seller's listing
SHOP_PRODUCTS = "/v1/tiktok/shop/products"
ANALYTICS = "/v1/tiktok/shop/products/analytics"


def _h(*parts: object) -> int:
    data = "|".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@lru_cache(maxsize=1024)
def listed(kind: str, key: str, region: str, generation: int = 0) -> tuple[str, ...]:
    """The products a list holds, in its order: 2 to 11 of the pool, each with reviews; each
    generation adds one to about half the lists (a seller's new product)."""
    catalogue = Catalogue()
    wanted = 2 + _h("size", kind, key, region) % 10
    if _h("grows", kind, key, region) % 2 == 0:
        wanted += generation
    found: list[str] = []
    for i in range(POOL * 4):
        product = str(POOL_START + _h("pick", kind, key, region, i) % POOL)
        if product not in found and catalogue.review_count(product, region) > 0:
            found.append(product)
        if len(found) == wanted:
            break
    return tuple(found)


@dataclass(frozen=True)
class ListPage:
    products: list[str]
    has_more: bool
    next_cursor: str | None


def seller_page(seller_id: str, region: str, cursor: int, generation: int = 0) -> ListPage:
    """The listing's page at ``cursor`` (the offset of its first product, as a string)."""
    products = listed("seller", seller_id, region, generation)
    chunk = list(products[cursor : cursor + SELLER_PAGE])
    more = cursor + SELLER_PAGE < len(products)
    return ListPage(chunk, more, str(cursor + SELLER_PAGE) if more else None)


def analytics_page(
    key: str, region: str, page_num: int, page_size: int, generation: int = 0
) -> list[str]:
    """Page ``page_num`` (from 1) of ``page_size`` products; past the end, empty."""
    products = listed("analytics", key, region, generation)
    start = (page_num - 1) * page_size
    return list(products[start : start + page_size])


def product_item(product_id: str, region: str) -> dict[str, object]:
    """A product as a list shows it (the fields a user's listing would have, and more)."""
    n = _h("item", product_id)
    return {
        "product_id": product_id,
        "title": f"Sandbox product {product_id[-4:]}",
        "region": region,
        "price": {"amount": str(100 + n % 9900), "currency": "USD"},
        "sold_count": n % 50_000,
        "review_count": Catalogue().review_count(product_id, region),
    }
