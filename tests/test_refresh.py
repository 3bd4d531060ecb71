"""Refreshing a finished harvest: only the new reviews; one request for a target unchanged."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import orjson

from crawler import load_job, run_job
from crawler.output.layout import Layout
from crawler.output.verify import verify
from crawler.sandbox import Sandbox, key_fingerprint
from tests.conftest import (
    ENV,
    KEY,
    PRODUCTS,
    crawler_command,
    expected_ids,
    output_ids,
    requests_to,
    run_crawler,
    subprocess_env,
    target_rows,
    until,
    write_job,
)

TARGETS = [{"product_id": p, "regions": ["US", "GB", "DE"]} for p in PRODUCTS]
PAIRS = [(p, r) for p in PRODUCTS for r in ("US", "GB", "DE")]


def _changed(box: Sandbox) -> dict[tuple[str, str], int]:
    """Targets the catalogue grew since generation 0, with how many reviews each gained."""
    grown = {}
    for pair in PAIRS:
        added, removed = box.catalogue.changes(*pair)
        if added or removed:
            grown[pair] = len(added)
    return grown


async def test_a_refresh_writes_only_new_reviews_and_skips_unchanged_targets(tmp_path, sandbox):
    async with sandbox() as (url, box):
        job = load_job(write_job(tmp_path, url, TARGETS))
        assert (await run_job(job, environ=ENV)).exit_status == 0
        shards_before = {p: p.read_bytes() for p in Layout(job.output.dir).shard_files()}
        written_before = len(output_ids(job.output.dir))
        harvest_requests = requests_to(box)
        box.grow()
        changed = _changed(box)
        assert 3 <= len(changed) < len(PAIRS) - 5  # some targets grew, most did not
        result = await run_job(job, environ=ENV, refresh=True)
        refresh_requests = requests_to(box) - harvest_requests
    assert result.exit_status == 0
    ids = output_ids(job.output.dir)
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(box, PAIRS)
    for path, data in shards_before.items():  # earlier shards untouched
        assert path.read_bytes() == data
    rows = {(r["product_id"], r["region"]): r for r in target_rows(job.output.dir)}
    for pair, row in rows.items():
        assert row["walk"] == 1 and row["status"] == "done"
        if pair not in changed:
            assert row["walk_pages"] == 1 and row["walk_new"] == 0  # one request, no more
    # a changed target stops once it found as many new reviews as its count grew by
    early = [p for p in changed if rows[p]["finish"] == "goal"]
    assert early and all(rows[p]["walk_new"] == changed[p] for p in early), [
        (rows[p], changed[p]) for p in early
    ]
    # an unchanged target: page 1 showed the same count and nothing unseen (or was the end)
    assert all(rows[p]["finish"] in ("same", "end") for p in rows if p not in changed)
    unchanged = len(PAIRS) - len(changed)
    assert refresh_requests == unchanged + sum(rows[p]["walk_pages"] for p in changed)
    assert refresh_requests < harvest_requests / 2
    (refresh,) = result.report["refreshes"]
    assert refresh["refresh"] == 1 and refresh["targets"] == len(PAIRS)
    assert refresh["changed"] == len(changed) and refresh["probed"] == len(PAIRS)
    assert refresh["new_reviews"] == len(ids) - written_before > 0
    assert refresh["credits"] == 2 * refresh_requests


async def test_plan_refresh_probes_once_and_the_run_keeps_the_probe(tmp_path: Path, sandbox):
    async with sandbox() as (url, box):
        job = write_job(tmp_path, url, TARGETS[:4])
        pairs = [(p, r) for p in PRODUCTS[:4] for r in ("US", "GB", "DE")]
        assert (await run_job(load_job(job), environ=ENV)).exit_status == 0
        box.grow()
        before = requests_to(box)
        plan = await _crawler("plan", "--refresh", "--json", str(job))
        assert requests_to(box) - before == len(pairs)  # page 1 of each, nothing more
        estimate = orjson.loads(plan)["estimate"]
        assert estimate["targets_unknown"] == 0 and estimate["pages_left"] is not None
        probed = requests_to(box)
        assert (await run_job(load_job(job), environ=ENV, refresh=True)).exit_status == 0
        rows = target_rows(load_job(job).output.dir)
        # the run bought only pages after page 1: the probe's pages were kept
        assert requests_to(box) - probed == sum(r["walk_pages"] - 1 for r in rows)
        ids = output_ids(load_job(job).output.dir)
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(box, pairs)


async def test_refresh_full_walks_every_page_of_a_changed_target(tmp_path, sandbox):
    async with sandbox() as (url, box):
        job = load_job(write_job(tmp_path, url, TARGETS))
        await run_job(job, environ=ENV)
        box.grow()
        changed = _changed(box)
        full = load_job(write_job(tmp_path, url, TARGETS, refresh="full"))
        assert (await run_job(full, environ=ENV, refresh=True)).exit_status == 0
    rows = {(r["product_id"], r["region"]): r for r in target_rows(job.output.dir)}
    for pair in changed:
        pages = -(-len(box.catalogue.ids(*pair)) // 10)
        assert rows[pair]["walk_pages"] >= pages  # to the end of the feed
    ids = output_ids(job.output.dir)
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(box, PAIRS)


async def test_a_count_that_shrank_walks_the_whole_feed(tmp_path, sandbox):
    async with sandbox(shrink=True) as (url, box):
        job = load_job(write_job(tmp_path, url, TARGETS))
        await run_job(job, environ=ENV)
        box.grow()
        shrank = [p for p in PAIRS if box.catalogue.changes(*p)[1]]
        assert shrank
        assert (await run_job(job, environ=ENV, refresh=True)).exit_status == 0
    rows = {(r["product_id"], r["region"]): r for r in target_rows(job.output.dir)}
    for pair in shrank:
        assert rows[pair]["walk_pages"] >= -(-len(box.catalogue.ids(*pair)) // 10)
    ids = set(output_ids(job.output.dir))
    assert expected_ids(box, PAIRS) <= ids  # every review there now; the removed stay written


async def _crawler(*args: str) -> bytes:
    status, stdout, stderr = await run_crawler(*args)
    assert status == 0, stderr.decode()
    return stdout


async def test_a_refresh_killed_midway_carries_on_with_or_without_the_flag(tmp_path, sandbox):
    async with sandbox(latency=(0.002, 0.01)) as (url, box):
        job = write_job(tmp_path, url, TARGETS, api={"requests_per_second": 200})
        assert (await run_job(load_job(job), environ=ENV)).exit_status == 0
        box.grow(2)
        start = requests_to(box)
        for flag in (["--refresh"], ["--refresh"], []):  # killed, resumed with it, then without
            process = await asyncio.create_subprocess_exec(
                *crawler_command("run", "--no-progress", *flag, str(job)),
                env=subprocess_env(),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            if flag:
                await until(lambda: requests_to(box) >= start + 8)  # noqa: B023 -- awaited now
                process.send_signal(signal.SIGKILL)
                start = requests_to(box)
            assert await process.wait() in (0, -signal.SIGKILL)
        report = orjson.loads((load_job(job).output.dir / "run-report.json").read_bytes())
        charged = box.ledgers[key_fingerprint(KEY)].charged
    assert report["targets_by_status"] == {"done": len(PAIRS)}
    assert [r["refresh"] for r in report["refreshes"]] == [1]  # one refresh, carried on
    ids = output_ids(load_job(job).output.dir)
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(box, PAIRS)
    assert verify(Layout(load_job(job).output.dir)).ok
    assert charged <= report["totals"]["credits_charged"]


async def test_reviews_added_behind_a_harvest_under_way_are_found_by_the_refresh(tmp_path, sandbox):
    """The feed grows while the first harvest is under way, also at places the walk has passed:
    the count the refresh compares with is the one the walk began with, so nothing is lost."""
    async with sandbox() as (url, box):
        job = load_job(write_job(tmp_path, url, TARGETS))
        await run_job(job, environ=ENV, max_pages=3)  # the harvest, three pages in
        box.grow()  # new reviews, some on pages the walks have passed
        assert (await run_job(job, environ=ENV)).exit_status == 0
        box.grow()
        for mode in ("early_stop", "full"):
            folder = tmp_path / mode
            folder.mkdir()
            copy = load_job(write_job(folder, url, TARGETS, refresh=mode))
            import shutil  # noqa: PLC0415 -- the same state, refreshed two ways

            shutil.copytree(job.output.dir, copy.output.dir)
            assert (await run_job(copy, environ=ENV, refresh=True)).exit_status == 0
            ids = output_ids(copy.output.dir)
            assert len(ids) == len(set(ids)), mode
            assert set(ids) == expected_ids(box, PAIRS), mode
