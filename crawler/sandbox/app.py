"""The API emulator as an aiohttp.web app: auth, parameters, paging, ledger, limit, faults."""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from crawler.endpoint import REVIEWS
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


@dataclass
class KeyLedger:
    charged: int = 0
    requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    tokens: float = 0.0
    refilled: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {"charged": self.charged, "requests": self.requests, "statuses": dict(self.statuses)}


class Sandbox:
    """State of one emulator: its catalogue, the ledger per key, and the fault dice."""

    def __init__(self, options: SandboxOptions) -> None:
        self.options = options
        self.catalogue = Catalogue(options.page_size)
        self.ledgers: dict[str, KeyLedger] = {}
        self._rng = random.Random(options.seed)
        burst = options.burst
        self._burst = burst if burst is not None else max(2.0, (options.rate or 0) / 10)
        sample = resources.files("crawler.sandbox").joinpath("sample-reviews-page.json")
        self._sample = orjson.loads(sample.read_bytes())

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(REVIEWS.path, self.reviews)
        app.router.add_get("/_sandbox/ids", self.ids)
        app.router.add_get("/_sandbox/ledger", self.ledger)
        return app

    async def reviews(self, request: web.Request) -> web.StreamResponse:
        key = _bearer(request.headers.get("Authorization", ""))
        opts = self.options
        if key is None or (opts.keys is not None and key not in opts.keys):
            return _error(401, 40100, "missing or invalid API key")
        book = self.ledgers.setdefault(key_fingerprint(key), KeyLedger(tokens=self._burst))
        book.requests += 1
        response = await self._answer(request, key, book)
        book.statuses[str(response.status)] += 1
        return response

    async def _answer(self, request: web.Request, key: str, book: KeyLedger) -> web.StreamResponse:
        opts = self.options
        if key in opts.forbidden_keys:
            return _error(403, 40300, "this key is not allowed on this endpoint")
        wait = self._take_token(book)
        if wait > 0:
            return _error(429, 42900, "rate limited", {"Retry-After": str(max(1, math.ceil(wait)))})
        problem, params = _check(request.query)
        if problem:
            return _error(400, 40000, problem)
        cost = 2
        if opts.credits is not None and book.charged + cost > opts.credits:
            return _error(402, 40200, "insufficient credits")
        if opts.latency[1] > 0:
            await asyncio.sleep(self._rng.uniform(*opts.latency))
        if opts.fault_rate and self._rng.random() < opts.fault_rate:
            if opts.charge_failures:
                book.charged += cost
            return await self._fault(request, self._rng.choice(opts.faults), params)
        book.charged += cost
        return web.Response(body=self.page_body(*params), content_type="application/json")

    def _take_token(self, book: KeyLedger) -> float:
        """Token bucket per key; seconds until a token, 0 when one was taken."""
        rate = self.options.rate
        if rate is None:
            return 0.0
        now = time.monotonic()
        book.tokens = min(self._burst, book.tokens + (now - book.refilled) * rate)
        book.refilled = now
        if book.tokens >= 1:
            book.tokens -= 1
            return 0.0
        return (1 - book.tokens) / rate

    def page_body(self, product_id: str, region: str, offset: int) -> bytes:
        page = self.catalogue.page(product_id, region, offset)
        data = dict(self._sample["data"])
        template = self._sample["data"]["review_items"][0]
        data["review_items"] = [self._item(template, product_id, rid) for rid in page.ids]
        data["has_more"] = page.has_more or product_id in self.options.endless
        data["next_cursor"] = page.next_cursor
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
        self, request: web.Request, kind: str, params: tuple[str, str, int]
    ) -> web.StreamResponse:
        if kind == "500":
            return _error(500, 50000, "internal server error")
        if kind == "code":
            return _error(200, 50001, "temporary failure, retry later")
        if kind == "slow":
            await asyncio.sleep(self.options.slow_seconds)
            return web.Response(body=self.page_body(*params), content_type="application/json")
        body = self.page_body(*params)
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
        return web.json_response({"product_id": product_id, "region": region, "ids": ids})

    async def ledger(self, request: web.Request) -> web.Response:
        keys = {fp: book.as_json() for fp, book in self.ledgers.items()}
        return web.json_response({"keys": keys})


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
