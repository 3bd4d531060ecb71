"""The API emulator as an aiohttp.web app: auth, parameters, paging, ledger, limits, faults."""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from crawler.api.endpoint import REVIEWS
from crawler.sandbox import listings
from crawler.sandbox.catalogue import Catalogue
from crawler.targets import REGIONS

FAULT_KINDS = ("500", "reset", "truncate", "code", "slow")
_KEY = re.compile(r"sk_[A-Za-z0-9_]+")


def key_fingerprint(key: str) -> str:
    """How the sandbox names a key in its ledger and logs: never the key itself."""
    return hashlib.blake2b(key.encode(), digest_size=6).hexdigest()


@dataclass(frozen=True)
class SandboxOptions:
    page_size: int = 10
    keys: frozenset[str] | None = None  # None: any key shaped sk_...
    forbidden_keys: frozenset[str] = frozenset()
    credits: int | None = None  # balance of each key; None: unlimited
    charge_failures: bool = False  # charge faulted answers too, not only answered pages
    rate: float | None = None  # requests per second allowed per key
    burst: float | None = None  # requests a key may send at once; None: a tenth of a second's
    fault_rate: float = 0.0
    faults: tuple[str, ...] = FAULT_KINDS
    slow_seconds: float = 2.0
    latency: tuple[float, float] = (0.0, 0.0)  # seconds, uniform
    seed: int = 0
    endless: frozenset[str] = frozenset()  # product ids whose feed says has_more forever
    # product ids whose page 2 gives its own cursor again; seller ids whose listing does so
    stuck: frozenset[str] = frozenset()
    cycling: frozenset[str] = frozenset()  # product ids whose page 3 points back to page 2
    generation: int = 0  # the catalogue's generation at start; POST /_sandbox/grow adds to it
    shrink: bool = False  # each generation also removes a review or two from a few targets
    throttle_after: int | None = None  # past a key's Nth request, 429s for throttle_seconds
    throttle_seconds: float = 2.0
    retry_after: str | None = None  # every 429 carries exactly this Retry-After value
    answer_status: int | None = None  # the reviews endpoint answers only this, without JSON
    maintenance_seconds: float = 0.0  # from start, 503 with a Retry-After till this is over
    feed_cap: int | None = None  # every feed ends after this many reviews, below its count

    def problem(self) -> str | None:
        """What makes these options unusable, in words for a command line; None when fine."""
        unknown = set(self.faults) - set(FAULT_KINDS)
        if unknown:
            return f"unknown fault kinds {sorted(unknown)}; one of {FAULT_KINDS}"
        if self.generation < 0:
            return "--generation must be 0 or more"
        if self.answer_status is not None and not 200 <= self.answer_status <= 599:
            return "--answer-status must be a final HTTP status, 200 to 599"
        if self.feed_cap is not None and self.feed_cap < 1:
            return "--feed-cap must be 1 or more"
        return None


_WINDOW_ARRIVALS = 1000  # arrival times kept per throttle window: enough to read, bounded


@dataclass
class KeyLedger:
    charged: int = 0
    requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    targets: Counter[str] = field(default_factory=Counter)  # requests by "product:REGION"
    tokens: float = 0.0
    refilled: float = 0.0
    admitted: deque[float] = field(default_factory=deque)  # admission times in the last second
    throttle_opened: float | None = None  # monotonic time the key's throttle window opened
    requests_while_throttled: int = 0  # arrivals in the window after the one that opened it
    while_throttled_at: list[float] = field(default_factory=list)  # their seconds into it

    def as_json(self) -> dict[str, Any]:
        return {
            "charged": self.charged,
            "requests": self.requests,
            "statuses": dict(self.statuses),
            "targets": dict(self.targets),
            "requests_while_throttled": self.requests_while_throttled,
            "while_throttled_at": list(self.while_throttled_at),
        }


