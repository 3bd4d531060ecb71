"""The sandbox itself: a catalogue that grows, throttle windows, wrong-API answers, own process."""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import aiohttp
import orjson
import pytest

from crawler.api.endpoint import REVIEWS
from crawler.sandbox import Catalogue, SandboxOptions, key_fingerprint, serve_in_process
from crawler.sandbox.process import cli_flags
from crawler.targets import REGIONS
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


TARGETS = [(p, r) for p in PRODUCTS for r in REGIONS]


async def all_ids(url: str) -> dict[tuple[str, str], list[str]]:
    return {(p, r): await sandbox_ids(url, p, r) for p, r in TARGETS}


def is_subsequence(short: list[str], long: list[str]) -> bool:
    rest = iter(long)
    return all(i in rest for i in short)


def old_before_and_after(review_id: str, ids: list[str], old: set[str]) -> bool:
    at = ids.index(review_id)
    return any(i in old for i in ids[:at]) and any(i in old for i in ids[at + 1 :])


async def test_generations_add_scattered_new_reviews_and_keep_the_old(sandbox):
    async with sandbox() as (url0, _), sandbox(generation=1) as (url1, _):
        before, after = await all_ids(url0), await all_ids(url1)
        async with sandbox(generation=3) as (url3, _):
            later = await all_ids(url3)
    grown = added = inside = 0
    published = {i for ids in before.values() for i in ids}
    for target, old in before.items():
        new = [i for i in after[target] if i not in set(old)]
        assert not published & set(new), target  # new ids are new to every target
        assert is_subsequence(old, after[target]), target  # nothing lost, order kept
        assert len(after[target]) == len(set(after[target]))
        assert all(len(i) == 19 and i.isdigit() for i in new)
        assert old or not new  # an empty target stays empty
        grown, added = grown + bool(new), added + len(new)
        inside += sum(old_before_and_after(i, after[target], set(old)) for i in new)
        assert set(after[target]) <= set(later[target]), target  # generations accumulate
    with_reviews = sum(bool(old) for old in before.values())
    assert with_reviews * 0.2 < grown < with_reviews * 0.5
    assert inside > added / 2  # most land among the old reviews, not only at the feed's ends
    assert sum(map(len, later.values())) > sum(map(len, after.values()))


async def test_a_sharing_product_gains_some_reviews_in_several_regions(sandbox):
    async with sandbox() as (url0, box), sandbox(generation=3) as (url3, _):
        assert box.catalogue.shares_reviews(PRODUCTS[0])
        seen: dict[str, int] = {}
        for region in REGIONS:
            old = set(await sandbox_ids(url0, PRODUCTS[0], region))
            for review_id in set(await sandbox_ids(url3, PRODUCTS[0], region)) - old:
                seen[review_id] = seen.get(review_id, 0) + 1
    assert any(n > 1 for n in seen.values()) and any(n == 1 for n in seen.values())


async def test_pages_and_review_count_follow_the_generation(sandbox):
    repeats = gained = 0
    async with sandbox(generation=2) as (url, _):
        for product_id, region in [(PRODUCTS[0], "GB"), (PRODUCTS[1], "US"), (PRODUCTS[4], "DE")]:
            pages, counts = await walk(url, product_id, region)
            ids = await sandbox_ids(url, product_id, region)
            walked = [i for page in pages for i in page]
            assert list(dict.fromkeys(walked)) == ids  # the pages give exactly ids(), in order
            assert counts == {len(ids)}
            gained += len(ids) - len(Catalogue().ids(product_id, region))
            repeats += len(walked) - len(ids)
    assert gained > 0
    assert repeats > 0  # the last review of a page shows again at the top of the next, at times


async def first_page(url: str, product_id: str, region: str, key: str = KEY) -> Any:
    params = {"product_id": product_id, "region": region, "offset": "1"}
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        return await _get(session, url + REVIEWS.path, **params)


async def grow(url: str, **kwargs: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/_sandbox/grow", **kwargs) as r,
    ):
        return r.status, await r.json()


