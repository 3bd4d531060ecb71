"""What an operator sees from a script: JSON logs, the run report, status --json, across a kill."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Any

import orjson
import structlog
import structlog.testing

from crawler import load_job
from crawler.progress import Figures, Progress
from crawler.sandbox import key_fingerprint
from tests.conftest import (
    KEY,
    PRODUCTS,
    crawler_command,
    output_ids,
    requests_to,
    run_crawler,
    subprocess_env,
    target_rows,
    until,
    write_job,
)

TARGETS = [{"product_id": p, "regions": ["US", "GB", "DE"]} for p in PRODUCTS]


def _json_lines(text: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.startswith(b"{")]


async def test_json_logs_without_a_terminal(tmp_path: Path, served):
    url, _ = served
    targets: list[dict[str, Any]] = [*TARGETS[:2], {"product_id": "123", "region": "US"}]
    job = write_job(tmp_path, url, targets)
    status, _, stderr = await run_crawler("run", str(job))
    assert status == 1
    lines = [line for line in stderr.splitlines() if line.strip()]
    events = _json_lines(stderr)
    closing = lines[len(events) :]  # all JSON but the closing summary, within 80 columns
    assert all(line.startswith(b"{") for line in lines[: len(events)])
    assert len(closing) >= 2 and all(len(line.decode()) <= 80 for line in closing)
    names = [e["event"] for e in events]
    assert names[0] == "run started" and "run finished" in names
    finished = [e for e in events if e["event"] == "target finished"]
    assert len(finished) == 6
    failed = [e for e in events if e["event"] == "target failed"]
    assert [(e["product_id"], e["region"]) for e in failed] == [("123", "US")]
    assert failed[0]["reason"].startswith("400")
    for event in finished + failed[:1]:
        assert event["region"] in ("US", "GB", "DE")
    # quiet by default: nothing per page
    pages = sum(e["pages"] for e in finished)
    assert len(events) < pages


async def test_report_and_status_are_cumulative_across_a_kill(tmp_path: Path, sandbox):
    async with sandbox(latency=(0.005, 0.01)) as (url, box):
        job = write_job(tmp_path, url, TARGETS, api={"requests_per_second": 150})
        process = await asyncio.create_subprocess_exec(
            *crawler_command("run", str(job)),
            env=subprocess_env(),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await until(lambda: requests_to(box) >= 100)
        process.send_signal(signal.SIGKILL)
        await process.wait()
        status, stdout, _ = await run_crawler("status", "--json", str(job))
        assert status == 0
        middle = orjson.loads(stdout)
        waiting = middle["targets_by_status"]
        assert waiting.get("in_progress", 0) + waiting.get("not_started", 0) > 0
        assert middle["totals"]["pages"] > 0
        status, _, stderr = await run_crawler("run", str(job))
        assert status == 0, stderr.decode()
        charged = box.ledgers[key_fingerprint(KEY)].charged
    status, stdout, _ = await run_crawler("status", "--json", str(job))
    final = orjson.loads(stdout)
    report = orjson.loads((load_job(job).output.dir / "run-report.json").read_bytes())
    for doc in (final, report):
        totals = doc["totals"]
        assert doc["targets_by_status"] == {"done": len(TARGETS) * 3}
        assert totals["runs"] == 2
        assert totals["reviews"] == len(output_ids(load_job(job).output.dir))
        assert totals["pages"] >= middle["totals"]["pages"]
        # every request the sandbox charged is counted; a kill's unused lease is counted too
        assert charged <= totals["credits_charged"] <= charged + 2 * 64 * 8
    assert report["run"]["exit_status"] == 0
    row = target_rows(load_job(job).output.dir)[0]
    assert {
        "status",
        "pages",
        "records",
        "duplicates",
        "credits",
        "retries",
        "rate_limited",
        "seconds",
    } <= set(row)


async def test_without_a_terminal_progress_is_a_periodic_line():
    figures = Figures(
        targets_done=3,
        targets_total=10,
        pages=40,
        records=400,
        duplicates=5,
        credits=80,
        max_credits=1000,
        requests=40,
        rate_limited=1,
        retries=2,
        failed=0,
        capped=0,
        episodes=1,
        paused=False,
        pages_left=60,
    )
    now = [0.0]

    async def sleep(seconds: float) -> None:  # the clock moves only as the display sleeps
        now[0] += seconds
        if now[0] >= 35.0:
            raise asyncio.CancelledError  # as its owner cancels it at the end of a run

    progress = Progress(
        lambda: figures, live=False, interval=0.5, clock=lambda: now[0], sleep=sleep
    )
    with structlog.testing.capture_logs() as logged, contextlib.suppress(asyncio.CancelledError):
        await progress.run()
    lines = [e for e in logged if e["event"] == "progress"]
    assert len(lines) == 3  # at 10, 20 and 30 s: periodic, not one per sample (70 samples)
    assert lines[-1]["targets_done"] == 3 and lines[-1]["credits"] == 80
    assert {"rate", "eta_seconds", "rate_limited", "retries", "duplicates"} <= set(lines[-1])


async def test_plan_and_verify_from_the_command_line(tmp_path: Path, served):
    url, box = served
    job = write_job(tmp_path, url, TARGETS[:2])
    status, stdout, _ = await run_crawler("plan", "--json", str(job))
    assert status == 0
    blind = orjson.loads(stdout)["estimate"]
    assert blind["budget_covers"] is None and blind["targets_unknown"] == 6  # nothing known yet
    assert sum(b.requests for b in box.ledgers.values()) == 0  # plan alone sends nothing
    status, stdout, _ = await run_crawler("plan", "--probe", "--json", "--all", str(job))
    assert status == 0
    probed = orjson.loads(stdout)
    assert probed["estimate"]["targets_unknown"] == 0 and probed["estimate"]["budget_covers"]
    assert sum(b.requests for b in box.ledgers.values()) == 6  # page 1 of each target
    by_target = {(r["product_id"], r["region"]): r for r in probed["targets"]}
    assert by_target[(PRODUCTS[0], "GB")]["review_count"] == 545
    # every page of it: 545 reviews at 10 a page, page 1 already walked
    assert by_target[(PRODUCTS[0], "GB")]["walk_expected"] == 55
    status, _, stderr = await run_crawler("run", str(job))
    assert status == 0, stderr.decode()
    status, stdout, _ = await run_crawler("verify", str(job))
    assert status == 0 and b"ok" in stdout
    shard = next((load_job(job).output.dir / "shards").iterdir())
    shard.write_bytes(shard.read_bytes()[:-10])  # a shard cut short after the fact
    status, stdout, _ = await run_crawler("verify", str(job))
    assert status == 1 and b"problem" in stdout
