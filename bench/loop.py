"""The loop a user would write by hand: aiohttp + orjson walking every target's cursors, and,
with a sink, dropping reviews it has seen (a set) and writing each new one as a JSON line in
the crawler's record shape (no fsync, no state, no budget, no rate gate).

Imported by ``run.py`` for the throughput walks, and run as a program of its own for the short
job, whole process: ``python bench/loop.py URL OUT PRODUCTS REGIONS KEY`` prints its figures.
It imports nothing of the crawler, as a hand-written script would not.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

PATH = "/v1/tiktok/product/reviews"
CONCURRENCY = 16


async def bare_loop(
    base_url: str, targets: list[tuple[str, str]], key: str, sink: Path | None = None
) -> tuple[float, int, int]:
    """Seconds, pages and reviews received, walking ``targets`` ``CONCURRENCY`` at a time."""
    out = sink.open("wb") if sink else None
    seen: set[str] = set()
    queue = list(targets)
    pages = reviews = 0
    headers = {"Authorization": "Bearer " + key}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as s:

        async def worker() -> None:
            nonlocal pages, reviews
            while queue:
                product_id, region = queue.pop()
                cursor: Any = 1
                while True:
                    params = {"product_id": product_id, "region": region, "offset": str(cursor)}
                    async with s.get(base_url + PATH, params=params, headers=headers) as r:
                        data = orjson.loads(await r.read())["data"]
                    pages += 1
                    reviews += len(data["review_items"])
                    if out is not None:
                        fetched_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                        for item in data["review_items"]:
                            review_id = item["review"]["review_id"]
                            if review_id in seen:
                                continue
                            seen.add(review_id)
                            record = {
                                "review_id": review_id,
                                "product_id": product_id,
                                "region": region,
                                "fetched_at": fetched_at,
                                "item": item,
                            }
                            out.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
                    if not data["has_more"]:
                        break
                    cursor = data["next_cursor"]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        if out is not None:
            out.close()
    return time.perf_counter() - started, pages, reviews


def main() -> None:
    url, out, products, regions, key = sys.argv[1:6]
    pairs = [(p, r) for p in products.split(",") for r in regions.split(",")]
    seconds, pages, reviews = asyncio.run(bare_loop(url, pairs, key, Path(out)))
    print(orjson.dumps({"seconds": seconds, "pages": pages, "reviews": reviews}).decode())


if __name__ == "__main__":
    main()
