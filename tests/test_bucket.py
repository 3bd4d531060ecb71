"""Output to an S3-compatible bucket (a real SeaweedFS on loopback): exact after kills, sealed
objects never replaced, a bucket that refuses writes stops the run before a credit is spent."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
import yaml

from crawler import load_job
from crawler.errors import ConfigError, OutputError, StateError
from crawler.output.bucket import Bucket, BucketUrl, _short
from crawler.output.chains import is_stray
from crawler.output.layout import Layout
from crawler.output.publisher import MANIFEST, PARTS, BucketPublisher, Segment, part_key
from crawler.output.shards import read_lines
from crawler.output.verify import verify_bucket
from crawler.pacing.retry import RetryPolicy
from crawler.sandbox import Sandbox, SandboxOptions, serve_in_process
from crawler.sandbox.listings import ANALYTICS, SHOP_PRODUCTS
from crawler.state import ShardInfo
from tests.conftest import (
    PRODUCTS,
    S3_NO_ADMIN,
    S3_READER,
    S3_WRITER,
    RedisServer,
    S3Server,
    crawler_command,
    expected_ids,
    free_port,
    requests_to,
    subprocess_env,
    until,
    write_job,
)
from tests.test_coordination import expected, until_requests
from tests.test_coordination import write_job as coordinated_job
from tests.test_sources import ENDPOINTS

MORE = [str(1729679758111249333 + i) for i in range(24)]
TARGETS = [{"product_id": p, "regions": ["US", "GB", "DE"]} for p in PRODUCTS]
PAIRS = [(p, r) for p in PRODUCTS for r in ("US", "GB", "DE")]


def _url() -> str:
    return f"s3://crawler-tests/{uuid.uuid4().hex[:12]}/reviews"


def _bucket(server: S3Server, url: str) -> Bucket:
    return Bucket.open(BucketUrl.parse(url), RetryPolicy(base_seconds=0), server.env())


async def _start(job: Path, env: dict[str, str], *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *crawler_command("--log-level", "warning", "run", "--no-progress", *args, str(job)),
        env=subprocess_env(**env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _start_worker(job: Path, worker: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    """A coordinated worker, as tests.test_coordination starts one, with the bucket's env."""
    return await asyncio.create_subprocess_exec(
        *crawler_command(
            "--log-level", "warning", "run", "--no-progress", "--worker", worker, str(job)
        ),
        env=subprocess_env(**env),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def _run(job: Path, env: dict[str, str], *args: str) -> tuple[int, str]:
    process = await _start(job, env, *args)
    _, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stderr.decode()


async def _bucket_ids(bucket: Bucket, tmp: Path) -> list[str]:
    """Every review id in the objects the manifest lists, duplicates kept."""
    found = await bucket.get(MANIFEST)
    assert found is not None
    ids: list[str] = []
    for entry in orjson.loads(found[0])["shards"]:
        shard = await bucket.get(entry["file"])
        assert shard is not None, entry
        path = tmp / Path(entry["file"]).name
        path.write_bytes(shard[0])
        ids += [orjson.loads(line)["review_id"] for line in read_lines(path)]
        path.unlink()
    return ids


async def _verify(job: Path, env: dict[str, str]) -> str:
    process = await asyncio.create_subprocess_exec(
        *crawler_command("verify", str(job)),
        env=subprocess_env(**env, PYTHONFAULTHANDLER="1"),  # a crash says where
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, (stdout + stderr).decode()
    return stdout.decode()


async def test_a_run_into_a_bucket_holds_every_review_once(tmp_path, sandbox, s3_server):
    url = _url()
    output: dict[str, Any] = {"dir": url, "compression": "gzip", "shard_max_records": 300}
    async with sandbox() as (base, box):
        job = write_job(tmp_path, base, TARGETS, output=output)
        status, stderr = await _run(job, s3_server.env())
        assert status == 0, stderr
    bucket = _bucket(s3_server, url)
    ids = await _bucket_ids(bucket, tmp_path)
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(box, PAIRS)
    manifest = orjson.loads((await bucket.get(MANIFEST) or (b"", None))[0])
    assert manifest["records"] == len(ids) and len(manifest["shards"]) >= 5
    assert all(e["file"].startswith("shards/reviews-") for e in manifest["shards"])
    assert await bucket.list(PARTS) == []  # every part's bytes are in a sealed object now
    said = await _verify(job, s3_server.env())
    assert said.endswith(f"{len(ids):,} reviews: ok\n"), said
    work = Layout(load_job(job).output.dir)  # the local working folder: state, no manifest
    assert work.state_db.exists() and not work.manifest.exists()
    assert work.root == tmp_path / ".crawler" / "crawler-tests" / url.split("/", 3)[3]


async def test_sigkill_during_uploads_then_a_rerun_is_exact(tmp_path, sandbox, s3_server):
    url = _url()
    bucket = _bucket(s3_server, url)
    output = {"dir": url, "compression": "zstd", "shard_max_records": 200}
    async with sandbox(latency=(0.002, 0.01)) as (base, box):
        job = write_job(tmp_path, base, TARGETS, api={"requests_per_second": 300}, output=output)
        for enough in (40, 160):
            process = await _start(job, s3_server.env())
            await until(lambda: requests_to(box) >= enough)  # noqa: B023 -- awaited at once
            # killed while parts are in the bucket: not asserted after the kill, since a
            # publish may have dropped every listed shard's parts just before it
            async with asyncio.timeout(30):
                while not await bucket.list(PARTS):  # noqa: ASYNC110 -- another process's progress
                    await asyncio.sleep(0.01)
            process.send_signal(signal.SIGKILL)
            await process.communicate()
            assert process.returncode == -signal.SIGKILL
            if await bucket.get(MANIFEST) is not None:  # what a reader sees meanwhile: sealed
                await _verify(job, s3_server.env())  # objects only, each whole, no id twice
        status, stderr = await _run(job, s3_server.env())
        assert status == 0, stderr
    ids = await _bucket_ids(bucket, tmp_path)
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(box, PAIRS)
    assert await bucket.list(PARTS) == []
    await _verify(job, s3_server.env())


async def test_a_sealed_object_is_never_replaced(tmp_path, sandbox, s3_server):
    url = _url()
    bucket = _bucket(s3_server, url)
    async with sandbox() as (base, _):
        first = tmp_path / "first"
        first.mkdir()
        output = {"dir": url, "shard_max_records": 400}
        status, stderr = await _run(
            write_job(first, base, TARGETS[:3], output=output), {**s3_server.env()}
        )
        assert status == 0, stderr
        manifest = await bucket.get(MANIFEST)
        assert manifest is not None
        name = orjson.loads(manifest[0])["shards"][0]["file"]
        sealed = await bucket.get(name)
        assert sealed is not None
        # a create-only put of a sealed key is refused (412), whoever tries it
        assert await bucket.put_new(name, b'{"review_id":"forged"}\n') is False
        # another job (another state) pointed at the same prefix: refused before a request
        second = tmp_path / "second"
        second.mkdir()
        job = write_job(second, base, TARGETS[3:], output=output)
        status, stderr = await _run(job, s3_server.env())
        assert status == 2, stderr
        assert "shards this job's state does not have" in stderr, stderr
    assert (await bucket.get(name) or (b"", None))[0] == sealed[0]
    assert (await bucket.get(MANIFEST) or (b"", None))[0] == manifest[0]


async def test_a_bucket_that_refuses_writes_stops_the_run_with_exit_7(tmp_path, sandbox, s3_server):
    output = {"dir": _url()}
    async with sandbox() as (base, box):
        job = write_job(tmp_path, base, TARGETS, output=output)
        status, stderr = await _run(job, s3_server.env(S3_READER))
        assert requests_to(box) == 0  # refused before the first credit was spent
    assert status == 7, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "access denied (403)" in lines[0], stderr
    assert "crawler-tests" in lines[0] and "Traceback" not in stderr
    for secret in (S3_READER["AWS_SECRET_ACCESS_KEY"], S3_WRITER["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in stderr


async def test_a_missing_bucket_stops_the_run_with_exit_7(tmp_path, sandbox, s3_server):
    """Credentials that may write but not create a bucket: SeaweedFS answers 403 (AWS would
    answer NoSuchBucket); either way one line naming the bucket, and not one credit spent."""
    async with sandbox() as (base, box):
        job = write_job(tmp_path, base, TARGETS, output={"dir": "s3://no-such-bucket/x"})
        status, stderr = await _run(job, s3_server.env(S3_NO_ADMIN))
        assert requests_to(box) == 0
    assert status == 7, stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("crawler: s3://no-such-bucket/x/") and "bucket exists" in line, line
    assert S3_NO_ADMIN["AWS_SECRET_ACCESS_KEY"] not in stderr


@pytest.mark.parametrize("url", ["s3://Bad_Bucket/x", "s3://ok-bucket/a//b"])
def test_a_bad_bucket_url_is_a_job_file_error(tmp_path, url):
    job = write_job(tmp_path, "sandbox", TARGETS[:1], output={"dir": url})
    with pytest.raises(ConfigError, match="output") as caught:
        load_job(job)
    assert "s3://" in str(caught.value)


def _committed_open_shard(server: RedisServer, worker: str, job: str = "job") -> str:
    """``worker``'s open shard when a commit has counted some of its bytes, else ''."""
    import redis  # noqa: PLC0415 -- as the crawler does: only here

    client: Any = redis.Redis(port=server.port, decode_responses=True)
    try:
        shard = client.hget(f"crawler:{job}:w:{worker}", "open_shard") or ""
        record = client.hget(f"crawler:{job}:shards", shard) if shard else None
        return shard if record and orjson.loads(record)["bytes"] > 0 else ""
    finally:
        client.close()


async def test_three_workers_into_one_bucket_one_lost_with_its_files(
    tmp_path, s3_server, redis_server
):
    """A worker SIGKILLed and its machine's files gone: the others fetch its open shard's
    committed part from the bucket, seal it, take its products over; nothing lost, nothing
    twice, no shared folder."""
    url = _url()
    bucket = _bucket(s3_server, url)
    options = SandboxOptions(latency=(0.002, 0.01))
    pairs = [(p, r) for p in MORE for r in ("US", "DE")]
    async with serve_in_process(options) as (base, box):
        # shards big enough never to be sealed in this run: w2 is killed with an open one, not
        # between a seal and its next shard's first commit (then there is nothing to fetch)
        output = {"dir": url, "compression": "gzip", "shard_max_records": 100_000}
        job = coordinated_job(tmp_path, base, redis_server.url, pairs, output=output)
        env = s3_server.env()
        running = {w: await _start_worker(job, w, env) for w in ("w1", "w2", "w3")}
        await until_requests(box, 150)
        async with asyncio.timeout(30):  # killed once some of its batches are committed
            while not (open_shard := _committed_open_shard(redis_server, "w2")):  # noqa: ASYNC110 -- another process's progress
                await asyncio.sleep(0.05)
        running["w2"].send_signal(signal.SIGKILL)
        await running["w2"].wait()
        assert [k for k, _ in await bucket.list(PARTS) if f"/{open_shard}/" in k]
        work = Layout(load_job(job).output.dir)
        lost = [p for p in work.shard_files() if p.name.startswith("reviews-w2-")]
        assert lost
        for path in lost:  # its machine is gone: nothing of it on any disk
            path.unlink()
        said = ""
        for worker in ("w1", "w3"):
            _, stderr = await running[worker].communicate()
            assert running[worker].returncode == 0, stderr.decode()
            said += stderr.decode()
        # its open shard came from the bucket (its file was gone), then was sealed
        assert "fetched a shard's committed part from the bucket" in said, said
        assert "sealed a dead worker's open shard" in said, said
        wanted = await expected(box, pairs)
    ids = await _bucket_ids(bucket, tmp_path)
    assert len(ids) == len(set(ids)) and set(ids) == wanted
    manifest = orjson.loads((await bucket.get(MANIFEST) or (b"", None))[0])
    assert any(e["file"].startswith("shards/reviews-w2-") for e in manifest["shards"])
    # no part is left: not of a shard no commit counted (the lost worker's strays), nor of a
    # listed one (the last manifest's writer deletes every listed shard's parts)
    assert await bucket.list(PARTS) == []
    await _verify(job, env)


async def test_a_bucket_that_does_not_answer_is_tried_within_the_caps_then_exit_7(
    tmp_path, sandbox
):
    """Connection refused is a transient fault: tried again within api.retry's caps (8 tries
    here), then the run stops before its first request."""
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", **S3_WRITER}
    async with sandbox() as (base, box):
        job = write_job(tmp_path, base, TARGETS, output={"dir": _url()})
        status, stderr = await _run(job, env)
        assert requests_to(box) == 0
    assert status == 7, stderr
    assert "cannot write after 8 tries" in stderr and len(stderr.strip().splitlines()) == 1


async def test_fresh_removes_the_jobs_objects_and_starts_over(tmp_path, sandbox, s3_server):
    url = _url()
    bucket = _bucket(s3_server, url)
    await bucket.put_new("notes.txt", b"a user's own object")  # not the job's: kept
    async with sandbox() as (base, box):
        job = write_job(tmp_path, base, TARGETS[:4], output={"dir": url, "shard_max_records": 300})
        for args in ((), ("--fresh",)):
            status, stderr = await _run(job, s3_server.env(), *args)
            assert status == 0, stderr
        pairs = [(p, r) for p in PRODUCTS[:4] for r in ("US", "GB", "DE")]
        ids = await _bucket_ids(bucket, tmp_path)
        assert len(ids) == len(set(ids)) and set(ids) == expected_ids(box, pairs)
    assert (await bucket.get("notes.txt") or (b"", None))[0] == b"a user's own object"
    await _verify(job, s3_server.env())


@pytest.mark.parametrize(
    ("output", "said"),
    [
        ({"dir": "out", "work_dir": "w"}, "work_dir: only for an output.dir that is a bucket"),
        ({"dir": "out", "bucket": "s3://b/p"}, "bucket: not a setting"),
    ],
)
def test_bucket_settings_are_checked(tmp_path, output, said):
    job = write_job(tmp_path, "sandbox", TARGETS[:1], output=output)
    with pytest.raises(ConfigError, match=said):
        load_job(job)


def test_work_dir_is_relative_to_the_job_file(tmp_path):
    job = write_job(tmp_path, "sandbox", TARGETS[:1], output={"dir": _url(), "work_dir": "w"})
    loaded = load_job(job)
    assert loaded.output.dir == tmp_path / "w" and loaded.output.bucket is not None


async def test_parts_put_again_and_rebuilt_end_to_end(tmp_path, s3_server):
    """A part put again with the same bytes (an answer lost) is fine; a shard is rebuilt from
    the parts at or below its committed length only, and not at all when they do not reach
    it."""
    bucket = _bucket(s3_server, _url())
    publisher = BucketPublisher(bucket, Layout(tmp_path))
    name = "reviews-000001.jsonl"
    first, second = b'{"review_id":"1"}\n', b'{"review_id":"2"}\n'
    await publisher.before_commit([Segment(name, 0, first)])
    await publisher.before_commit([Segment(name, 0, first)])  # the same put, sent again
    await publisher.before_commit([Segment(name, len(first), second)])
    await publisher.before_commit([Segment(name, 2 * len(first), b"uncommitted\n")])
    assert await publisher.committed(name, 2 * len(first)) == first + second
    assert await publisher.committed(name, len(first)) == first
    assert await publisher.committed(name, len(first) + 1) is None  # no part ends there
    assert await publisher.fetch(name, 2 * len(first))
    assert (tmp_path / "shards" / name).read_bytes() == first + second


async def test_a_paused_processs_parts_never_replace_the_committed_ones(tmp_path, s3_server):
    """A worker's earlier incarnation, only paused, wakes and puts parts of the shard name its
    new incarnation reuses: under its own token, beside them, never in their place. The shard
    is rebuilt from the one chain its sha256 or record count allows; two that fit stop the
    run, never a guess; the start-up clean-up keeps every part below the committed length."""
    url = _url()
    bucket = _bucket(s3_server, url)
    layout = Layout(tmp_path)
    old, new = BucketPublisher(bucket, layout), BucketPublisher(bucket, layout)
    name = "reviews-000002.jsonl"
    committed = b'{"review_id":"3"}\n{"review_id":"4"}\n'  # the new incarnation's: 2 records
    stray = b'{"review_id":"' + b"x" * 19 + b'"}\n'  # the paused one's: as long, 1 record
    assert len(stray) == len(committed) == 36
    await new.before_commit([Segment(name, 0, committed)])
    await old.before_commit([Segment(name, 0, stray)])  # no error, nothing replaced
    await old.before_commit([Segment(name, 0, stray)])
    assert (await bucket.get(part_key(name, 0, 36, new.token)) or (b"", None))[0] == committed
    with pytest.raises(StateError, match=rf"{name}: 2 chains of parts under {url}/_parts/"):
        await new.committed(name, 36)
    assert await new.committed(name, 36, records=2) == committed
    sealed = hashlib.sha256(committed).hexdigest()
    assert await new.committed(name, 36, sha256=sealed, records=2) == committed
    # the paused one's batches, past the committed length, and of a shard no commit opened
    await new.before_commit([Segment(name, 36, b'{"review_id":"5"}\n')])
    await old.before_commit([Segment(name, 18, b'{"review_id":"6"}\n{"review_id":"7"}\n')])
    await old.before_commit([Segment("reviews-000003.jsonl", 0, stray)])
    state = ShardInfo(name, 2, 36)
    await new.recover(set(), [], [state], state, 36, owner=None)
    assert sorted(k for k, _ in await bucket.list(PARTS)) == sorted(
        [
            part_key(name, 0, 36, new.token),
            part_key(name, 0, 36, old.token),
            part_key(name, 18, 54, old.token),  # starts below it: kept, ends past it: not read
        ]
    )
    assert (tmp_path / "shards" / name).read_bytes() == committed  # fetched: its file was gone
    # two chains that fit the record count: only the sealed sha256 tells them apart
    other = b'{"review_id":"8"}\n{"review_id":"9"}\n'
    await old.before_commit([Segment(name, 0, other[:18]), Segment(name, 18, other[18:])])
    with pytest.raises(StateError, match="rather than guess"):
        await new.committed(name, 36, records=2)
    assert await new.committed(name, 36, sha256=sealed, records=2) == committed
    await new.publish([ShardInfo(name, 2, 36, sealed)], [], {})
    assert (await bucket.get(f"shards/{name}") or (b"", None))[0] == committed


async def test_a_sealed_object_of_other_bytes_is_not_taken_as_published(tmp_path, s3_server):
    """An object already at a sealed shard's key is compared by content, not by size."""
    url = _url()
    bucket = _bucket(s3_server, url)
    publisher = BucketPublisher(bucket, Layout(tmp_path))
    name = "reviews-000001.jsonl"
    data, forged = b'{"review_id":"1"}\n', b'{"review_id":"X"}\n'
    await bucket.put_new(f"shards/{name}", forged)
    shard = ShardInfo(name, 1, len(data), hashlib.sha256(data).hexdigest())
    with pytest.raises(StateError, match="another sha256"):
        await publisher.publish([shard], [], {})
    assert await bucket.get(MANIFEST) is None
    fine = _bucket(s3_server, _url())
    await fine.put_new(f"shards/{name}", data)  # put before, its manifest not: taken as is
    await BucketPublisher(fine, Layout(tmp_path)).publish([shard], [], {})
    assert len(orjson.loads((await fine.get(MANIFEST) or (b"", None))[0])["shards"]) == 1


async def test_verify_refuses_a_manifest_that_lists_a_shard_twice(s3_server):
    bucket = _bucket(s3_server, _url())
    data = b'{"review_id":"1"}\n'
    await bucket.put_new("shards/reviews-000001.jsonl", data)
    entry = {"file": "shards/reviews-000001.jsonl", "records": 1, "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
    doc = {"version": 2, "records": 2, "shards": [entry, entry], "open_shards": []}
    await bucket.put_new(MANIFEST, orjson.dumps(doc))
    verdict = await verify_bucket(bucket)
    assert not verdict.ok
    assert any("listed twice" in p for p in verdict.problems), verdict.problems


async def test_a_worker_started_again_on_a_new_machine_seals_its_shard_from_the_bucket(
    tmp_path, s3_server, redis_server
):
    """Killed, its files gone, started again under its name (another machine, as it were):
    it fetches the shard its earlier run left open from the bucket and seals it."""
    url = _url()
    bucket = _bucket(s3_server, url)
    pairs = [(p, r) for p in MORE[:16] for r in ("US", "DE")]
    async with serve_in_process(SandboxOptions(latency=(0.002, 0.01))) as (base, box):
        job = coordinated_job(tmp_path, base, redis_server.url, pairs, output={"dir": url})
        env = s3_server.env()
        first = await _start_worker(job, "w1", env)
        await until_requests(box, 80)
        async with asyncio.timeout(30):
            while not await bucket.list(PARTS):  # noqa: ASYNC110 -- another process's progress
                await asyncio.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        work = Layout(load_job(job).output.dir)
        for path in work.shard_files():
            path.unlink()
        again = await _start_worker(job, "w1", env)
        _, stderr = await again.communicate()
        said = stderr.decode()
        assert again.returncode == 0, said
        assert "fetched a shard's committed part from the bucket" in said, said
        wanted = await expected(box, pairs)
    ids = await _bucket_ids(bucket, tmp_path)
    assert len(ids) == len(set(ids)) and set(ids) == wanted
    await _verify(job, env)


async def test_export_to_a_bucket_puts_each_shards_tables_once(tmp_path, sandbox, s3_server):
    """`crawler export --to s3://...`: every table file put whole, the ledger in the bucket; a
    second export puts nothing again."""
    to = _url()
    async with sandbox() as (base, _):
        job = write_job(tmp_path, base, TARGETS[:4], output={"shard_max_records": 300})
        status, stderr = await _run(job, {})
        assert status == 0, stderr
    summaries = []
    for _ in range(2):
        process = await asyncio.create_subprocess_exec(
            *crawler_command("export", str(job), "--json", "--to", to),
            env=subprocess_env(**s3_server.env()),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr_bytes = await process.communicate()
        assert process.returncode == 0, stderr_bytes.decode()
        summaries.append(orjson.loads(stdout))
    shards = len(Layout(tmp_path / "out").shard_files())
    assert summaries[0]["shards"]["exported"] == shards > 1
    assert summaries[1]["shards"] == {
        **summaries[0]["shards"],
        "exported": 0,
        "already_exported": shards,
    }
    bucket = _bucket(s3_server, to)
    keys = [key for key, _ in await bucket.list("")]
    assert "_exported.json" in keys
    reviews = [key for key in keys if key.startswith("reviews/")]
    assert len(reviews) == shards
    for key in reviews:
        found = await bucket.get(key)
        assert found is not None
        (tmp_path / Path(key).name).write_bytes(found[0])
    counted = duckdb.sql(f"select count(*) from '{tmp_path}/reviews-*.parquet'")
    assert counted is not None
    assert counted.fetchall()[0][0] == summaries[0]["rows"]["reviews"] > 0


async def _export(job: Path, env: dict[str, str], *args: str) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        *crawler_command("export", str(job), "--json", *args),
        env=subprocess_env(**env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    summary: dict[str, Any] = orjson.loads(stdout)
    return summary


async def test_a_bucket_jobs_shards_export_from_the_bucket(tmp_path, sandbox, s3_server):
    """The working folder's shard files gone: the export reads the sealed objects; by default
    its tables go beside the shards, under PREFIX/export/."""
    url = _url()
    async with sandbox() as (base, _):
        job = write_job(tmp_path, base, TARGETS[:3], output={"dir": url, "shard_max_records": 300})
        status, stderr = await _run(job, s3_server.env())
        assert status == 0, stderr
    for path in Layout(load_job(job).output.dir).shard_files():
        path.unlink()
    manifest = orjson.loads((await _bucket(s3_server, url).get(MANIFEST) or (b"", None))[0])
    summary = await _export(job, s3_server.env(), "--to", str(tmp_path / "tables"))
    assert summary["shards"]["exported"] == len(manifest["shards"]) > 1
    counted = duckdb.sql(f"select count(*) from '{tmp_path}/tables/reviews/*.parquet'")
    assert counted is not None and counted.fetchall()[0][0] == manifest["records"]
    again = await _export(job, s3_server.env())  # to s3://.../export
    assert again["shards"]["exported"] == len(manifest["shards"])
    ledger = await _bucket(s3_server, f"{url}/export").get("_exported.json")
    assert ledger is not None and len(orjson.loads(ledger[0])["shards"]) == len(manifest["shards"])


async def test_a_bucket_that_cannot_be_read_is_said_so_whole(tmp_path):
    """A read that runs out of tries says it could not read, and what to do about a read; a
    server's long message is cut at a word, marked, never mid-word."""
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", **S3_WRITER}
    bucket = Bucket.open(BucketUrl.parse(_url()), RetryPolicy(base_seconds=0), env)
    with pytest.raises(OutputError) as caught:
        await verify_bucket(bucket)
    said = str(caught.value)
    assert "cannot read after" in said and "once the bucket can be read" in said, said
    assert "takes writes" not in said
    text = "the server answered with a non-2xx status " * 10
    kept = _short(Exception(text)).removesuffix(" ...")
    assert len(kept) <= 200 and text.startswith(kept) and text[len(kept)] == " ", kept


def _open_shard_bytes(server: RedisServer, worker: str) -> int:
    """The committed bytes of ``worker``'s open shard, as Redis has them (0: none)."""
    import redis  # noqa: PLC0415 -- as the crawler does: only here

    client = redis.Redis(port=server.port, decode_responses=True)
    try:
        file = client.hget(f"crawler:job:w:{worker}", "open_shard")
        record = client.hget("crawler:job:shards", file) if file else None
        return int(orjson.loads(record)["bytes"]) if record else 0
    finally:
        client.close()


async def test_a_workers_open_shard_lost_everywhere_stops_its_next_run(
    tmp_path, s3_server, redis_server
):
    """Its files gone and its committed parts too: the worker started again under its name
    stops with an error naming the shard, rather than seal nothing and end as if whole."""
    url = _url()
    bucket = _bucket(s3_server, url)
    pairs = [(p, r) for p in MORE[:16] for r in ("US", "DE")]
    async with serve_in_process(SandboxOptions(latency=(0.002, 0.01))) as (base, _):
        output = {"dir": url, "shard_max_records": 100_000}  # one shard: the one left open
        job = coordinated_job(tmp_path, base, redis_server.url, pairs, output=output)
        env = s3_server.env()
        first = await _start_worker(job, "w1", env)
        async with asyncio.timeout(30):
            while not await asyncio.to_thread(_open_shard_bytes, redis_server, "w1"):  # noqa: ASYNC110 -- another process's progress
                await asyncio.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        file = next(p.name for p in Layout(load_job(job).output.dir).shard_files())
        for path in Layout(load_job(job).output.dir).shard_files():
            path.unlink()
        await bucket.delete(*[key for key, _ in await bucket.list(PARTS)])
        again = await _start_worker(job, "w1", env)
        _, stderr = await again.communicate()
    said = stderr.decode()
    assert again.returncode == 2, said
    assert f"{file}: the shard an earlier run of worker w1 left open" in said, said
    assert "cannot be sealed" in said


async def test_a_dead_workers_open_shard_lost_everywhere_stops_the_adopter(
    tmp_path, s3_server, redis_server
):
    """A dead worker's files gone and its committed parts too: the worker that would adopt it
    stops with an error naming the shard, rather than skip it and end as if whole."""
    url = _url()
    bucket = _bucket(s3_server, url)
    pairs = [(p, r) for p in MORE for r in ("US", "DE")]
    async with serve_in_process(SandboxOptions(latency=(0.002, 0.01))) as (base, _):
        output = {"dir": url, "shard_max_records": 100_000}
        job = coordinated_job(tmp_path, base, redis_server.url, pairs, output=output)
        env = s3_server.env()
        running = {w: await _start_worker(job, w, env) for w in ("w1", "w2")}
        async with asyncio.timeout(30):
            while not await asyncio.to_thread(_open_shard_bytes, redis_server, "w2"):  # noqa: ASYNC110 -- another process's progress
                await asyncio.sleep(0.05)
        running["w2"].send_signal(signal.SIGKILL)
        await running["w2"].wait()
        for path in Layout(load_job(job).output.dir).shard_files():
            if path.name.startswith("reviews-w2-"):
                path.unlink()
        await bucket.delete(*[k for k, _ in await bucket.list(PARTS) if "/reviews-w2-" in k])
        _, stderr = await running["w1"].communicate()
    said = stderr.decode()
    assert running["w1"].returncode == 2, said
    assert "reviews-w2-" in said and "a dead worker's open shard" in said, said
    assert "cannot be sealed" in said


async def test_a_profiles_keys_are_read_and_its_secret_never_shown(tmp_path, s3_server):
    """AWS_PROFILE alone: its keys from the shared credentials file, as the AWS tools read
    them; a profile without keys is refused, naming the files and what to do, and no secret."""
    (tmp_path / "credentials").write_text(
        "[other]\naws_access_key_id = nobody\naws_secret_access_key = nothing\n"
        f"[harvests]\naws_access_key_id = {S3_WRITER['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {S3_WRITER['AWS_SECRET_ACCESS_KEY']}\n"
    )
    (tmp_path / "config").write_text("[profile sso]\nsso_session = corp\n")
    files = {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
        "AWS_CONFIG_FILE": str(tmp_path / "config"),
    }
    env = {"AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_PROFILE": "harvests", **files}
    bucket = Bucket.open(BucketUrl.parse(_url()), RetryPolicy(base_seconds=0), env)
    assert await bucket.put_new("profile-probe", b"x")
    assert (await bucket.get("profile-probe") or (b"", None))[0] == b"x"
    with pytest.raises(ConfigError, match="export-credentials --profile sso") as refused:
        Bucket.open(BucketUrl.parse(_url()), RetryPolicy(), {**env, "AWS_PROFILE": "sso"})
    assert "writer-secret" not in str(refused.value)


@pytest.mark.parametrize(
    ("endpoint", "allowed"),
    [("http://127.0.0.1:9000", True), ("http://localhost:9000", True),
     ("https://s3.example.com", True), ("http://minio.internal:9000", False),
     ("http://10.0.0.5:9000", False), ("ftp://127.0.0.1", False)],
)  # fmt: skip
def test_a_host_not_this_machines_is_reached_over_https_only(endpoint, allowed):
    env = {"AWS_ENDPOINT_URL": endpoint, **S3_WRITER}
    if allowed:
        Bucket.open(BucketUrl.parse("s3://harvests/p"), RetryPolicy(), env)
    else:
        with pytest.raises(ConfigError, match="over https only"):
            Bucket.open(BucketUrl.parse("s3://harvests/p"), RetryPolicy(), env)


async def test_a_refresh_into_a_bucket_writes_new_objects_only(tmp_path, sandbox, s3_server):
    """The harvest's objects stay as they were, byte for byte; the refresh's new reviews go
    into new sealed objects, and the manifest lists both, every review once."""
    url = _url()
    output: dict[str, Any] = {"dir": url, "compression": "zstd", "shard_max_records": 300}
    bucket = _bucket(s3_server, url)
    async with sandbox() as (base, box):
        job = write_job(tmp_path, base, TARGETS, output=output)
        assert (await _run(job, s3_server.env()))[0] == 0
        manifest = orjson.loads((await bucket.get(MANIFEST) or (b"", None))[0])
        before = {e["file"]: await bucket.get(e["file"]) for e in manifest["shards"]}
        box.grow()
        status, stderr = await _run(job, s3_server.env(), "--refresh")
        assert status == 0, stderr
        wanted = expected_ids(box, PAIRS)
    manifest = orjson.loads((await bucket.get(MANIFEST) or (b"", None))[0])
    files = [e["file"] for e in manifest["shards"]]
    assert files[: len(before)] == list(before) and len(files) > len(before)
    for key, found in before.items():  # never replaced: the same bytes, the same ETag
        assert found is not None and await bucket.get(key) == found
    ids = await _bucket_ids(bucket, tmp_path)
    assert len(ids) == len(set(ids)) and set(ids) == wanted
    await _verify(job, s3_server.env())


# sellers and a category whose products have few reviews: the series' shards seal several times
# (5 items a shard) without the reviews' making hundreds of objects
SELLERS = ["7100", "7157", "7094", "7143", "7108", "7061", "7130", "7036", "7195"]
CATEGORY = "621"


def _sources_job(folder: Path, base: str, url: str, **api: Any) -> Path:
    (folder / "sellers.csv").write_text(
        "seller_id,region\n" + "".join(f"{s},US\n" for s in SELLERS)
    )
    job = write_job(
        folder,
        base,
        [],
        api={"requests_per_second": 300, "concurrency": 6, **api},
        output={"dir": url, "compression": "gzip", "shard_max_records": 5},
        endpoints=ENDPOINTS,
        sources=[
            {"endpoint": "shop_products", "targets_file": "sellers.csv"},
            {"endpoint": "category_top", "targets": [{"category_id": CATEGORY, "region": "US"}]},
        ],
    )
    return job


def _listed_items(box: Sandbox) -> dict[str, set[str]]:
    """Each series' item ids, as the sandbox's lists hold them now."""
    shop = {p for s in SELLERS for p in box.listed(SHOP_PRODUCTS, "US", seller_id=s)}
    return {
        "shop_products": shop,
        "category_top": set(box.listed(ANALYTICS, "US", category_id=CATEGORY)),
    }


async def _listed_records(
    bucket: Bucket, tmp: Path, listing: dict[str, Any], key: str
) -> list[str]:
    """The ids of the records in the objects a manifest's listing names, duplicates kept."""
    ids: list[str] = []
    for entry in listing["shards"]:
        shard = await bucket.get(entry["file"])
        assert shard is not None, entry
        path = tmp / Path(entry["file"]).name
        path.write_bytes(shard[0])
        ids += [orjson.loads(line)[key] for line in read_lines(path)]
        path.unlink()
    return ids


async def _check_sources_bucket(bucket: Bucket, tmp: Path, box: Sandbox) -> dict[str, Any]:
    """The bucket as a reader sees it: every expected review once in the listed review objects,
    every listed item once in each series' listed objects, sealed objects only, no part left."""
    found = await bucket.get(MANIFEST)
    assert found is not None
    manifest = orjson.loads(found[0])
    items = _listed_items(box)
    products = items["shop_products"] | items["category_top"]
    ids = await _listed_records(bucket, tmp, manifest, "review_id")
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids(
        box, [(p, "US") for p in products]
    )
    assert set(manifest["series"]) == set(items)
    for name, wanted in items.items():
        listing = manifest["series"][name]
        got = await _listed_records(bucket, tmp, listing, "item_id")
        assert len(got) == len(set(got)) and set(got) == wanted, name
        assert listing["records"] == len(got) and listing["open_shards"] == []
        assert all(e["file"].startswith(f"shards/{name}-") for e in listing["shards"])
    assert await bucket.list(PARTS) == []
    return dict(manifest)


async def test_a_sources_job_into_a_bucket_holds_every_item_and_review_once(
    tmp_path, sandbox, s3_server
):
    """Run, then --refresh (new objects only, the first run's untouched), then --fresh (the
    job's objects, series' too, removed and written again): exact each time."""
    url = _url()
    bucket = _bucket(s3_server, url)
    async with sandbox() as (base, box):
        job = _sources_job(tmp_path, base, url)
        status, stderr = await _run(job, s3_server.env())
        assert status == 0, stderr
        manifest = await _check_sources_bucket(bucket, tmp_path, box)
        shop = manifest["series"]["shop_products"]["shards"]
        assert len(shop) == -(-len(_listed_items(box)["shop_products"]) // 5) >= 3
        said = await _verify(job, s3_server.env())  # a folder's count: reviews and items
        records = manifest["records"] + sum(s["records"] for s in manifest["series"].values())
        assert said.endswith(f"{records:,} reviews: ok\n"), said
        work = Layout(load_job(job).output.dir)
        assert work.series_files("shop_products") and not work.manifest.exists()
        before = {
            e["file"]: await bucket.get(e["file"])
            for listing in (manifest, *manifest["series"].values())
            for e in listing["shards"]
        }
        box.grow()
        status, stderr = await _run(job, s3_server.env(), "--refresh")
        assert status == 0, stderr
        manifest = await _check_sources_bucket(bucket, tmp_path, box)
        for key, found in before.items():  # never replaced: the same bytes, the same ETag
            assert found is not None and await bucket.get(key) == found
        files = [e["file"] for e in manifest["series"]["shop_products"]["shards"]]
        assert len(files) > len(shop)  # a grown listing's new product: a new object
        status, stderr = await _run(job, s3_server.env(), "--fresh")
        assert status == 0, stderr
        await _check_sources_bucket(bucket, tmp_path, box)
    await _verify(job, s3_server.env())


def _open_series_committed(work: Layout) -> int:
    """The series whose open shard has committed bytes (fetched back once its file is gone)."""
    with contextlib.closing(sqlite3.connect(work.state_db)) as db:
        (count,) = db.execute(
            "SELECT count(*) FROM series WHERE open_shard IS NOT NULL AND shard_bytes > 0"
        ).fetchone()
    return int(count)


async def test_sigkill_of_a_sources_job_then_a_rerun_is_exact(tmp_path, sandbox, s3_server):
    """Killed once a series' parts are in the bucket, then again in the reviews' stage; after
    each kill every series shard file of the working folder is deleted: an open one is fetched
    back from its parts, a sealed one not yet listed is put from them."""
    url = _url()
    bucket = _bucket(s3_server, url)
    fetched = 0
    async with sandbox(latency=(0.005, 0.02)) as (base, box):
        job = _sources_job(tmp_path, base, url, requests_per_second=150)
        work = Layout(load_job(job).output.dir)
        for more in (1, 40):  # a request: the run has put its probe (SeaweedFS makes the bucket)
            enough = requests_to(box) + more
            process = await _start(job, s3_server.env())
            await until(lambda: requests_to(box) >= enough)  # noqa: B023 -- awaited at once
            async with asyncio.timeout(30):
                while not any(  # noqa: ASYNC110 -- another process's progress
                    key.startswith(f"{PARTS}shop_products-") for key, _ in await bucket.list(PARTS)
                ):
                    await asyncio.sleep(0.01)
            process.send_signal(signal.SIGKILL)
            await process.communicate()
            assert process.returncode == -signal.SIGKILL
            fetched += _open_series_committed(work)
            for path in work.series_files(None):
                path.unlink()
            if await bucket.get(MANIFEST) is not None:  # what a reader sees meanwhile
                await _verify(job, s3_server.env())
        assert fetched  # some open series shard had to come back from the bucket
        status, stderr = await _run(job, s3_server.env())
        assert status == 0, stderr
        await _check_sources_bucket(bucket, tmp_path, box)
    await _verify(job, s3_server.env())


def _coordinated_sources_job(folder: Path, base: str, url: str, redis_url: str) -> Path:
    """``_sources_job`` worked by several processes through Redis."""
    job = _sources_job(folder, base, url, concurrency=4)
    doc = yaml.safe_load(job.read_text())
    doc["coordination"] = {"redis_url": redis_url, "lease_seconds": 2, "unavailable_seconds": 30}
    job.write_text(yaml.safe_dump(doc, sort_keys=False))
    return job


def _committed_open_series(server: RedisServer, worker: str | None = None) -> tuple[str, str]:
    """A worker's open ``category_top`` shard whose committed part some commit counted:
    (worker, file), or ('', '') while there is none (``worker``: that worker's only). Its 3
    items fit one shard (5 records): open with them until its worker's run ends, so it is
    still open when the worker is killed a moment later (a ``shop_products`` shard could fill
    and be sealed meanwhile)."""
    import redis  # noqa: PLC0415 -- as the crawler does: only here

    client: Any = redis.Redis(port=server.port, decode_responses=True)
    try:
        for file, raw in sorted(client.hgetall("crawler:job:sshards").items()):
            doc = orjson.loads(raw)
            owner = doc["worker"]
            if doc["sha256"] is not None or not doc["bytes"] or worker not in (None, owner):
                continue
            if doc["series"] != "category_top":
                continue
            if client.hget(f"crawler:job:w:{owner}", f"so:{doc['series']}") == file:
                return owner, file
        return "", ""
    finally:
        client.close()


async def _until_committed_open_series(
    server: RedisServer, worker: str | None = None
) -> tuple[str, str]:
    async with asyncio.timeout(60):
        while not (found := await asyncio.to_thread(_committed_open_series, server, worker))[0]:  # noqa: ASYNC110 -- another process's progress
            await asyncio.sleep(0.01)
    return found


async def test_three_workers_of_a_sources_job_into_one_bucket_one_lost_with_its_files(
    tmp_path, sandbox, s3_server, redis_server
):
    """A coordinated sources job: a worker SIGKILLed while its series shard is open with
    committed items, and its machine's files gone; the others fetch that shard's committed part
    from the bucket, seal it, walk on; every item and every review once, nothing left open."""
    url = _url()
    bucket = _bucket(s3_server, url)
    env = s3_server.env()
    async with sandbox(latency=(0.005, 0.02)) as (base, box):
        job = _coordinated_sources_job(tmp_path, base, url, redis_server.url)
        running = {w: await _start_worker(job, w, env) for w in ("w1", "w2", "w3")}
        victim, open_file = await _until_committed_open_series(redis_server)
        running[victim].send_signal(signal.SIGKILL)
        await running[victim].wait()
        assert running[victim].returncode == -signal.SIGKILL, "it had ended already"
        assert _committed_open_series(redis_server, victim) == (victim, open_file)
        assert [k for k, _ in await bucket.list(PARTS) if f"/{open_file}/" in k]
        work = Layout(load_job(job).output.dir)
        lost = await asyncio.to_thread(work.owned_files, victim)
        assert work.shard(open_file) in lost
        for path in lost:  # its machine is gone: nothing of it on any disk
            path.unlink()
        said = ""
        for worker, process in running.items():
            if worker != victim:
                _, stderr = await asyncio.wait_for(process.communicate(), 120)
                assert process.returncode == 0, stderr.decode()
                said += stderr.decode()
        # its open series shard came from the bucket (its file was gone), then was sealed
        await _fetched_and_listed(said, open_file, bucket, tmp_path, box)
    await _verify(job, env)


async def _fetched_and_listed(
    said: str, open_file: str, bucket: Bucket, tmp: Path, box: Sandbox
) -> None:
    """``open_file`` fetched from its parts (as the log says), sealed and listed under the
    manifest's series; the bucket exact (``_check_sources_bucket``)."""
    fetched = [line for line in said.splitlines() if "fetched a shard's committed" in line]
    assert any(open_file in line for line in fetched), said
    manifest = await _check_sources_bucket(bucket, tmp, box)
    listed = {e["file"] for one in manifest["series"].values() for e in one["shards"]}
    assert f"shards/{open_file}" in listed


async def test_a_sources_worker_started_again_on_a_new_machine_seals_its_series_from_the_bucket(
    tmp_path, sandbox, s3_server, redis_server
):
    """A coordinated sources job's only worker killed with an open series shard, its files
    gone, started again under its name: it fetches that shard from the bucket and seals it,
    drops the parts no commit counted, and the job ends exact."""
    url = _url()
    bucket = _bucket(s3_server, url)
    env = s3_server.env()
    async with sandbox(latency=(0.005, 0.02)) as (base, box):
        job = _coordinated_sources_job(tmp_path, base, url, redis_server.url)
        first = await _start_worker(job, "w1", env)
        _, open_file = await _until_committed_open_series(redis_server, "w1")
        first.send_signal(signal.SIGKILL)
        await first.wait()
        assert first.returncode == -signal.SIGKILL, "it had ended already"
        assert _committed_open_series(redis_server, "w1") == ("w1", open_file)
        work = Layout(load_job(job).output.dir)
        for path in [*work.shard_files(), *work.series_files(None)]:
            path.unlink()
        again = await _start_worker(job, "w1", env)
        _, stderr = await asyncio.wait_for(again.communicate(), 120)
        said = stderr.decode()
        assert again.returncode == 0, said
        await _fetched_and_listed(said, open_file, bucket, tmp_path, box)
    await _verify(job, env)


async def test_a_dead_workers_open_series_shard_lost_everywhere_stops_the_adopter(
    tmp_path, sandbox, s3_server, redis_server
):
    """A dead worker's series files gone and the parts of its series too: the worker that
    would seal its open series shard stops with an error naming it, rather than skip it."""
    url = _url()
    bucket = _bucket(s3_server, url)
    env = s3_server.env()
    async with sandbox(latency=(0.005, 0.02)) as (base, _):
        job = _coordinated_sources_job(tmp_path, base, url, redis_server.url)
        running = {w: await _start_worker(job, w, env) for w in ("w1", "w2")}
        victim, open_file = await _until_committed_open_series(redis_server)
        running[victim].send_signal(signal.SIGKILL)
        await running[victim].wait()
        assert running[victim].returncode == -signal.SIGKILL, "it had ended already"
        assert _committed_open_series(redis_server, victim) == (victim, open_file)
        for path in Layout(load_job(job).output.dir).owned_files(victim):
            path.unlink()
        series = open_file.split("-")[0]
        await bucket.delete(
            *[k for k, _ in await bucket.list(PARTS) if f"/{series}-{victim}-" in k]
        )
        (other,) = (p for w, p in running.items() if w != victim)
        _, stderr = await asyncio.wait_for(other.communicate(), 120)
    said = stderr.decode()
    assert other.returncode == 2, said
    assert f"{open_file}: a dead worker's open series shard" in said, said
    assert "cannot be sealed" in said


def test_a_retired_workers_stray_parts_are_its_shards_no_commit_opened():
    """``drop_strays``' choice: the worker's own shards, reviews' or a series', unknown to the
    state and numbered past what its commits opened; a series it opened none of, from 1."""
    known = {"reviews-w2-000003.jsonl", "shop_products-w2-000002.jsonl"}
    opened = {"shop_products": 3}

    def stray(file: str) -> bool:
        return is_stray(file, "w2", known, 4, opened)

    assert stray("reviews-w2-000004.jsonl.gz") and stray("shop_products-w2-000003.jsonl")
    assert stray("category_top-w2-000001.jsonl")  # no commit opened any of that series
    assert not stray("reviews-w2-000003.jsonl")  # known
    assert not stray("shop_products-w2-000002.jsonl")  # known
    assert not stray("reviews-w2-000002.jsonl")  # committed, then sealed and listed
    assert not stray("shop_products-w2-000001.jsonl")  # likewise
    assert not stray("reviews-w1-000009.jsonl") and not stray("shop_products-w1-000009.jsonl")
    assert not stray("shop_products-000009.jsonl")  # a one-process job's
