"""Sources: endpoints declared in the job file find the products; every guarantee holds across."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from crawler import ConfigError, load_job, run_job
from crawler.output.layout import Layout
from crawler.output.shards import read_lines
from crawler.output.verify import verify
from crawler.sandbox import Sandbox, key_fingerprint
from crawler.sandbox.listings import ANALYTICS, SHOP_PRODUCTS
from crawler.state.sqlite import SqliteView
from tests.conftest import ENV, KEY, crawler_command, output_ids, run_crawler, subprocess_env

SHARED = "1729679758111249342"  # listed by both sellers, and in the job file's targets
ENDPOINTS: dict[str, Any] = {
    "shop_products": {
        "path": SHOP_PRODUCTS,
        "params": {"seller_id": "{seller_id}", "region": "{region}"},
        "items": "data.products",
        "item_id": "product_id",
        "pagination": {
            "cursor": {
                "param": "cursor",
                "first": "0",
                "next": "data.next_cursor",
                "has_more": "data.has_more",
            }
        },
        "credits_per_request": 2,
    },
    "category_top": {
        "path": ANALYTICS,
        "params": {"category_id": "{category_id}", "region": "{region}"},
        "items": "data",
        "item_id": "product_id",
        "pagination": {
            "page_number": {"param": "page_num", "first": 1, "size_param": "page_size", "size": 1}
        },
        "credits_per_request": 1,
    },
}
SELLERS = [{"seller_id": "7001", "region": "US"}, {"seller_id": "7010", "region": "US"}]
CATEGORY = [{"category_id": "601", "region": "US"}]


def _job(folder: Path, url: str, **changes: Any) -> Path:
    doc: dict[str, Any] = {
        "api": {
            "base_url": url,
            "requests_per_second": 300,
            "concurrency": 6,
            "timeout_seconds": 5,
            "retry": {"max_attempts": 8, "base_seconds": 0.01, "cap_seconds": 0.05},
            "shutdown_grace_seconds": 2,
        },
        "budget": {"max_credits": 100_000},
        "output": {"dir": "out", "shard_max_records": 200},
        "endpoints": ENDPOINTS,
        "sources": [
            {"endpoint": "shop_products", "targets_file": "sellers.csv"},
            {"endpoint": "category_top", "targets": CATEGORY},
        ],
        "targets": [{"product_id": SHARED, "region": "US"}],
    }
    doc.update(changes)
    (folder / "sellers.csv").write_text(
        "seller_id,region\n" + "".join(f"{s['seller_id']},{s['region']}\n" for s in SELLERS)
    )
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _found(box: Sandbox) -> set[str]:
    products = {
        p for s in SELLERS for p in box.listed(SHOP_PRODUCTS, "US", seller_id=s["seller_id"])
    }
    return products | set(box.listed(ANALYTICS, "US", category_id="601"))


def _items(out: Path, series: str) -> list[str]:
    return [
        orjson.loads(line)["item_id"]
        for path in Layout(out).series_files(series)
        for line in read_lines(path)
    ]


def _check_output(out: Path, box: Sandbox) -> None:
    products = _found(box)
    ids = output_ids(out)
    expected = {i for p in products | {SHARED} for i in box.catalogue.ids(p, "US")}
    assert len(ids) == len(set(ids)) and set(ids) == expected
    sellers = {
        p for s in SELLERS for p in box.listed(SHOP_PRODUCTS, "US", seller_id=s["seller_id"])
    }
    listed = _items(out, "shop_products")
    assert len(listed) == len(set(listed)) and set(listed) == sellers
    assert sorted(_items(out, "category_top")) == sorted(
        box.listed(ANALYTICS, "US", category_id="601")
    )
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    for name in ("shop_products", "category_top"):  # each series listed as the reviews are
        listing = manifest["series"][name]
        files = [e["file"] for e in listing["shards"] + listing["open_shards"]]
        assert files == [f"shards/{p.name}" for p in Layout(out).series_files(name)]
        assert listing["records"] == len(_items(out, name))
    assert verify(Layout(out)).ok


async def test_verify_checks_a_source_series_by_its_manifest(tmp_path, sandbox):
    async with sandbox() as (url, _box):
        job = load_job(_job(tmp_path, url))
        assert (await run_job(job, environ=ENV)).exit_status == 0
    out = job.output.dir
    shard = Layout(out).series_files("shop_products")[0]
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(lines[0] * 2 + b"".join(lines[2:]))  # the same count, one item twice
    problems = verify(Layout(out)).problems
    assert any("appears twice" in p and p.startswith(f"{shard}:2") for p in problems), problems
    shard.unlink()
    assert f"{shard}: listed in the manifest but missing" in verify(Layout(out)).problems


async def test_a_discovery_job_walks_each_found_product_once(tmp_path, sandbox):
    async with sandbox() as (url, box):
        job = load_job(_job(tmp_path, url))
        result = await run_job(job, environ=ENV)
        assert result.exit_status == 0, result.report
        _check_output(job.output.dir, box)
        book = box.ledgers[key_fingerprint(KEY)]
        # the product two sellers list and the job file names: its pages bought once each
        pages = -(-len(box.catalogue.ids(SHARED, "US")) // 10)
        assert book.targets[f"{SHARED}:US"] <= pages + 1
        assert book.charged == result.report["totals"]["credits_charged"]
        sources = {s["source"]: s for s in result.report["sources"]}
        assert sources["shop_products"]["targets_done"] == 2
        assert sources["category_top"]["pages"] == 3  # a page a product, then the empty one
        assert sources["category_top"]["credits"] == 3
        stages = result.report["estimate"]["stages"]
        assert stages["products_found"] == len(_found(box) - {SHARED})  # listed already
        assert stages["review_pages_left"] == 0
        # the job file's targets change: the products found are kept, not dropped
        changed = load_job(_job(tmp_path, url, targets=[{"product_id": PRODUCT_B, "region": "US"}]))
        again = await run_job(changed, environ=ENV)
        assert again.exit_status == 0
        assert again.report["targets_total"] == len(_found(box) | {PRODUCT_B})
        code, stdout, _ = await run_crawler("status", "--json", str(changed.path))
        assert code == 0 and orjson.loads(stdout)["sources"][0]["products_found"] > 0


PRODUCT_B = "1729679758111249333"


async def test_a_source_cursor_that_does_not_move_fails_that_walk(tmp_path, sandbox):
    async with sandbox(stuck=frozenset({"7002"})) as (url, _):
        SELLERS.append({"seller_id": "7002", "region": "US"})
        try:
            job = load_job(_job(tmp_path, url, targets=[]))
        finally:
            SELLERS.pop()
        result = await run_job(job, environ=ENV)
        assert result.exit_status == 1  # a failed walk, the rest done
        sources = {s["source"]: s for s in result.report["sources"]}
        assert sources["shop_products"]["failed"] == 1
        assert sources["shop_products"]["targets_done"] == 2
        with sqlite3.connect(Layout(job.output.dir).state_db) as db:
            (reason,) = [
                r for (r,) in db.execute("SELECT reason FROM source_targets WHERE reason NOT NULL")
            ]
        assert "already walked in this walk (the same page)" in reason


def _listing_requests(box: Sandbox) -> int:
    book = box.ledgers.get(key_fingerprint(KEY))
    if book is None:
        return 0
    return sum(n for k, n in book.targets.items() if k.startswith(("seller:", "analytics:")))


def _discovering(job: Path) -> bool:
    """Whether some source target is still to walk (or no run has saved state yet)."""
    view = SqliteView.open(Layout(load_job(job).output.dir))
    if view is None:
        return True
    try:
        return (
            any((s["targets_done"] or 0) < s["targets"] for s in view.sources())
            or not view.sources()
        )
    finally:
        view.close()


async def _start(job: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *crawler_command("--log-level", "warning", "run", "--no-progress", str(job)),
        env=subprocess_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_sigkill_during_both_stages_loses_and_doubles_nothing(tmp_path, sandbox):
    rng = random.Random(19)
    async with sandbox(latency=(0.005, 0.02), fault_rate=0.05, charge_failures=True) as (url, box):
        job = _job(tmp_path, url, budget={"max_credits": 150})
        kills = budget_stops = 0
        during_discovery = 0  # kills that came before every source target was walked
        for attempt in range(40):
            listed = _listing_requests(box)
            process = await _start(job)
            if attempt < 2:  # the first kills in the discovery stage: as its pages come in
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        while _listing_requests(box) <= listed:  # noqa: ASYNC110 -- another process's progress
                            await asyncio.sleep(0.002)
            else:
                await asyncio.sleep(rng.uniform(0.25, 1.0))
            if process.returncode is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
            await process.wait()
            during_discovery += process.returncode == -signal.SIGKILL and _discovering(job)
            if process.returncode == 3:  # a small budget stops cleanly, within its ceiling
                assert box.ledgers[key_fingerprint(KEY)].charged <= 150
                budget_stops += 1
                job = _job(tmp_path, url)
            if kills >= 6 and budget_stops and during_discovery:
                break
        assert kills >= 6 and budget_stops and during_discovery
        process = await _start(job)
        _, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
    _check_output(load_job(job).output.dir, box)


def _set(doc: dict[str, Any], where: tuple[Any, ...], value: Any) -> None:
    for part in where[:-1]:
        doc = doc[part]
    doc[where[-1]] = value


BOTH = {**ENDPOINTS["shop_products"]["pagination"], "page_number": {"param": "p", "size": 3}}


@pytest.mark.parametrize(
    ("where", "value", "said"),
    [
        (("endpoints", "shop_products", "path"), "v1/tiktok/shop/products", "must start with '/'"),
        (("endpoints", "shop_products", "params", "seller_id"), "{shop}", "unknown field {shop}"),
        (("endpoints", "shop_products", "pagination"), BOTH, "(both given)"),
        (("endpoints", "category_top", "pagination"), {}, "(neither given)"),
        (("sources", 1, "endpoint"), "category", "unknown endpoint 'category'"),
    ],
)
def test_a_bad_declaration_is_refused_with_file_line_and_field(tmp_path, where, value, said):
    path = _job(tmp_path, "http://127.0.0.1:9")
    doc = yaml.safe_load(path.read_text())
    _set(doc, where, value)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ConfigError) as caught:
        load_job(path)
    message = str(caught.value)
    assert said in message and message.startswith(f"{path}:"), message
    line = int(message.split(":")[1])
    named = where[-1] if where[-1] != "seller_id" else "params"
    assert str(named) in path.read_text().splitlines()[line - 1], message
    field = ".".join(f"[{p}]" if isinstance(p, int) else p for p in where[:3]).replace(".[", "[")
    assert field in message, message


async def test_a_bad_declaration_exits_2(tmp_path):
    path = _job(tmp_path, "http://127.0.0.1:9")
    path.write_text(path.read_text().replace("path: /v1/tiktok/shop/products\n", "path: v1/x\n", 1))
    code, _, stderr = await run_crawler("plan", str(path))
    assert code == 2 and b"endpoints.shop_products.path" in stderr and b"Traceback" not in stderr