class Sandbox:
    """State of one emulator: its catalogue, the ledger per key, and the fault dice."""

    def __init__(self, options: SandboxOptions) -> None:
        self.options = options
        self.catalogue = Catalogue(
            options.page_size, options.generation, options.shrink, options.feed_cap
        )
        self.ledgers: dict[str, KeyLedger] = {}
        self._started = time.monotonic()
        self._rng = random.Random(options.seed)
        burst = options.burst
        self._burst = burst if burst is not None else max(2.0, (options.rate or 0) / 10)
        sample = resources.files("crawler.sandbox").joinpath("sample-reviews-page.json")
        self._sample = orjson.loads(sample.read_bytes())

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(REVIEWS.path, self.reviews)
        app.router.add_get(listings.SHOP_PRODUCTS, self.shop_products)
        app.router.add_get(listings.ANALYTICS, self.analytics)
        app.router.add_get("/_sandbox/ids", self.ids)
        app.router.add_get("/_sandbox/ledger", self.ledger)
        app.router.add_get("/_sandbox/changes", self.changes)
        app.router.add_post("/_sandbox/grow", self.grow_handler)
        return app

    @property
    def generation(self) -> int:
        return self.catalogue.generation

    def grow(self, generations: int = 1) -> int:
        """Move the live catalogue on by ``generations``; walks in progress see it at once."""
        self.catalogue = replace(self.catalogue, generation=self.generation + generations)
        return self.generation

    async def reviews(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, _REVIEWS)

    async def shop_products(self, request: web.Request) -> web.StreamResponse:
        """A seller's listing: cursor-paged (a string offset), 2 credits a page."""
        return await self._serve(request, _SELLER)

    async def analytics(self, request: web.Request) -> web.StreamResponse:
        """An Analytics list: ``page_num``/``page_size``, ``data`` a bare array, 1 credit."""
        return await self._serve(request, _ANALYTICS)

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        opts = self.options
        if opts.answer_status is not None:
            # not this API at all, so no key check; counted under whatever token came
            book = self._book(header.partition(" ")[2])
            return self._count(book, _not_the_api(request, opts.answer_status))
        key = _bearer(header)
        if key is None or (opts.keys is not None and key not in opts.keys):
            return _error(401, 40100, "missing or invalid API key")
        book = self._book(key)
        left = self._started + opts.maintenance_seconds - time.monotonic()
        if left > 0:  # down for maintenance: come back when it is over
            retry = {"Retry-After": str(math.ceil(left))}
            return self._count(book, _error(503, 50300, "down for maintenance", retry))
        query = request.query
        book.targets[_counted_as(kind, query)] += 1
        return self._count(book, await self._answer(request, key, book, kind))

    def _book(self, key: str) -> KeyLedger:
        book = self.ledgers.setdefault(key_fingerprint(key), KeyLedger(tokens=self._burst))
        book.requests += 1
        return book

    @staticmethod
    def _count(book: KeyLedger, response: web.StreamResponse) -> web.StreamResponse:
        book.statuses[str(response.status)] += 1
        return response

    async def _answer(
        self, request: web.Request, key: str, book: KeyLedger, kind: str
    ) -> web.StreamResponse:
        opts = self.options
        if key in opts.forbidden_keys:
            return _error(403, 40300, "this key is not allowed on this endpoint")
        wait = self._throttle(book) or self._take_token(book)
        if wait > 0:
            return _error(429, 42900, "rate limited", {"Retry-After": self._retry_after(wait)})
        problem, body, cost = self._asked(kind, request.query)
        if problem:
            return _error(400, 40000, problem)
        if opts.credits is not None and book.charged + cost > opts.credits:
            return _error(402, 40200, "insufficient credits")
        if opts.latency[1] > 0:
            await asyncio.sleep(self._rng.uniform(*opts.latency))
        if opts.fault_rate and self._rng.random() < opts.fault_rate:
            if opts.charge_failures:
                book.charged += cost
            return await self._fault(request, self._rng.choice(opts.faults), body)
        book.charged += cost
        return web.Response(body=body(), content_type="application/json")

    def _asked(self, kind: str, query: Any) -> tuple[str | None, Callable[[], bytes], int]:
        """(what is wrong with the request, or None; its answer's body; its cost)."""
        if kind == _REVIEWS:
            problem, params = _check(query)
            return problem, lambda: self.page_body(*params), 2
        return self._listing_asked(kind, query)

    def _listing_asked(self, kind: str, query: Any) -> tuple[str | None, Callable[[], bytes], int]:
        region = query.get("region", "")
        if region not in REGIONS:
            return f"invalid region '{region}'", bytes, 0
        if kind == _SELLER:
            seller, cursor = query.get("seller_id", ""), query.get("cursor", "0")
            if not (seller.isdigit() and 1 <= len(seller) <= 20):
                return f"invalid seller_id '{seller}'", bytes, 0
            if not cursor.isdigit():
                return f"invalid cursor '{cursor}'", bytes, 0
            return None, lambda: self.seller_body(seller, region, int(cursor)), 2
        number, size = query.get("page_num", ""), query.get("page_size", "")
        if not (number.isdigit() and int(number) >= 1 and size.isdigit() and 1 <= int(size) <= 50):
            return f"invalid page_num '{number}' or page_size '{size}' (1 to 50)", bytes, 0
        key = ",".join(f"{k}={v}" for k, v in sorted(query.items()) if k not in _PAGING)
        return None, lambda: self.analytics_body(key, region, int(number), int(size)), 1

    def seller_body(self, seller_id: str, region: str, cursor: int) -> bytes:
        page = listings.seller_page(seller_id, region, cursor, self.generation)
        stuck = seller_id in self.options.stuck and cursor > 0  # gives its own cursor again
        data = {
            "products": [listings.product_item(p, region) for p in page.products],
            "has_more": page.has_more or stuck,
            "next_cursor": str(cursor) if stuck else page.next_cursor,
            "total": len(listings.listed("seller", seller_id, region, self.generation)),
        }
        return orjson.dumps({"code": 0, "message": "success", "data": data, "requestId": "sbx"})

    def analytics_body(self, key: str, region: str, page_num: int, page_size: int) -> bytes:
        products = listings.analytics_page(key, region, page_num, page_size, self.generation)
        data = [listings.product_item(p, region) for p in products]
        return orjson.dumps({"code": 0, "message": "success", "data": data, "requestId": "sbx"})

    def listed(self, path: str, region: str, **params: str) -> list[str]:
        """Every product a list serves (what a complete discovery must find): ``path`` one of
        the two list endpoints, ``params`` its other parameters (seller_id, category_id...)."""
        if path == listings.SHOP_PRODUCTS:
            return list(listings.listed("seller", params["seller_id"], region, self.generation))
        key = ",".join(f"{k}={v}" for k, v in sorted({**params, "region": region}.items()))
        return list(listings.listed("analytics", key, region, self.generation))

    def _throttle(self, book: KeyLedger) -> float:
        """Seconds left in the key's throttle window, 0 outside it. The first request past
        ``throttle_after`` opens the window, so its 429 says the whole ``throttle_seconds``."""
        after, seconds = self.options.throttle_after, self.options.throttle_seconds
        if after is None or book.requests <= after:
            return 0.0
        now = time.monotonic()
        if book.throttle_opened is None:
            book.throttle_opened = now
            return max(seconds, 1e-9)  # a zero-length window still throttles its opener
        into = now - book.throttle_opened
        if into >= seconds:
            return 0.0
        book.requests_while_throttled += 1
        if len(book.while_throttled_at) < _WINDOW_ARRIVALS:
            book.while_throttled_at.append(round(into, 4))
        return seconds - into

    def _retry_after(self, wait: float) -> str:
        if self.options.retry_after is not None:
            return self.options.retry_after
        return str(max(1, math.ceil(wait)))

    def _take_token(self, book: KeyLedger) -> float:
        """The key's rate, read both ways a provider may mean it: a token bucket (bursts of at
        most ``burst``) and at most ``rate`` requests in any sliding second. Seconds until a
        request would be admitted, 0 when this one was."""
        rate = self.options.rate
        if rate is None:
            return 0.0
        now = time.monotonic()
        book.tokens = min(self._burst, book.tokens + (now - book.refilled) * rate)
        book.refilled = now
        admitted = book.admitted
        while admitted and admitted[0] <= now - 1.0:
            admitted.popleft()
        allowed = max(1, math.floor(rate))  # "R per second" counts whole requests
        window_wait = admitted[0] + 1.0 - now if len(admitted) >= allowed else 0.0
        wait = max(window_wait, (1 - book.tokens) / rate if book.tokens < 1 else 0.0)
        if wait <= 0:
            book.tokens -= 1
            admitted.append(now)
        return wait

    def page_body(self, product_id: str, region: str, offset: int) -> bytes:
        page = self.catalogue.page(product_id, region, offset)
        data = dict(self._sample["data"])
        template = self._sample["data"]["review_items"][0]
        data["review_items"] = [self._item(template, product_id, rid) for rid in page.ids]
        data["has_more"] = page.has_more or product_id in self.options.endless
        data["next_cursor"] = page.next_cursor
        if product_id in self.options.stuck and offset >= 2:
            data["has_more"], data["next_cursor"] = True, offset
        if product_id in self.options.cycling and offset >= 3:  # 1 -> 2 -> 3 -> 2 -> 3 ...
            data["has_more"], data["next_cursor"] = True, 2
        count = self.catalogue.review_count(product_id, region)
        data["review_count"] = count
        data["review_count_str_v2"] = f"{count:,}"
        return orjson.dumps(
            {"code": 0, "message": "success", "data": data, "requestId": str(uuid.uuid4())}
        )

    @staticmethod
    def _item(template: dict[str, Any], product_id: str, review_id: str) -> dict[str, Any]:
        n = int(review_id)
        review = dict(template["review"])
        review["review_id"] = review_id
        review["rating"] = 1 + n % 5
        review["display_text"] = f"Sandbox review {review_id}: {'great' if n % 2 else 'fine'}."
        review["review_timestamp"] = str(1_700_000_000_000 + n % 60_000_000_000)
        item = dict(template)
        item["review"] = review
        item["product_id"] = product_id
        return item

    async def _fault(
        self, request: web.Request, kind: str, answer: Callable[[], bytes]
    ) -> web.StreamResponse:
        if kind == "500":
            return _error(500, 50000, "internal server error")
        if kind == "code":
            return _error(200, 50001, "temporary failure, retry later")
        if kind == "slow":
            await asyncio.sleep(self.options.slow_seconds)
            return web.Response(body=answer(), content_type="application/json")
        body = answer()
        if kind == "truncate":
            return web.Response(body=body[: len(body) // 2], content_type="application/json")
        # reset: promise a whole body, send part of it, and drop the connection
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 3])
        if request.transport is not None:
            request.transport.abort()
        return response

    async def ids(self, request: web.Request) -> web.Response:
        """Every distinct review id of a target: what a complete crawl must write."""
        product_id, region = request.query.get("product_id", ""), request.query.get("region", "")
        ids = self.catalogue.ids(product_id, region)
        return web.json_response(
            {
                "product_id": product_id,
                "region": region,
                "generation": self.generation,
                "review_count": self.catalogue.review_count(product_id, region),
                "ids": ids,
            }
        )

    async def changes(self, request: web.Request) -> web.Response:
        """What the target gained (and lost, with shrink) between generation 0 and now."""
        product_id, region = request.query.get("product_id", ""), request.query.get("region", "")
        added, removed = self.catalogue.changes(product_id, region)
        return web.json_response(
            {
                "product_id": product_id,
                "region": region,
                "generation": self.generation,
                "added": len(added),
                "removed": len(removed),
                "review_count": self.catalogue.review_count(product_id, region),
                "added_ids": added,
                "removed_ids": removed,
            }
        )

    async def grow_handler(self, request: web.Request) -> web.Response:
        """``POST /_sandbox/grow``: one generation more, or ``generations`` (query or JSON body)."""
        generations = await _generations(request)
        if generations is None:
            return _error(400, 40000, "generations must be an integer >= 0")
        return web.json_response({"generation": self.grow(generations)})

    async def ledger(self, request: web.Request) -> web.Response:
        keys = {fp: book.as_json() for fp, book in self.ledgers.items()}
        return web.json_response({"keys": keys})


