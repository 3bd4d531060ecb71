"""Kill it anywhere, run it again: exactly the reviews of an uninterrupted run, within budget."""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

import orjson
import pytest

from crawler import StateError, load_job, run_job
from crawler.output.layout import Layout
from crawler.output.verify import verify
from crawler.sandbox import key_fingerprint
from crawler.state.sqlite import SqliteView
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
    until,
    write_job,
)

TARGETS = [{"product_id": p, "regions": ["US", "GB", "DE"]} for p in PRODUCTS]
PAIRS = [(p, r) for p in PRODUCTS for r in ("US", "GB", "DE")]


async def _start(job: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *crawler_command("--log-level", "warning", "run", "--no-progress", str(job)),
        env=subprocess_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


BIG_PRODUCTS = [str(1729679758111249333 + i) for i in range(20)]
BIG = [{"product_id": p, "regions": ["US", "GB", "DE", "FR"]} for p in BIG_PRODUCTS]
BIG_PAIRS = [(p, r) for p in BIG_PRODUCTS for r in ("US", "GB", "DE", "FR")]


async def test_sigkill_at_random_moments_loses_and_duplicates_nothing(tmp_path, sandbox):
    rng = random.Random(20261124)
    ceiling = 2400  # the whole job needs more: the ceiling is met somewhere among the kills

    def job_file(max_credits: int) -> Path:
        # small shards put kills inside shard seals and checkpoint writes too
        return write_job(
            tmp_path,
            url,
            BIG,
            api={"requests_per_second": 150},
            budget={"max_credits": max_credits},
            output={"shard_max_records": 150},
        )

    async with sandbox(latency=(0.002, 0.01), fault_rate=0.05, charge_failures=True) as (url, box):
        job = job_file(ceiling)
        kills, ceiling_met = 0, False
        for _ in range(80):
            process = await _start(job)
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            if process.returncode is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
            await process.wait()
            if process.returncode == 3:
                assert box.ledgers[key_fingerprint(KEY)].charged <= ceiling
                ceiling_met = True
                job_file(1_000_000)  # raise it, as a user would
            if kills >= 20 and ceiling_met:
                break
        assert kills >= 20 and ceiling_met
        process = await _start(job)
        _, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
    out = load_job(job).output.dir
    ids = output_ids(out)
    assert len(ids) == len(set(ids))
    assert set(ids) == expected_ids(box, BIG_PAIRS)
    verdict = verify(Layout(out))
    assert verdict.ok, verdict.problems


@pytest.mark.parametrize(("stop", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_a_signal_stops_cleanly_and_resumes(tmp_path, sandbox, stop, status):
    async with sandbox(latency=(0.01, 0.02)) as (url, box):
        job = write_job(tmp_path, url, TARGETS, api={"requests_per_second": 100})
        process = await _start(job)
        await until(lambda: requests_to(box) >= 50)
        process.send_signal(stop)
        _, stderr = await process.communicate()
        assert process.returncode == status, stderr.decode()
        out = load_job(job).output.dir
        report = orjson.loads((out / "run-report.json").read_bytes())
        waiting = report["targets_by_status"]
        assert waiting.get("in_progress", 0) + waiting.get("not_started", 0) > 0
        assert verify(Layout(out)).ok  # every shard sealed, no partial line
        process = await _start(job)
        _, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
    ids = output_ids(out)
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(box, PAIRS)
    # a clean stop commits every page in flight, so no page was bought twice
    report = orjson.loads((out / "run-report.json").read_bytes())
    assert requests_to(box) == report["totals"]["pages"]


@pytest.mark.parametrize(("compression", "commit_every"), [("gzip", 1), ("zstd", 10), ("none", 25)])
async def test_sigkill_mid_run_resumes_exactly(tmp_path, sandbox, compression, commit_every):
    """Compressed shards end on a member or frame boundary at every commit; saving state every
    N pages only means more pages fetched again after a kill, never a review lost or doubled."""
    async with sandbox(latency=(0.002, 0.01)) as (url, box):
        output = {"compression": compression, "commit_every_pages": commit_every}
        job = write_job(tmp_path, url, TARGETS, api={"requests_per_second": 300}, output=output)
        for enough in (60, 200):
            process = await _start(job)
            await until(lambda: requests_to(box) >= enough)  # noqa: B023 -- awaited at once
            process.send_signal(signal.SIGKILL)
            await process.wait()
        process = await _start(job)
        _, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
    out = load_job(job).output.dir
    ids = output_ids(out)
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(box, PAIRS)
    assert verify(Layout(out)).ok


async def test_a_second_crawler_on_the_same_job_is_refused(tmp_path, sandbox):
    async with sandbox(latency=(0.05, 0.1)) as (url, box):
        job = write_job(tmp_path, url, TARGETS, api={"requests_per_second": 20})
        first = await _start(job)
        await until(lambda: requests_to(box) >= 1)
        second = await _start(job)
        _, stderr = await second.communicate()
        assert second.returncode == 2
        assert b"another crawler is running this job" in stderr and b"Traceback" not in stderr
        first.send_signal(signal.SIGINT)
        assert await first.wait() == 130


async def test_finished_targets_are_not_fetched_again(tmp_path, served):
    url, box = served
    job = load_job(write_job(tmp_path, url, TARGETS[:2]))
    assert (await run_job(job, environ=ENV)).exit_status == 0
    sent = box.ledgers[key_fingerprint(KEY)].requests
    assert (await run_job(job, environ=ENV)).exit_status == 0
    assert box.ledgers[key_fingerprint(KEY)].requests == sent


async def test_targets_added_later_are_harvested(tmp_path, served):
    url, box = served
    job = load_job(write_job(tmp_path, url, TARGETS[:1]))
    await run_job(job, environ=ENV)
    bigger = load_job(write_job(tmp_path, url, TARGETS[:3]))
    assert (await run_job(bigger, environ=ENV)).exit_status == 0
    pairs = [(p, r) for p in PRODUCTS[:3] for r in ("US", "GB", "DE")]
    ids = output_ids(job.output.dir)
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(box, pairs)


async def test_changed_output_settings_are_refused(tmp_path, served):
    url, _ = served
    job = load_job(write_job(tmp_path, url, TARGETS[:1]))
    await run_job(job, environ=ENV)
    changed = load_job(write_job(tmp_path, url, TARGETS[:1], output={"compression": "gzip"}))
    with pytest.raises(StateError, match="output settings changed"):
        await run_job(changed, environ=ENV)


async def test_corrupt_state_is_an_error_and_fresh_starts_over(tmp_path, served):
    url, box = served
    job = load_job(write_job(tmp_path, url, TARGETS[:1]))
    await run_job(job, environ=ENV)
    layout = Layout(job.output.dir)
    shards = layout.shard_files()
    layout.state_db.write_bytes(b"not a database, " * 512)
    for suffix in ("-wal", "-shm"):
        layout.state_db.with_name(layout.state_db.name + suffix).unlink(missing_ok=True)
    with pytest.raises(StateError, match="unreadable state"):
        await run_job(job, environ=ENV)
    assert layout.shard_files() == shards  # nothing overwritten
    keep = job.output.dir / "notes.txt"
    keep.write_text("mine")
    assert (await run_job(job, environ=ENV, fresh=True)).exit_status == 0
    assert keep.read_text() == "mine"
    pairs = [(PRODUCTS[0], r) for r in ("US", "GB", "DE")]
    ids = output_ids(job.output.dir)
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(box, pairs)


async def test_corrupt_state_exit_status_via_cli(tmp_path, served):
    url, _ = served
    job = write_job(tmp_path, url, TARGETS[:1])
    await run_job(load_job(job), environ=ENV)
    layout = Layout(load_job(job).output.dir)
    data = bytearray(layout.state_db.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # the header's page and the schema behind it
    layout.state_db.write_bytes(bytes(data))
    status, _, stderr = await run_crawler("run", str(job))
    assert status == 2, stderr.decode()
    assert b"state.db" in stderr and b"Traceback" not in stderr


@pytest.mark.parametrize(("stop", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_a_second_signal_stops_at_once_and_stays_resumable(tmp_path, sandbox, stop, status):
    """SIGTERM (a service manager, kill) takes the same two steps as Ctrl-C."""
    async with sandbox(latency=(0.5, 1.0)) as (url, box):
        api = {"requests_per_second": 100, "shutdown_grace_seconds": 60}
        job = write_job(tmp_path, url, TARGETS, api=api)
        process = await _start(job)
        await until(lambda: requests_to(box) >= 8)  # every walker has a request in flight
        process.send_signal(stop)
        loop = asyncio.get_running_loop()
        second = loop.time()
        process.send_signal(stop)
        _, stderr = await process.communicate()
        assert process.returncode == status, stderr.decode()
        assert loop.time() - second < 5  # not the 60 s grace, nor the 0.5-1 s answers
    async with sandbox() as (url, box):  # the same catalogue, without the slow answers
        write_job(tmp_path, url, TARGETS, api={"requests_per_second": 400})
        process = await _start(job)
        _, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
    ids = output_ids(load_job(job).output.dir)
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(box, PAIRS)


async def test_shards_of_someone_else_are_never_touched(tmp_path, served):
    url, _ = served
    job = load_job(write_job(tmp_path, url, TARGETS[:1]))
    foreign = job.output.dir / "shards" / "reviews-000001.jsonl"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("not ours\n")
    for _ in range(2):  # refused, and refused again: the first refusal left no state behind
        with pytest.raises(StateError, match="holds shards but no job state"):
            await run_job(job, environ=ENV)
    assert foreign.read_text() == "not ours\n"


async def test_a_cut_open_shard_is_named_by_verify_and_never_answered_with_fresh(tmp_path, sandbox):
    """An open shard cut below what was committed (a copy gone wrong, a restore): verify names
    it, and the run says to put it back; --fresh would delete every committed shard."""
    async with sandbox(latency=(0.002, 0.01)) as (url, _):
        output = {"shard_max_records": 40, "compression": "none"}
        job = write_job(tmp_path, url, TARGETS, api={"requests_per_second": 300}, output=output)
        out = load_job(job).output.dir

        def committed() -> tuple[Path, int] | None:
            """The open shard and the length the state committed of it, once over 2,000 (and a
            seal has written the manifest: verify had one to go by)."""
            if not (out / "manifest.json").exists():
                return None
            try:
                view = SqliteView.open(Layout(out))
            except StateError:  # the run is creating it
                return None
            if view is None:
                return None
            try:
                name, length = view.job["open_shard"], view.job["shard_bytes"]
            finally:
                view.close()
            return (out / "shards" / name, length) if name and length > 2_000 else None

        process = await _start(job)
        await until(lambda: committed() is not None or process.returncode is not None)
        assert process.returncode is None, "the run ended first: nothing was tested"
        process.send_signal(signal.SIGKILL)
        await process.wait()
    found = committed()
    assert found is not None
    shard, length = found
    with shard.open("r+b") as file:  # cut to below what the state committed
        file.truncate(length - 1_000)
    status, stdout, _ = await run_crawler("verify", str(job))
    assert status != 0 and f"{shard}:".encode() in stdout, stdout.decode()
    status, _, stderr = await run_crawler("run", "--no-progress", str(job))
    said = " ".join(stderr.decode().split())
    assert status == 2 and "cut or replaced since" in said, said
    assert "--fresh" not in said and "Traceback" not in said