async def test_grow_endpoint_moves_ids_and_review_count_on(sandbox):
    targets = [(p, r) for p in PRODUCTS[:4] for r in ("US", "GB", "DE", "JP")]
    async with sandbox() as (url, box):
        before = {t: await sandbox_ids(url, *t) for t in targets}
        assert await grow(url) == (200, {"generation": 1})
        changed = 0
        async with aiohttp.ClientSession() as session:
            for t in targets:
                ids = await sandbox_ids(url, *t)
                query = {"product_id": t[0], "region": t[1]}
                change = await _get(session, url + "/_sandbox/changes", **query)
                count = (await first_page(url, *t))["data"]["review_count"]
                assert change["added"] == len(ids) - len(before[t]) == count - len(before[t])
                assert set(change["added_ids"]) == set(ids) - set(before[t])
                assert change["generation"] == 1 and change["removed"] == 0
                changed += ids != before[t]
        assert changed > 0
        assert await grow(url, json={"generations": 2}) == (200, {"generation": 3})
        assert await grow(url, params={"generations": "0"}) == (200, {"generation": 3})
        assert (await grow(url, data=b"[1]"))[0] == 400
        assert (await grow(url, json={"generations": -1}))[0] == 400
        assert box.generation == 3
        assert await sandbox_ids(url, *targets[0]) == Catalogue(generation=3).ids(*targets[0])


async def test_shrink_takes_reviews_away_and_ids_lists_only_those_left(sandbox):
    async with sandbox(generation=4, shrink=True) as (url, box):
        lost = 0
        for product_id, region in TARGETS[:48]:
            ids = await sandbox_ids(url, product_id, region)
            gone = set(Catalogue().ids(product_id, region)) - set(ids)
            lost += len(gone)
            if gone:
                pages, counts = await walk(url, product_id, region)
                assert not gone & {i for page in pages for i in page}
                assert counts == {len(ids)}
        assert lost > 0
        first = Catalogue()
        assert any(box.catalogue.review_count(*t) < first.review_count(*t) for t in TARGETS)
    async with sandbox(generation=4) as (url, _):  # off by default: nothing is ever lost
        for t in TARGETS[:48]:
            assert set(Catalogue().ids(*t)) <= set(await sandbox_ids(url, *t))


async def status_of(
    session: aiohttp.ClientSession, url: str, path: str = REVIEWS.path
) -> tuple[int, str | None]:
    params = {"product_id": PRODUCTS[0], "region": "GB", "offset": "1"}
    async with session.get(url + path, params=params, allow_redirects=False) as r:
        await r.read()
        return r.status, r.headers.get("Retry-After")


async def test_throttle_window_answers_429_counting_down_then_serves_again(sandbox):
    options = {"throttle_after": 3, "throttle_seconds": 2.5}
    async with sandbox(**options) as (url, box), aiohttp.ClientSession(headers=AUTH) as s:
        assert [await status_of(s, url) for _ in range(3)] == [(200, None)] * 3
        assert await status_of(s, url) == (429, "3")  # the 4th opens the window, all 2.5 s of it
        book = box.ledgers[key_fingerprint(KEY)]
        assert book.requests_while_throttled == 0  # its opener could not have known
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer sk_test_beta"}) as b:
            assert await status_of(b, url) == (200, None)  # other keys are not throttled
        await asyncio.sleep(1.0)
        assert await status_of(s, url) == (429, "2")  # counting down, rounded up
        assert book.requests_while_throttled == 1
        await asyncio.sleep(1.6)
        assert [await status_of(s, url) for _ in range(3)] == [(200, None)] * 3
        async with s.get(url + "/_sandbox/ledger") as r:
            doc = (await r.json())["keys"][key_fingerprint(KEY)]
    assert doc["requests_while_throttled"] == 1 and doc["statuses"] == {"200": 6, "429": 2}
    assert doc["requests"] == 8 and doc["charged"] == 12
    assert len(doc["while_throttled_at"]) == 1 and 1.0 <= doc["while_throttled_at"][0] < 1.5