_REVIEWS, _SELLER, _ANALYTICS = "reviews", "seller", "analytics"
_PAGING = ("page_num", "page_size")


def _counted_as(kind: str, query: Any) -> str:
    """How the ledger counts a request: by target (``product:REGION``, ``seller:ID:REGION``...)."""
    if kind == _REVIEWS:
        return f"{query.get('product_id')}:{query.get('region')}"
    if kind == _SELLER:
        return f"seller:{query.get('seller_id')}:{query.get('region')}"
    return "analytics:" + ",".join(f"{k}={v}" for k, v in sorted(query.items()) if k not in _PAGING)


def _bearer(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    return token if scheme == "Bearer" and _KEY.fullmatch(token) else None


def _check(query: Any) -> tuple[str | None, tuple[str, str, int]]:
    product_id, region, offset = (query.get(n, "") for n in ("product_id", "region", "offset"))
    if not (product_id.isdigit() and 8 <= len(product_id) <= 20):
        return f"invalid product_id '{product_id}'", ("", "", 0)
    if region not in REGIONS:
        return f"invalid region '{region}'", ("", "", 0)
    if not (offset.isdigit() and int(offset) >= 1):
        return f"invalid offset '{offset}'", ("", "", 0)
    return None, (product_id, region, int(offset))


async def _generations(request: web.Request) -> int | None:
    """How many generations a grow request asks for: 1 unless the query or a JSON body says;
    None when what it says is not an integer >= 0."""
    body = await request.read()
    raw: Any = request.query.get("generations")
    if raw is None and body.strip():
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict):
            return None
        raw = doc.get("generations", 1)
    if raw is None:
        return 1
    if isinstance(raw, str):
        return int(raw) if raw.isascii() and raw.isdigit() else None
    return raw if type(raw) is int and raw >= 0 else None  # type(): True is not a count


def _not_the_api(request: web.Request, status: int) -> web.Response:
    """What a wrong base_url meets: a web server's page, not this API's JSON."""
    headers = {"Location": f"/moved{request.path_qs}"} if 300 <= status < 400 else None
    if status in (204, 304):  # answers HTTP allows no body on
        return web.Response(status=status, headers=headers)
    page = f"<html><body><h1>{status}</h1><p>Not the reviews API.</p></body></html>"
    return web.Response(status=status, text=page, content_type="text/html", headers=headers)


def _error(
    status: int, code: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"code": code, "message": message, "data": None, "requestId": str(uuid.uuid4())}
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


@asynccontextmanager
async def serve(
    options: SandboxOptions, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[tuple[str, Sandbox]]:
    """Serve a sandbox; yields its base URL (with the port the OS chose) and its state."""
    sandbox = Sandbox(options)
    runner = web.AppRunner(sandbox.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server  # aiohttp exposes the bound sockets only here
    assert server is not None  # noqa: S101 -- set by start()
    bound = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]  # asyncio.Server
    try:
        yield f"http://{host}:{bound}", sandbox
    finally:
        await runner.cleanup()
