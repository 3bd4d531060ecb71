"""Reference server for the memory benchmark: lean review items, any number of them, no catalogue.

Target k (product id ``9000000000000000000 + k``) has REVIEWS reviews in pages of PAGE_SIZE; ids
are unique across targets. ``/_bench/first`` tells when the first review request arrived.
"""

from __future__ import annotations

import sys
import time

import orjson
from aiohttp import web

from crawler.api.endpoint import REVIEWS

BASE_PRODUCT = 9_000_000_000_000_000_000


def main() -> None:
    port, reviews, page_size = (int(a) for a in sys.argv[1:4])
    first: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        if not first:
            first.append(time.time())
        q = request.query
        k, offset = int(q["product_id"]) - BASE_PRODUCT, int(q["offset"])
        start = (offset - 1) * page_size
        ids = range(start, min(reviews, start + page_size))
        items = [{"review": {"review_id": str(10**18 + k * 10**7 + i), "rating": 5}} for i in ids]
        more = start + page_size < reviews
        body = {
            "code": 0,
            "message": "success",
            "requestId": "bench",
            "data": {
                "review_items": items,
                "has_more": more,
                "next_cursor": offset + 1,
                "review_count": reviews,
            },
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def first_request(request: web.Request) -> web.Response:
        return web.json_response({"first": first[0] if first else None})

    async def reset(request: web.Request) -> web.Response:
        first.clear()
        return web.json_response({})

    app = web.Application()
    app.router.add_get(REVIEWS.path, handler)
    app.router.add_get("/_bench/first", first_request)
    app.router.add_post("/_bench/reset", reset)
    print("ready", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
