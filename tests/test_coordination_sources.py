"""A discovery job worked by several processes through a real redis-server: the sources' pages
and what they find committed once, through a SIGKILL in the source stage; one rate, one budget."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import orjson
import yaml

from crawler import load_job
from crawler.output.layout import Layout
from crawler.output.shards import read_lines
from crawler.output.verify import verify
from crawler.sandbox import SandboxOptions, SandboxProcess, key_fingerprint, serve_in_process
from crawler.sandbox.listings import listed
from tests.conftest import KEY, RedisServer, output_ids, run_crawler
from tests.test_coordination import _ended, _leased, start
from tests.test_sources import ENDPOINTS

SELLERS = [("7007", "US"), ("7003", "GB"), ("7009", "US"), ("7001", "US")]
CATEGORY = ("605", "US")
LISTED = "1729679758111249342"  # in the job file's targets (and found by the sources too)
MAX_CREDITS = 5_000


def _job(folder: Path, url: str, redis_url: str) -> Path:
    endpoints: dict[str, Any] = {**ENDPOINTS}
    category = {**endpoints["category_top"]}
    category["pagination"] = {
        "page_number": {"param": "page_num", "first": 1, "size_param": "page_size", "size": 2}
    }
    endpoints["category_top"] = category
    doc: dict[str, Any] = {
        "api": {
            "base_url": url,
            "requests_per_second": 200,
            "concurrency": 3,
            "timeout_seconds": 5,
            "retry": {"max_attempts": 8, "base_seconds": 0.01, "cap_seconds": 0.05},
            "shutdown_grace_seconds": 2,
        },
        "budget": {"max_credits": MAX_CREDITS},
        "output": {"dir": "out", "shard_max_records": 200},
        "coordination": {"redis_url": redis_url, "lease_seconds": 2, "unavailable_seconds": 30},
        "endpoints": endpoints,
        "sources": [
            {"endpoint": "shop_products", "targets_file": "sellers.csv"},
            {
                "endpoint": "category_top",
                "targets": [{"category_id": CATEGORY[0], "region": CATEGORY[1]}],
            },
        ],
        "targets": [{"product_id": LISTED, "region": "US"}],
    }
    (folder / "sellers.csv").write_text(
        "seller_id,region\n" + "".join(f"{s},{r}\n" for s, r in SELLERS)
    )
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _sellers(generation: int = 0) -> dict[str, list[str]]:
    """Each seller's listing, by region: what the sandbox's seller listings hold."""
    return {f"{s}:{r}": list(listed("seller", s, r, generation)) for s, r in SELLERS}


def _category(generation: int = 0) -> list[str]:
    key = f"category_id={CATEGORY[0]},region={CATEGORY[1]}"
    return list(listed("analytics", key, CATEGORY[1], generation))


def _pairs(generation: int = 0) -> set[tuple[str, str]]:
    """Every review target the job has: found by a source (in its target's region), or listed."""
    sellers = _sellers(generation)
    found = {(p, key.split(":")[1]) for key, products in sellers.items() for p in products}
    return found | {(p, CATEGORY[1]) for p in _category(generation)} | {(LISTED, "US")}


def _items(out: Path, series: str) -> list[str]:
    layout = Layout(out)
    return [
        orjson.loads(line)["item_id"] for p in layout.series_files(series) for line in read_lines(p)
    ]


async def _expected(box: SandboxProcess, pairs: set[tuple[str, str]] | None = None) -> set[str]:
    ids: set[str] = set()
    for product_id, region in _pairs() if pairs is None else pairs:
        ids.update(await box.ids(product_id, region))
    return ids


def _holder(server: RedisServer, series: str) -> str | None:
    """The worker that holds a series and has committed some of its pages, if one does."""
    import redis  # noqa: PLC0415 -- as the crawler does: only here

    client = redis.Redis(port=server.port, decode_responses=True)
    try:
        owner = str(client.hget(f"crawler:job:p:~{series}", "o") or "")
        committed = client.scard(f"crawler:job:iseen:{series}")
    finally:
        client.close()
    return (owner.rpartition("#")[0] or None) if committed else None


async def _kill_holder(server: RedisServer, series: str, running: dict[str, Any]) -> str:
    async with asyncio.timeout(30):
        while (victim := _holder(server, series)) is None:  # noqa: ASYNC110 -- another process's progress
            await asyncio.sleep(0.003)
    running[victim].send_signal(signal.SIGKILL)
    await running[victim].wait()
    assert running[victim].returncode == -signal.SIGKILL, "the source stage ended first"
    return victim


async def test_workers_killed_in_the_source_stage_find_and_walk_each_product_once(
    tmp_path: Path, redis_server: RedisServer
):
    # slow pages, so the kills come while a series' walk is under way
    options = SandboxOptions(latency=(0.05, 0.1), fault_rate=0.03, charge_failures=True)
    async with serve_in_process(options) as (url, box):
        job = _job(tmp_path, url, redis_server.url)
        running = {name: await start(job, name) for name in ("w1", "w2", "w3")}
        # the sellers' series holder dies for good: a newcomer joins, and the others take its
        # series over and seal what it left open; the category's comes back under its name
        dead = await _kill_holder(redis_server, "shop_products", running)
        del running[dead]
        running["w4"] = await start(job, "w4")
        back = await _kill_holder(redis_server, "category_top", running)
        running[back] = await start(job, back)
        for name, process in running.items():
            stderr = await _ended(process)
            assert process.returncode == 0, (name, stderr.decode())
        ids_expected = await _expected(box)
        charged = (await box.ledger())[key_fingerprint(KEY)]["charged"]
    out = load_job(job).output.dir
    ids = output_ids(out)
    assert len(ids) == len(set(ids)), "a review written twice"
    assert set(ids) == ids_expected
    sellers = [p for products in _sellers().values() for p in products]
    shop = _items(out, "shop_products")
    assert len(shop) == len(set(shop)) and set(shop) == set(sellers)
    category = _items(out, "category_top")
    assert sorted(category) == sorted(_category())
    verdict = verify(Layout(out))
    assert verdict.ok, verdict.problems
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    for name in ("shop_products", "category_top"):  # the dead worker's too: sealed
        assert manifest["series"][name]["open_shards"] == [], manifest["series"][name]
    assert charged <= _leased(redis_server) <= MAX_CREDITS
    code, stdout, stderr = await run_crawler("status", "--json", str(job))
    assert code == 0, stderr.decode()
    doc = orjson.loads(stdout)
    sources = {s["source"]: s for s in doc["sources"]}
    assert sources["shop_products"]["targets_done"] == len(SELLERS)
    assert sources["category_top"]["targets_done"] == 1
    found = sum(s["products_found"] for s in sources.values())
    assert found == len(_pairs()) - 1  # every pair but the listed one, found once
    assert doc["targets_total"] == len(_pairs())


async def test_a_coordinated_refresh_walks_the_sources_again(
    tmp_path: Path, redis_server: RedisServer
):
    async with serve_in_process(SandboxOptions()) as (url, box):
        job = _job(tmp_path, url, redis_server.url)
        for extra in ((), ("--refresh",)):
            if extra:
                assert await box.grow() == 1  # the sellers list new products, reviews are added
            running = [await start(job, name, *extra) for name in ("w1", "w2")]
            for process in running:
                stderr = await _ended(process)
                assert process.returncode == 0, stderr.decode()
        new = _pairs(1) - _pairs(0)
        assert new  # the grown listings name products the harvest never saw
        ids_new = await _expected(box, new)
    out = load_job(job).output.dir
    ids = output_ids(out)
    assert len(ids) == len(set(ids)), "a review written twice"
    assert ids_new <= set(ids)  # a product new since the harvest is walked in full
    shop = _items(out, "shop_products")
    sellers = {p for products in _sellers(1).values() for p in products}
    assert len(shop) == len(set(shop)) and set(shop) == sellers
    verdict = verify(Layout(out))
    assert verdict.ok, verdict.problems
    code, stdout, stderr = await run_crawler("status", "--json", str(job))
    assert code == 0, stderr.decode()
    doc = orjson.loads(stdout)
    assert doc["targets_total"] == len(_pairs(1))
    assert sum(s["products_found"] for s in doc["sources"]) == len(_pairs(1)) - 1
