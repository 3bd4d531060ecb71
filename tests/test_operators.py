"""What operators do to a coordinated job, through real workers and a real redis-server: a hung
worker started again under its name, a job file edited after a budget stop, two job files of
one name, a one-process job run with --redis, kills under a small budget, Redis down or refusing
the password, the URL given on the command line."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml

from crawler import load_job
from crawler.output.layout import Layout
from crawler.sandbox import SandboxOptions, key_fingerprint, serve_in_process
from tests.conftest import KEY, RedisServer, free_port, output_ids, run_crawler
from tests.test_coordination import (
    MORE,
    PAIRS,
    _ended,
    assert_exact,
    expected,
    start,
    until_requests,
    write_job,
)


async def test_a_hung_worker_and_its_restart_under_the_same_name(
    tmp_path: Path, redis_server: RedisServer
):
    """The restart is refused while the hung one lives (its name is held on this machine);
    once it is killed, a restart seals the shard it left open and starts a new one."""
    options = SandboxOptions(latency=(0.005, 0.02))
    async with serve_in_process(options) as (url, box):
        job = write_job(tmp_path, url, redis_server.url, PAIRS, api={"requests_per_second": 100})
        hung = await start(job, "w1")
        await until_requests(box, 60)
        hung.send_signal(signal.SIGSTOP)
        again = await start(job, "w1")
        stderr = await _ended(again, 30)
        assert again.returncode == 2, stderr.decode()
        assert b"worker 'w1' is running already on this machine" in stderr
        hung.send_signal(signal.SIGKILL)
        await hung.wait()
        shards = Layout(load_job(job).output.dir).shard_files()
        before = {p.name: p.read_bytes() for p in shards}
        restarted = await start(job, "w1")
        stderr = await _ended(restarted)
        assert restarted.returncode == 0, stderr.decode()
        ids_expected = await expected(box, PAIRS)
    assert_exact(job, ids_expected)
    after = {p.name: p.read_bytes() for p in Layout(load_job(job).output.dir).shard_files()}
    for name, data in before.items():  # the old files: cut back at most, never appended to
        assert after[name] == data[: len(after[name])]


async def test_targets_removed_after_a_budget_stop_are_not_walked(
    tmp_path: Path, redis_server: RedisServer
):
    kept, dropped = PAIRS[:24], PAIRS[24:]
    async with serve_in_process(SandboxOptions()) as (url, box):
        job = write_job(tmp_path, url, redis_server.url, PAIRS, budget={"max_credits": 200})
        stderr = await _ended(await start(job, "w1"))
        assert b"exit 3" in stderr, stderr.decode()
        asked = dict((await box.ledger())[key_fingerprint(KEY)]["targets"])
        write_job(tmp_path, url, redis_server.url, kept)  # half removed, the budget raised
        worker = await start(job, "w1")
        stderr = await _ended(worker)
        assert worker.returncode == 0, stderr.decode()
        now = (await box.ledger())[key_fingerprint(KEY)]["targets"]
        for product_id, region in dropped:  # not one request more for a removed target
            assert now.get(f"{product_id}:{region}", 0) == asked.get(f"{product_id}:{region}", 0)
        ids_expected = await expected(box, kept)
    ids = output_ids(load_job(job).output.dir)
    assert len(ids) == len(set(ids)) and ids_expected <= set(ids)
    status, stdout, _ = await run_crawler("status", "--json", str(job))
    assert status == 0
    assert orjson.loads(stdout)["targets_total"] == len(kept)


async def test_a_raised_max_pages_walks_on(tmp_path: Path, redis_server: RedisServer):
    pairs = [(p, "US") for p in MORE[4:8]]  # products of several pages each
    async with serve_in_process(SandboxOptions()) as (url, box):
        job = write_job(tmp_path, url, redis_server.url, pairs)
        doc = yaml.safe_load(job.read_text())
        for target in doc["targets"]:
            target["max_pages"] = 1
        job.write_text(yaml.safe_dump(doc))
        assert (await _ended(p := await start(job, "w1"))) is not None and p.returncode == 0
        for target in doc["targets"]:
            del target["max_pages"]
        job.write_text(yaml.safe_dump(doc))
        worker = await start(job, "w1")
        stderr = await _ended(worker)
        assert worker.returncode == 0, stderr.decode()
        ids_expected = await expected(box, pairs)
    assert_exact(job, ids_expected)


async def test_two_job_files_of_one_name_are_two_jobs(tmp_path: Path, redis_server: RedisServer):
    async with serve_in_process(SandboxOptions()) as (url, _):
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        first = write_job(tmp_path / "a", url, redis_server.url, PAIRS[:4])
        other = write_job(tmp_path / "b", url, redis_server.url, PAIRS[4:8])
        worker = await start(first, "w1")
        assert (await _ended(worker)) is not None and worker.returncode == 0
        refused = await start(other, "w1")
        stderr = await _ended(refused)
    assert refused.returncode == 2, stderr.decode()
    assert b"coordination.job" in stderr and b"Traceback" not in stderr
    assert not Layout(load_job(other).output.dir).shard_files()


async def test_a_job_run_in_one_process_is_not_bought_again_with_redis(
    tmp_path: Path, redis_server: RedisServer
):
    async with serve_in_process(SandboxOptions()) as (url, box):
        job = write_job(tmp_path, url, redis_server.url, PAIRS, budget={"max_credits": 400})
        doc = yaml.safe_load(job.read_text())
        del doc["coordination"]
        job.write_text(yaml.safe_dump(doc))
        status, _, stderr = await run_crawler("run", "--no-progress", str(job))
        assert status == 3, stderr.decode()
        sent = (await box.ledger())[key_fingerprint(KEY)]["requests"]
        worker = await start(job, "w1", "--redis", redis_server.url)
        stderr = await _ended(worker)
        assert worker.returncode == 2, stderr.decode()
        assert b"run in one process" in stderr and b"Traceback" not in stderr
        assert (await box.ledger())[key_fingerprint(KEY)]["requests"] == sent


async def test_kills_under_a_small_budget_forfeit_a_small_part_of_it(
    tmp_path: Path, redis_server: RedisServer
):
    """1,200 credits, three workers at 300/s, three SIGKILLs: most of it is still bought."""
    async with serve_in_process(SandboxOptions(latency=(0.002, 0.01))) as (url, box):
        job = write_job(tmp_path, url, redis_server.url, PAIRS, budget={"max_credits": 1200})
        workers = {f"w{n}": await start(job, f"w{n}") for n in (1, 2, 3)}
        for name in ("w1", "w2", "w3"):
            await until_requests(box, 20 * int(name[1]))
            workers[name].send_signal(signal.SIGKILL)
            await workers[name].wait()
            workers[name] = await start(job, name)
        for process in workers.values():
            await _ended(process)
        charged = (await box.ledger())[key_fingerprint(KEY)]["charged"]
        status, stdout, stderr = await run_crawler("status", "--json", str(job))
    assert 600 <= charged <= 1200, charged
    assert status == 0, stderr.decode()
    forfeited = orjson.loads(stdout)["totals"]["credits_forfeited"]
    # leased by the killed workers and never used (some may have gone out in flight): a small
    # share, as leases shrink with what is left
    assert 0 < forfeited <= 0.25 * 1200


async def test_status_with_redis_down_says_so(tmp_path: Path, redis_server: RedisServer):
    job = write_job(tmp_path, "http://127.0.0.1:9", redis_server.url, PAIRS[:2])
    redis_server.stop()
    status, stdout, stderr = await run_crawler("status", str(job))
    assert status == 8, stderr.decode()
    assert b"unreachable" in stderr and b"Traceback" not in stderr and not stdout


async def test_a_wrong_redis_password_ends_the_worker_at_once(tmp_path: Path):
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(free_port(), folder)
    server.start("--requirepass", "right-password")
    try:
        url = f"redis://:wrong-password@127.0.0.1:{server.port}/0"
        job = write_job(tmp_path, "http://127.0.0.1:9", url, PAIRS[:2])
        loop = asyncio.get_running_loop()
        started = loop.time()
        worker = await start(job, "w1")
        stderr = await _ended(worker, 30)
        seconds = loop.time() - started
        status, _, status_err = await run_crawler("status", str(job))
    finally:
        server.stop()
    assert worker.returncode == 8, stderr.decode()
    assert seconds < 10
    assert b"refused the password" in stderr and b"Traceback" not in stderr
    assert b"wrong-password" not in stderr + status_err
    assert status == 8 and b"refused the password" in status_err


async def test_lease_seconds_alone_and_the_url_on_the_command_line(
    tmp_path: Path, redis_server: RedisServer
):
    async with serve_in_process(SandboxOptions()) as (url, box):
        job = write_job(tmp_path, url, redis_server.url, PAIRS[:6])
        doc = yaml.safe_load(job.read_text())
        doc["coordination"] = {"lease_seconds": 2}
        job.write_text(yaml.safe_dump(doc))
        worker = await start(job, "w1", "--redis", redis_server.url)
        stderr = await _ended(worker)
        assert worker.returncode == 0, stderr.decode()
        ids_expected = await expected(box, PAIRS[:6])
        status, _, stderr = await run_crawler("run", "--no-progress", str(job))
    assert_exact(job, ids_expected)
    assert status == 2 and b"coordination.redis_url: not set" in stderr


async def test_a_coordinated_refresh_writes_only_new_reviews_through_a_kill(
    tmp_path: Path, redis_server: RedisServer
):
    async with serve_in_process(SandboxOptions(latency=(0.002, 0.01))) as (url, box):
        job = write_job(tmp_path, url, redis_server.url, PAIRS)
        for process in [await start(job, f"w{n}") for n in (1, 2)]:
            stderr = await _ended(process)
            assert process.returncode == 0, stderr.decode()
        before = set(output_ids(load_job(job).output.dir))
        await box.grow(2)
        sent = (await box.ledger())[key_fingerprint(KEY)]["requests"]
        workers = [await start(job, f"w{n}", "--refresh") for n in (1, 2)]
        await until_requests(box, sent + 10)
        workers[0].send_signal(signal.SIGKILL)  # killed in the refresh; back with the flag
        await workers[0].wait()
        workers[0] = await start(job, "w1", "--refresh")
        for process in workers:
            stderr = await _ended(process)
            assert process.returncode == 0, stderr.decode()
        ids_expected = await expected(box, PAIRS)
        status, stdout, _ = await run_crawler("status", "--json", str(job))
    assert_exact(job, ids_expected)
    assert status == 0
    doc = orjson.loads(stdout)
    (refresh,) = doc["refreshes"]  # one refresh, joined by the restarted worker
    assert refresh["refresh"] == 1 and refresh["targets"] == len(PAIRS)
    assert refresh["new_reviews"] == len(ids_expected - before)
    assert doc["targets_by_status"] == {"done": len(PAIRS)}


async def test_fresh_waits_for_no_worker_and_then_starts_over(
    tmp_path: Path, redis_server: RedisServer
):
    async with serve_in_process(SandboxOptions(latency=(0.005, 0.02))) as (url, box):
        job = write_job(tmp_path, url, redis_server.url, PAIRS, api={"requests_per_second": 100})
        running = await start(job, "w1")
        await until_requests(box, 20)
        refused = await start(job, "w2", "--fresh")
        stderr = await _ended(refused, 30)
        assert refused.returncode == 2 and b"stop every worker of the job" in stderr
        running.send_signal(signal.SIGINT)
        await _ended(running)
        again = await start(job, "w2", "--fresh")
        stderr = await _ended(again)
        assert again.returncode == 0, stderr.decode()
        ids_expected = await expected(box, PAIRS)
    assert_exact(job, ids_expected)
    workers = {p.name.split("-")[1] for p in Layout(load_job(job).output.dir).shard_files()}
    assert workers == {"w2"}  # w1's shards went with the rest of the old state


@pytest.mark.parametrize("refusal", ["noperm", "readonly", "oom"])
async def test_a_redis_that_refuses_the_worker_ends_it_at_once(tmp_path: Path, refusal: str):
    servers = []
    try:
        primary = RedisServer(free_port(), tmp_path / "primary")
        primary.folder.mkdir()
        primary.start()
        servers.append(primary)
        url = primary.url
        client: Any = redis.Redis(port=primary.port)
        if refusal == "noperm":  # a user that may read and nothing more
            client.execute_command(
                "ACL", "SETUSER", "reader", "on", ">secret-pw", "~*", "+@read", "+config|get",
                "+info", "+time",
            )  # fmt: skip
            url = f"redis://reader:secret-pw@127.0.0.1:{primary.port}/0"
        elif refusal == "oom":
            client.config_set("maxmemory", 1)
            client.config_set("maxmemory-policy", "noeviction")
        else:
            replica = RedisServer(free_port(), tmp_path / "replica")
            replica.folder.mkdir()
            replica.start("--replicaof", "127.0.0.1", str(primary.port))
            servers.append(replica)
            url = replica.url
        client.close()
        job = write_job(tmp_path, "http://127.0.0.1:9", url, PAIRS[:2])
        worker = await start(job, "w1")
        stderr = await _ended(worker, 30)
    finally:
        for server in servers:
            server.stop()
    assert worker.returncode == 8, stderr.decode()
    said = {"noperm": b"may not run", "readonly": b"read-only replica", "oom": b"out of memory"}
    assert said[refusal] in stderr and b"Traceback" not in stderr and b"secret-pw" not in stderr
