"""The same walk done by Scrapy: every target's cursor, each review a JSON line in a feed.

Run by bench/run.py as `python bench/scrapy_walk.py URL OUT PRODUCTS REGIONS CONCURRENCY KEY`;
prints one JSON line: seconds, pages, reviews. Pages are parsed with orjson as in the bare loop,
so what differs is the framework: its scheduler, middlewares and feed exporter.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlencode

import orjson
import scrapy
from scrapy import signals
from scrapy.crawler import CrawlerProcess

from crawler.api.endpoint import REVIEWS


class ReviewsSpider(scrapy.Spider):  # type: ignore[misc]  # Any where scrapy is not installed (make test)
    name = "reviews"
    pages = 0
    reviews = 0

    def __init__(self, base_url: str, targets: list[tuple[str, str]], key: str) -> None:
        super().__init__()
        self.base_url, self.targets, self.key = base_url, targets, key

    def page(self, product_id: str, region: str, cursor: Any) -> scrapy.Request:
        query = urlencode({"product_id": product_id, "region": region, "offset": str(cursor)})
        return scrapy.Request(
            f"{self.base_url}{REVIEWS.path}?{query}",
            headers={"Authorization": "Bearer " + self.key},
            cb_kwargs={"product_id": product_id, "region": region},
        )

    async def start(self) -> AsyncIterator[scrapy.Request]:
        for product_id, region in self.targets:
            yield self.page(product_id, region, 1)

    def parse(self, response: Any, product_id: str, region: str) -> Iterator[Any]:
        data = orjson.loads(response.body)["data"]
        ReviewsSpider.pages += 1
        for item in data["review_items"]:
            ReviewsSpider.reviews += 1
            yield {"review_id": item["review"]["review_id"], "item": item}
        if data["has_more"]:
            yield self.page(product_id, region, data["next_cursor"])


def main() -> None:
    url, out, products, regions, concurrency, key = sys.argv[1:7]
    targets = [(p, r) for p in products.split(",") for r in regions.split(",")]
    process = CrawlerProcess(
        {
            "CONCURRENT_REQUESTS": int(concurrency),
            "CONCURRENT_REQUESTS_PER_DOMAIN": int(concurrency),
            "DOWNLOAD_DELAY": 0,
            "ROBOTSTXT_OBEY": False,
            "COOKIES_ENABLED": False,
            "TELNETCONSOLE_ENABLED": False,
            "LOG_LEVEL": "ERROR",
            "FEEDS": {out: {"format": "jsonlines"}},
        }
    )
    crawler = process.create_crawler(ReviewsSpider)
    times: dict[str, float] = {}  # the walk itself, without the framework's start-up
    crawler.signals.connect(
        lambda: times.setdefault("start", time.perf_counter()),
        signal=signals.engine_started,
        weak=False,
    )
    crawler.signals.connect(
        lambda: times.setdefault("end", time.perf_counter()),
        signal=signals.engine_stopped,
        weak=False,
    )
    process.crawl(crawler, base_url=url, targets=targets, key=key)
    process.start()
    seconds = times["end"] - times["start"]
    print(
        orjson.dumps(
            {"seconds": seconds, "pages": ReviewsSpider.pages, "reviews": ReviewsSpider.reviews}
        ).decode()
    )


if __name__ == "__main__":
    main()
