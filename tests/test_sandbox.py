"""The sandbox itself: a catalogue that grows, throttle windows, wrong-API answers, own process."""

from __future__ import annotations

import hashlib
from typing import Any

import aiohttp

from crawler.endpoint import REVIEWS
from tests.conftest import KEY, PRODUCTS

AUTH = {"Authorization": f"Bearer {KEY}"}

# computed from the catalogue before generations existed: (product, region, review_count,
# sha256 of its ids joined by spaces, sha256 of every page's ids, pages joined by newlines)
GENERATION_0 = [
    ("1729679758111249333", "US", 13, "0a89a079ad16981eef9d95b1", "12d9394c17c7455c0ec7ca84"),
    ("1729679758111249333", "GB", 545, "9dab468643149f30a9db5de8", "49f7fe0751eb4ca2449b0c69"),
    ("1729679758111249336", "DE", 96, "8f2627284203f9b11223469b", "c940b58e7a93185b3210f447"),
    ("1729679758111249338", "JP", 16, "2e6fdaa9c33b6877cb555b53", "649d46808399f699713d6c5d"),
    ("1729679758111249338", "US", 0, "e3b0c44298fc1c149afbf4c8", "e3b0c44298fc1c149afbf4c8"),
    ("12345678", "US", 246, "c77aff6ae7b32e9fc51d16f6", "1a00a3c4134684dfb79df730"),
]  # fmt: skip


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


async def _get(session: aiohttp.ClientSession, url: str, **params: str) -> Any:
    async with session.get(url, params=params) as r:
        assert r.status == 200
        return await r.json()


async def walk(url: str, product_id: str, region: str) -> tuple[list[list[str]], set[int]]:
    """Every page of a target over HTTP: each page's ids, and the review_count each page gave."""
    pages: list[list[str]] = []
    counts: set[int] = set()
    offset = 1
    async with aiohttp.ClientSession(headers=AUTH) as session:
        while True:
            params = {"product_id": product_id, "region": region, "offset": str(offset)}
            data = (await _get(session, url + REVIEWS.path, **params))["data"]
            pages.append([item["review"]["review_id"] for item in data["review_items"]])
            counts.add(data["review_count"])
            if not data["has_more"]:
                return pages, counts
            offset = data["next_cursor"]


async def sandbox_ids(url: str, product_id: str, region: str) -> list[str]:
    async with aiohttp.ClientSession() as session:
        doc = await _get(session, url + "/_sandbox/ids", product_id=product_id, region=region)
    ids: list[str] = doc["ids"]
    return ids


async def test_generation_0_is_the_catalogue_as_it_was(sandbox):
    async with sandbox() as (url, _):
        for product_id, region, count, ids_digest, pages_digest in GENERATION_0:
            pages, counts = await walk(url, product_id, region)
            ids = await sandbox_ids(url, product_id, region)
            assert counts == {count}, (product_id, region)
            assert _digest(" ".join(ids)) == ids_digest, (product_id, region)
            assert _digest("\n".join(" ".join(p) for p in pages)) == pages_digest
    assert PRODUCTS[0] == GENERATION_0[0][0]