async def test_retry_after_override_is_on_every_429(sandbox):
    for value in ("86400000", "Wed, 21 Oct 2015 07:28:00 GMT"):
        limited = {"rate": 0.5, "burst": 1, "retry_after": value}
        async with sandbox(**limited) as (url, _), aiohttp.ClientSession(headers=AUTH) as s:
            assert await status_of(s, url) == (200, None)
            assert await status_of(s, url) == (429, value)
    async with sandbox(rate=0.5, burst=1) as (url, _), aiohttp.ClientSession(headers=AUTH) as s:
        assert [await status_of(s, url) for _ in range(2)] == [(200, None), (429, "2")]
    throttled = {"throttle_after": 0, "retry_after": "0"}
    async with sandbox(**throttled) as (url, _), aiohttp.ClientSession(headers=AUTH) as s:
        assert [await status_of(s, url) for _ in range(2)] == [(429, "0")] * 2


async def test_answer_status_is_what_a_wrong_base_url_meets(sandbox):
    for status in (301, 404, 405, 410):
        async with sandbox(answer_status=status) as (url, box):
            for headers in (AUTH, {}):  # no key check: this is not the API
                async with aiohttp.ClientSession(headers=headers) as s:
                    params = {"product_id": PRODUCTS[0], "region": "GB", "offset": "1"}
                    async with s.get(url + REVIEWS.path, params=params, allow_redirects=False) as r:
                        body, location = await r.read(), r.headers.get("Location")
                    assert r.status == status and r.content_type == "text/html", status
                    with pytest.raises(orjson.JSONDecodeError):
                        orjson.loads(body)
                    assert (location or "").startswith("/moved/") == (status == 301)
            book = box.ledgers[key_fingerprint(KEY)]
            assert book.requests == 1 and book.statuses == {str(status): 1} and book.charged == 0
            assert sum(b.requests for b in box.ledgers.values()) == 2


async def test_only_the_reviews_endpoint_is_the_api(served):
    url, box = served
    async with aiohttp.ClientSession(headers=AUTH) as s:
        assert (await status_of(s, url, "/v1/tiktok/product/review"))[0] == 404
        assert (await status_of(s, url, "/"))[0] == 404
        async with s.post(url + REVIEWS.path) as r:
            assert r.status == 405
        assert (await status_of(s, url))[0] == 200
    assert box.ledgers[key_fingerprint(KEY)].requests == 1


async def test_sandbox_in_a_process_of_its_own():
    options = SandboxOptions(
        page_size=5, generation=2, shrink=True, throttle_after=2, retry_after="86400000"
    )
    target = (PRODUCTS[0], "DE")  # loses two reviews by generation 2 when shrinking
    async with asyncio.timeout(30), serve_in_process(options) as (url, handle):
        assert handle.process.pid != os.getpid()
        page = await first_page(url, *target)
        expected = Catalogue(page_size=5, generation=2, shrink=True)
        assert [i["review"]["review_id"] for i in page["data"]["review_items"]] == (
            expected.ids(*target)[:5]
        )
        assert page["data"]["review_count"] == expected.review_count(*target)
        assert await handle.ids(*target) == expected.ids(*target)
        assert (await handle.changes(*target))["removed"] == 2
        async with aiohttp.ClientSession(headers=AUTH) as s:
            assert [await status_of(s, url) for _ in range(3)] == [
                (200, None),
                (429, "86400000"),
                (429, "86400000"),
            ]
        book = await handle.book(KEY)
        assert book is not None and book["requests"] == 4 and book["charged"] == 4
        assert book["requests_while_throttled"] == 1
        assert await handle.grow(2) == 4
        assert await handle.ids(*target) == Catalogue(generation=4, shrink=True).ids(*target)
        assert (await handle.changes(*target))["generation"] == 4
        process = handle.process
    assert process.returncode is not None
    with pytest.raises(aiohttp.ClientConnectionError):
        await first_page(url, *target)


async def test_sandbox_process_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="keys"):
        cli_flags(SandboxOptions(keys=frozenset({"sk_a,sk_b"})))
    with pytest.raises(ValueError, match="fault kinds"):
        cli_flags(SandboxOptions(faults=("500", "fire")))
    assert "--shrink" in cli_flags(SandboxOptions(shrink=True))
    assert not any(f.startswith("--shrink") for f in cli_flags(SandboxOptions()))
    with pytest.raises(RuntimeError, match=r"exited with status [1-9][0-9]* before listening"):
        async with serve_in_process(host="no-such-host.invalid"):
            pass
