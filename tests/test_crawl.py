"""End to end over loopback: a job against the sandbox writes exactly the sandbox's review ids."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from crawler import load_job, run_job
from crawler.output.layout import Layout
from crawler.output.verify import verify
from tests.conftest import (
    ENV,
    PRODUCTS,
    SandboxFactory,
    crawler_command,
    expected_ids,
    output_ids,
    subprocess_env,
    target_rows,
    write_job,
)

TARGETS = [{"product_id": p, "regions": ["US", "GB", "DE"]} for p in PRODUCTS[:6]]
PAIRS = [(p, r) for p in PRODUCTS[:6] for r in ("US", "GB", "DE")]


async def test_crawl_writes_every_review_exactly_once(tmp_path: Path, sandbox: SandboxFactory):
    async with sandbox() as (url, box):
        job = load_job(write_job(tmp_path, url, TARGETS))
        result = await run_job(job, environ=ENV)
    assert result.exit_status == 0
    ids = output_ids(job.output.dir)
    assert len(ids) == len(set(ids))
    assert set(ids) == expected_ids(box, PAIRS)
    # the catalogue repeats reviews across pages and regions: dropping them must have happened
    assert result.report["totals"]["duplicates"] > 0
    in_two_regions = set(box.catalogue.ids(PRODUCTS[0], "US")) & set(
        box.catalogue.ids(PRODUCTS[0], "GB")
    )
    assert in_two_regions and in_two_regions <= set(ids)
    assert verify(Layout(job.output.dir)).ok


async def test_record_shape(tmp_path: Path, served):
    url, _ = served
    job = load_job(write_job(tmp_path, url, [{"product_id": PRODUCTS[0], "region": "US"}]))
    await run_job(job, environ=ENV)
    first, second = next(iter((job.output.dir / "shards").iterdir())).read_bytes().splitlines()[:2]
    record = orjson.loads(first)
    # the first line of a walk's page 1 carries the product's figures that page gave, once
    keys = ["review_id", "product_id", "region", "fetched_at", "product", "item"]
    assert list(record) == keys
    assert record["product"] == {"review_count": 13, "product_rating": 4.9}
    assert list(orjson.loads(second)) == [k for k in keys if k != "product"]
    assert record["review_id"] == record["item"]["review"]["review_id"]
    assert record["product_id"] == PRODUCTS[0] and record["region"] == "US"
    assert record["fetched_at"].endswith("Z")


async def test_shards_roll_over_and_are_listed(tmp_path: Path, served):
    url, box = served
    targets = [{"product_id": PRODUCTS[0], "region": "GB"}]
    job = load_job(write_job(tmp_path, url, targets, output={"shard_max_records": 100}))
    await run_job(job, environ=ENV)
    manifest = orjson.loads((job.output.dir / "manifest.json").read_bytes())
    total = len(expected_ids(box, [(PRODUCTS[0], "GB")]))
    assert [s["records"] for s in manifest["shards"]] == [100] * (total // 100) + [total % 100]
    names = [s["file"] for s in manifest["shards"]]
    assert names == sorted(names)


async def test_a_bad_target_fails_alone(tmp_path: Path, served):
    url, box = served
    targets: list[dict[str, Any]] = [
        *TARGETS[:2],
        {"product_id": "123", "region": "US"},
    ]  # the sandbox answers 400
    job = load_job(write_job(tmp_path, url, targets))
    result = await run_job(job, environ=ENV)
    assert result.exit_status == 1
    failed = [t for t in target_rows(job.output.dir) if t["status"] == "failed"]
    assert [(t["product_id"], t["reason"][:3]) for t in failed] == [("123", "400")]
    pairs = [(p, r) for p in PRODUCTS[:2] for r in ("US", "GB", "DE")]
    assert set(output_ids(job.output.dir)) == expected_ids(box, pairs)
    assert box.ledgers and sum(b.statuses["400"] for b in box.ledgers.values()) == 1  # no retry


async def test_refused_key_stops_the_run(tmp_path: Path, sandbox: SandboxFactory):
    async with sandbox(keys=frozenset({"sk_other"})) as (url, box):
        job = load_job(write_job(tmp_path, url, TARGETS))
        result = await run_job(job, environ=ENV)
    assert result.exit_status == 4
    assert "401" in result.report["run"]["stop_message"]
    # every walker stops: at most the requests already in flight were sent
    assert sum(b.requests for b in box.ledgers.values()) <= job.api.concurrency


async def test_a_refused_key_costs_only_the_requests_sent(tmp_path: Path, sandbox: SandboxFactory):
    """Walkers waiting for their slot when the 401 comes had credits reserved: they go back."""
    async with sandbox(keys=frozenset({"sk_other"})) as (url, _):
        job = load_job(write_job(tmp_path, url, TARGETS, api={"requests_per_second": 5}))
        sent = 0
        for _ in range(3):
            result = await run_job(job, environ=ENV)
            assert result.exit_status == 4
            sent += result.report["run"]["requests"]
            assert result.report["run"]["requests"] < len(TARGETS)  # most were waiting: unsent
            assert result.report["totals"]["credits_charged"] == 2 * sent


async def test_forbidden_key_stops_the_run(tmp_path: Path, sandbox: SandboxFactory):
    async with sandbox(forbidden_keys=frozenset({ENV["KEYAPI_API_KEY"]})) as (url, _):
        job = load_job(write_job(tmp_path, url, TARGETS))
        result = await run_job(job, environ=ENV)
    assert result.exit_status == 4
    assert "403" in result.report["run"]["stop_message"]


async def test_compressed_shards(tmp_path: Path, served):
    url, box = served
    for kind in ("gzip", "zstd"):
        folder = tmp_path / kind
        folder.mkdir()
        job = load_job(write_job(folder, url, TARGETS[:2], output={"compression": kind}))
        assert (await run_job(job, environ=ENV)).exit_status == 0
        ids = output_ids(job.output.dir)
        pairs = [(p, r) for p in PRODUCTS[:2] for r in ("US", "GB", "DE")]
        assert sorted(ids) == sorted(expected_ids(box, pairs))
        assert verify(Layout(job.output.dir)).ok


async def test_max_pages_caps_a_target(tmp_path: Path, served):
    url, _ = served
    targets = [{"product_id": PRODUCTS[0], "region": "GB", "max_pages": 3}]
    job = load_job(write_job(tmp_path, url, targets))
    result = await run_job(job, environ=ENV)
    assert result.exit_status == 0
    assert target_rows(job.output.dir)[0]["pages"] == 3


async def test_the_key_never_leaves_the_environment(tmp_path: Path, sandbox: SandboxFactory):
    secret = "sk_live_Secret123Canary"
    # every fault kind (slow answers shortened), so the key meets every error path
    async with sandbox(fault_rate=0.3, slow_seconds=0.2, keys=frozenset({secret})) as (url, _):
        job = write_job(tmp_path, url, TARGETS[:2])
        log_file = tmp_path / "crawl.log"
        process = await asyncio.create_subprocess_exec(
            *crawler_command("--log-level", "debug", "--log-file", str(log_file), "run", str(job)),
            env=subprocess_env(KEYAPI_API_KEY=secret),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert log_file.stat().st_size > 0
    assert _files_holding(tmp_path, secret.encode()) == []
    assert secret.encode() not in stdout + stderr


def _files_holding(folder: Path, needle: bytes) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def test_a_feed_that_never_ends_stops_after_three_empty_pages(tmp_path: Path, sandbox):
    endless = PRODUCTS[0]
    async with sandbox(endless=frozenset({endless})) as (url, box):
        job = load_job(write_job(tmp_path, url, [{"product_id": endless, "region": "US"}]))
        result = await run_job(job, environ=ENV)
    assert result.exit_status == 1
    target = target_rows(job.output.dir)[0]
    assert "3 empty pages" in target["reason"]
    pages_with_reviews = -(-len(box.catalogue.ids(endless, "US")) // 10)
    assert sum(b.requests for b in box.ledgers.values()) == pages_with_reviews + 3


async def test_a_wrong_path_stops_the_run_after_few_requests(tmp_path: Path, served):
    url, _ = served
    targets = [{"product_id": p, "regions": ["US", "GB", "DE", "FR"]} for p in PRODUCTS]
    job = load_job(write_job(tmp_path, url + "/wrong", targets))  # every answer is a 404
    result = await run_job(job, environ=ENV)
    assert result.exit_status == 5
    message = result.report["run"]["stop_message"]
    assert "404" in message and "/wrong/v1/tiktok/product/reviews" in message
    assert "?" not in message and ENV["KEYAPI_API_KEY"] not in message
    # the sandbox counts only its own endpoint: count what reached the server at all
    assert result.report["run"]["requests"] <= job.api.concurrency
    assert {t["status"] for t in target_rows(job.output.dir)} == {"pending"}


async def test_items_are_written_as_the_api_sent_them(tmp_path: Path):
    """Page 1 compact, with an integer no 64 bits hold; page 2 pretty-printed, as some APIs
    answer: the first's items land byte for byte, the second's one line each, same values."""
    wide = b'{"review":{"review_id":"1000000000000000001","likes":12345678901234567890123}}'
    plain = b'{"review":{"review_id":"1000000000000000002","text":"a\\nb"},"sku_id":"7"}'
    page1 = b'{"code":0,"data":{"review_items":[%b,%b],"has_more":true,"next_cursor":2,' % (
        wide,
        plain,
    )
    page1 += b'"review_count":3},"requestId":"x"}'
    spread = {"review": {"review_id": "1000000000000000003", "rating": 5}, "n": 1}
    page2 = orjson.dumps(
        {"code": 0, "data": {"review_items": [spread], "has_more": False, "review_count": 3}},
        option=orjson.OPT_INDENT_2,
    )

    async def reviews(request: web.Request) -> web.Response:
        body = page1 if request.query["offset"] == "1" else page2
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/tiktok/product/reviews", reviews)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        target = [{"product_id": PRODUCTS[0], "region": "US"}]
        job = load_job(write_job(tmp_path, f"http://127.0.0.1:{port}", target))
        assert (await run_job(job, environ=ENV)).exit_status == 0
    finally:
        await runner.cleanup()
    lines = next((job.output.dir / "shards").iterdir()).read_bytes().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith(b',"item":' + wide + b"}")
    assert lines[1].endswith(b',"item":' + plain + b"}")
    assert orjson.loads(lines[2])["item"] == spread  # made one line, the same value
