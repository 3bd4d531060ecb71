"""Reference server for the benchmark: every page of the targets pre-rendered, in memory."""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from crawler.api.endpoint import REVIEWS
from crawler.sandbox import Sandbox, SandboxOptions


def main() -> None:
    port, products, regions = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(",")
    box = Sandbox(SandboxOptions())
    pages: dict[tuple[str, str, str], bytes] = {}
    for product_id in products:
        for region in regions:
            offset = 1
            while True:
                pages[(product_id, region, str(offset))] = box.page_body(product_id, region, offset)
                if not box.catalogue.page(product_id, region, offset).has_more:
                    break
                offset += 1

    async def handler(request: web.Request) -> web.Response:
        q = request.query
        body = pages[(q["product_id"], q["region"], q["offset"])]
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get(REVIEWS.path, handler)

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print(f"ready {len(pages)}", flush=True)  # once it listens, not before
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
