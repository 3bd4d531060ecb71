"""A job of 100,000 targets from a CSV: killed during start-up and during its run, still exact."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from crawler import load_job
from crawler.output.layout import Layout
from crawler.output.verify import verify
from crawler.sandbox import Catalogue, SandboxOptions, serve_in_process
from tests.conftest import (
    crawler_command,
    output_ids,
    subprocess_env,
    target_rows,
)

TARGETS = 100_000


def small_targets(count: int) -> list[tuple[str, str]]:
    """Targets of at most 10 reviews (one page each), so the ones a run finishes can be checked
    one by one against the catalogue."""
    catalogue, found = Catalogue(), list[tuple[str, str]]()
    product = 1729679758111249333
    while len(found) < count:
        for region in ("US", "GB", "DE", "FR"):
            if catalogue.review_count(str(product), region) <= 10:
                found.append((str(product), region))
        product += 1
    return found[:count]


async def _start(job: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *crawler_command("--log-level", "warning", "run", "--no-progress", str(job)),
        env=subprocess_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_kills_during_start_up_and_run_of_a_100k_target_job(tmp_path: Path):
    pairs = small_targets(TARGETS)
    (tmp_path / "targets.csv").write_text(
        "product_id,region\n" + "".join(f"{p},{r}\n" for p, r in pairs)
    )
    async with serve_in_process(SandboxOptions()) as (url, box):
        job = tmp_path / "job.yaml"
        job.write_text(
            f"api: {{base_url: '{url}', requests_per_second: 5000, concurrency: 16}}\n"
            "budget: {max_credits: 10000000}\n"
            "output: {dir: out, shard_max_records: 2000}\n"
            "targets_file: targets.csv\n"
        )

        async def sent() -> int:
            return sum(book["requests"] for book in (await box.ledger()).values())

        async def run_until(requests: int) -> asyncio.subprocess.Process:
            """A run, once the sandbox has answered this many requests in all."""
            process = await _start(job)
            while await sent() < requests:
                assert process.returncode is None, "the run ended early"
                await asyncio.sleep(0.02)
            return process

        # start-up: reading the CSV, the first write of 100,000 rows, the first claims
        for after in (0.3, 0.6, 0.9, 1.2):
            process = await _start(job)
            await asyncio.sleep(after)  # a moment of start-up, whatever happens then
            process.send_signal(signal.SIGKILL)
            await process.wait()
        for enough in (2_000, 5_000):  # the run: killed while pages are being committed
            process = await run_until(enough)
            process.send_signal(signal.SIGKILL)
            await process.wait()
        process = await run_until(8_000)
        process.send_signal(signal.SIGINT)
        _, stderr = await process.communicate()
        assert process.returncode == 130, stderr.decode()
        total_requests = await sent()
    out = load_job(job).output.dir
    rows = target_rows(out)
    assert len(rows) == TARGETS
    done = [(r["product_id"], r["region"]) for r in rows if r["status"] == "done"]
    assert len(done) >= 6_000
    ids = output_ids(out)
    assert len(ids) == len(set(ids))  # nothing twice
    catalogue = Catalogue()
    expected: set[str] = set()
    for product_id, region in done:
        expected.update(catalogue.ids(product_id, region))
    assert expected <= set(ids)  # nothing lost of what was finished
    # and nothing more than what was committed: the other targets have nothing written
    started = {(r["product_id"], r["region"]) for r in rows if r["pages"]}
    assert started == set(done)
    assert set(ids) == expected
    # each kill costs only the pages in flight or on their way to a commit when it came:
    # the requests, the writer's queue and the two batches in its pipeline (here about a
    # tenth of a second of requests)
    assert total_requests - sum(r["pages"] for r in rows) <= 2 * 300
    assert verify(Layout(out)).ok
