"""`crawler export`: the three tables, compared row by row with the shards, read with DuckDB;
exactly once under SIGKILL and across a refresh; missing and mistyped fields; refusals."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from crawler import load_job, run_job
from crawler.config import Job
from crawler.export.exporter import ExportOptions, export_job
from crawler.output.shards import read_lines
from crawler.sandbox import SandboxOptions, serve
from tests.conftest import ENV, PRODUCTS, SandboxFactory, crawler_command, subprocess_env, write_job

ROOT = Path(__file__).resolve().parent.parent
# ~1,050 reviews in 6 gzip shards, several members each; one product shown in two regions
TARGETS = [
    {"product_id": PRODUCTS[0], "region": "US"},
    {"product_id": PRODUCTS[0], "region": "GB"},
    {"product_id": PRODUCTS[7], "region": "DE"},
]
OUTPUT = {"shard_max_records": 200, "compression": "gzip"}


@pytest.fixture(scope="module")
def harvested(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Job]:
    """One real harvest from the sandbox, shared by the tests that only read its shards."""
    folder = tmp_path_factory.mktemp("harvest")

    async def harvest() -> Job:
        async with serve(SandboxOptions()) as (url, _):
            job = load_job(write_job(folder, url, TARGETS, output=OUTPUT))
            assert (await run_job(job, environ=ENV)).exit_status == 0
        return job

    yield asyncio.run(harvest())


def records(job: Job) -> list[tuple[str, dict[str, Any]]]:
    """(shard file name, record) for every line of every sealed shard."""
    manifest = orjson.loads((job.output.dir / "manifest.json").read_bytes())
    return [
        (entry["file"].rsplit("/", 1)[1], orjson.loads(line))
        for entry in manifest["shards"]
        for line in read_lines(job.output.dir / entry["file"])
    ]


def table(folder: Path, name: str, kind: str = "parquet") -> list[dict[str, Any]]:
    reader = "read_parquet" if kind == "parquet" else "read_csv"
    return rows(f"select * from {reader}('{folder}/{name}/*.{kind}')")


def sql(query: str) -> duckdb.DuckDBPyRelation:
    relation = duckdb.sql(query)
    assert relation is not None
    return relation


def rows(query: str) -> list[dict[str, Any]]:
    """A query's rows through Arrow: DuckDB's own fetch of time zones needs pytz."""
    found: list[dict[str, Any]] = sql(query).to_arrow_table().to_pylist()
    return found


def export(job: Job, *args: str) -> tuple[int, dict[str, Any], str]:
    done = subprocess.run(
        crawler_command("export", str(job.path), "--json", *args),
        env=subprocess_env(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    summary = orjson.loads(done.stdout) if done.stdout else {}
    return done.returncode, summary, done.stderr.decode()


def millis(value: str) -> datetime:
    return datetime.fromtimestamp(int(value) / 1000, tz=UTC)


def test_tables_match_the_shards_row_by_row(harvested: Job, tmp_path: Path):
    job, to = harvested, tmp_path / "tables"
    status, summary, said = export(job, "--to", str(to))
    assert status == 0, said
    lines = records(job)
    assert summary["shards"] == {"exported": 6, "already_exported": 0, "open": 0, "failed": 0}
    assert summary["rows"]["reviews"] == len(lines) > 1000
    assert summary["nulls"] == {} and summary["wrong_type"] == {}
    assert "6 shards exported (parquet)" in " ".join(said.split())
    # what a person reads fits 80 columns (off a terminal), but for a word alone too long
    too_wide = [s for s in said.splitlines() if len(s) > 80 and max(map(len, s.split())) <= 76]
    assert too_wide == []

    reviews = {row["review_id"]: row for row in table(to, "reviews")}
    assert len(reviews) == len(lines)  # every review once
    for shard, record in lines:
        item, review = record["item"], record["item"]["review"]
        assert reviews[record["review_id"]] == {
            "product_id": record["product_id"],
            "region": record["region"],
            "review_id": record["review_id"],
            "rating": review["rating"],
            "text": review["display_text"],
            "title": review["main_review_title"],
            "review_time": millis(review["review_timestamp"]),
            "sku_id": item["sku_id"],
            "sku_specification": item["sku_specification"],
            "likes": item["digg_count"],
            "is_anonymous": item["is_anonymous"],
            "review_source_name": item["review_source_name"],
            "country": review["review_country"],
            "image_count": len(review["images"]),
            "has_media": True,
            "is_updated": item["is_updated"],
            "harvested_at": datetime.fromisoformat(record["fetched_at"]),
            "shard": shard,
        }
    described = sql(f"describe select * from '{to}/reviews/*.parquet'").fetchall()
    types = {row[0]: row[1] for row in described}
    assert types["review_id"] == types["product_id"] == types["sku_id"] == "VARCHAR"
    assert (types["rating"], types["likes"]) == ("INTEGER", "BIGINT")
    assert types["review_time"] == types["harvested_at"] == "TIMESTAMP WITH TIME ZONE"

    media = table(to, "review_media")
    expected = [
        (r["review_id"], i, m["image"]["url_list"][0], m["image"]["width"])
        for _, r in lines
        for i, m in enumerate(r["item"]["review"]["media"])
    ]
    assert sorted((m["review_id"], m["position"], m["url"], m["width"]) for m in media) == sorted(
        expected
    )
    assert {m["kind"] for m in media} == {"image"}

    snapshots = table(to, "product_snapshots")
    firsts = [r for _, r in lines if "product" in r]
    assert len(snapshots) == len(firsts) == len(TARGETS)
    assert {
        (s["product_id"], s["region"], s["review_count"], s["product_rating"]) for s in snapshots
    } == {(r["product_id"], r["region"], r["product"]["review_count"], 4.9) for r in firsts}

    # a second export finds nothing new to do
    status, again, _ = export(job, "--to", str(to))
    assert status == 0 and again["shards"]["exported"] == 0
    assert again["shards"]["already_exported"] == 6


def test_readme_queries_run_on_a_real_export(harvested: Job, tmp_path: Path):
    to = tmp_path / "export"
    export_job(harvested, ExportOptions(to=str(to)))
    readme = (ROOT / "README.md").read_text().split("<!-- the queries below run in", 1)[1]
    queries = re.findall(r"```sql\n(.*?)```", readme, flags=re.DOTALL)[:3]
    assert len(queries) == 3
    by_month, worst, mentions = [rows(q.replace("out/demo/export", str(to))) for q in queries]
    product_reviews = [r for _, r in records(harvested) if r["product_id"] == PRODUCTS[0]]
    assert sum(row["reviews"] for row in by_month) == len(product_reviews)
    assert len(by_month) > 3 and all(1 <= row["stars"] <= 5 for row in by_month)
    assert worst[0]["reviews"] == len(records(harvested))  # the sandbox's reviews: one SKU
    assert len(mentions) == 20 and all("great" in row["text"] for row in mentions)


def test_csv_and_reviewer_fields_only_when_asked(harvested: Job, tmp_path: Path):
    to = tmp_path / "csv"
    summary = export_job(harvested, ExportOptions("csv", str(to), reviewer=True))
    rows = table(to, "reviews", "csv")
    assert len(rows) == summary.rows["reviews"] == len(records(harvested))
    assert {r["reviewer_name"] for r in rows} == {"BondiBleu"}
    assert {str(r["reviewer_user_id"]) for r in rows} == {"7372302399707399211"}
    default = tmp_path / "default"
    export_job(harvested, ExportOptions(to=str(default)))
    columns = sql(f"select * from '{default}/reviews/*.parquet' limit 1").columns
    assert not [c for c in columns if c.startswith("reviewer")]


def test_a_sigkilled_export_leaves_no_partial_file_and_resumes(harvested: Job, tmp_path: Path):
    to = tmp_path / "killed"
    ledger = to / "_exported.json"
    process = subprocess.Popen(
        crawler_command("export", str(harvested.path), "--to", str(to)),
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    done: dict[str, Any] = {}
    while not done and time.monotonic() < deadline:  # the first shard counted: kill it there
        if ledger.exists():
            done = orjson.loads(ledger.read_bytes())["shards"]
        else:
            time.sleep(0.001)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = orjson.loads(ledger.read_bytes())["shards"]
    assert 1 <= len(done) < 6, "the kill came after the export's end: nothing was tested"
    # whatever a reader sees is whole: every visible file reads, with its shard's every review
    shard_records = {e["file"]: e["records"] for e in orjson.loads(
        (harvested.output.dir / "manifest.json").read_bytes())["shards"]}  # fmt: skip
    visible = sorted((to / "reviews").glob("*.parquet"))
    for path in visible:
        shard = "shards/" + path.name.replace(".parquet", ".jsonl.gz")
        count = sql(f"select count(*) from '{path}'").fetchall()
        assert count == [(shard_records[shard],)]
    assert len(visible) >= len(done)
    staged = sorted(str(p.relative_to(to)) for p in to.glob("*/.*.tmp"))  # hidden, unfinished
    before = {p.name: p.stat().st_mtime_ns for p in (to / "reviews").glob("*.parquet")
              if "shards/" + p.name.replace(".parquet", ".jsonl.gz") in done}  # fmt: skip

    status, summary, said = export(harvested, "--to", str(to))
    assert status == 0, said
    assert summary["shards"]["exported"] == 6 - len(done)
    assert summary["shards"]["already_exported"] == len(done)
    assert sorted(summary["leftovers_removed"]) == staged
    assert not list(to.glob("*/.*.tmp"))
    for name, mtime in before.items():  # shards already exported are never written again
        assert (to / "reviews" / name).stat().st_mtime_ns == mtime
    ids = [row["review_id"] for row in table(to, "reviews")]
    assert sorted(ids) == sorted(r["review_id"] for _, r in records(harvested))


async def test_a_refresh_exports_its_new_shards_as_new_files(
    tmp_path: Path, sandbox: SandboxFactory
):
    # the first two grow at the sandbox's next generation, the third does not
    targets = [{"product_id": PRODUCTS[i], "region": "US"} for i in (1, 2, 3)]
    async with sandbox() as (url, box):
        job = load_job(write_job(tmp_path, url, targets, output={"shard_max_records": 100}))
        assert (await run_job(job, environ=ENV)).exit_status == 0
        to = tmp_path / "export"
        first = export_job(job, ExportOptions(to=str(to)))
        kept = {p: p.stat().st_mtime_ns for p in to.rglob("*.parquet")}
        box.grow()
        assert (await run_job(job, refresh=True, environ=ENV)).exit_status == 0
    second = export_job(job, ExportOptions(to=str(to)))
    lines = records(job)
    assert second.already == first.exported and second.exported >= 1
    assert second.rows["reviews"] == len(lines) - first.rows["reviews"] > 0
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    ids = [row["review_id"] for row in table(to, "reviews")]
    assert len(ids) == len(set(ids)) == len(lines)
    # the refresh's walks each gave a snapshot where their first page wrote a review
    snapshots = table(to, "product_snapshots")
    assert len(snapshots) == sum(1 for _, r in lines if "product" in r) > len(targets)


def sealed_job(tmp_path: Path, lines: list[bytes]) -> Job:
    """A job folder made by hand: one sealed shard of these lines, listed in the manifest."""
    job = load_job(write_job(tmp_path, "http://127.0.0.1:9", TARGETS[:1]))
    shards = job.output.dir / "shards"
    shards.mkdir(parents=True)
    data = b"".join(line + b"\n" for line in lines)
    (shards / "reviews-000001.jsonl").write_bytes(data)
    entry = {"file": "shards/reviews-000001.jsonl", "records": len(lines), "bytes": len(data),
             "sha256": hashlib.sha256(data).hexdigest()}  # fmt: skip
    manifest = {"version": 2, "records": len(lines), "shards": [entry], "open_shards": []}
    (job.output.dir / "manifest.json").write_bytes(orjson.dumps(manifest))
    return job


def test_missing_and_mistyped_fields_are_nulls_and_counted(tmp_path: Path):
    review = {"rating": 4, "display_text": "ok", "review_timestamp": "1766177180886",
              "images": [], "media": []}  # fmt: skip
    good = {"review_id": "1", "product_id": "2", "region": "US",
            "fetched_at": "2026-01-02T03:04:05.678Z",
            "item": {"review": review, "sku_id": 55, "digg_count": 1}}  # fmt: skip
    mistyped = orjson.loads(orjson.dumps(good))
    mistyped["review_id"] = "3"
    mistyped["item"]["review"].update(rating="5", review_timestamp="soon", unknown={"x": [1]})
    mistyped["item"]["review"].update(images=[{"a": 1}, 2], display_text=None)
    mistyped["item"]["review"]["display_review_text"] = [{"plain_text": "in parts"}]
    mistyped["item"]["digg_count"] = 2**63 + 5  # no int64 holds it
    mistyped["item"]["review"]["media"] = [
        "not an object",
        {"media_type": 9, "image": {"width": "1"}},
    ]
    mistyped["product"] = {"review_count": "many", "product_rating": 4.5}
    bare = {"review_id": "4"}
    lines = [orjson.dumps(good), orjson.dumps(mistyped), orjson.dumps(bare), b"[1, 2]"]
    job = sealed_job(tmp_path, lines)
    summary = export_job(job, ExportOptions())
    assert summary.ok
    doc = summary.as_dict()
    assert doc["wrong_type"] == {
        "item.review.rating": 1,
        "item.review.review_timestamp": 1,
        "item.review.media": 1,
        "item.review.media.image.width": 1,
        "product.review_count": 1,
        "reviews.likes": 1,
    }
    assert doc["unreadable_lines"] == 1
    assert doc["nulls"]["reviews.rating"] == 2  # the mistyped one and the bare one
    rows = {r["review_id"]: r for r in table(job.output.dir / "export", "reviews")}
    assert set(rows) == {"1", "3", "4"}
    assert rows["1"]["sku_id"] == "55"  # an id sent as a number is still a string
    assert rows["1"]["review_time"] == millis("1766177180886")
    assert rows["1"]["harvested_at"] == datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert rows["3"]["rating"] is rows["3"]["review_time"] is rows["3"]["likes"] is None
    assert (rows["3"]["image_count"], rows["3"]["text"]) == (2, "in parts")
    assert rows["4"]["text"] is None and rows["4"]["product_id"] is None
    media = table(job.output.dir / "export", "review_media")
    assert [(m["review_id"], m["position"], m["kind"], m["width"]) for m in media] == [
        ("3", 1, None, None)
    ]
    snapshot = table(job.output.dir / "export", "product_snapshots")
    assert [(s["review_count"], s["product_rating"]) for s in snapshot] == [(None, 4.5)]


def test_refusals_and_a_changed_shard(tmp_path: Path):
    job = sealed_job(tmp_path, [orjson.dumps({"review_id": "1", "item": {}})])
    status, _, said = export(job, "--to", "gs://bucket/reviews")  # s3:// is: tests/test_bucket.py
    assert status == 2 and "gs:// is not supported yet" in said
    assert export(job)[0] == 0
    status, _, said = export(job, "--format", "csv")
    assert status == 2 and "--format parquet" in said and "Traceback" not in said
    shard = job.output.dir / "shards" / "reviews-000001.jsonl"
    shard.write_bytes(shard.read_bytes().replace(b'"1"', b'"7"'))
    status, summary, said = export(job, "--to", str(tmp_path / "other"))
    assert status == 1 and summary["shards"]["failed"] == 1
    assert "sha256" in said and not list((tmp_path / "other").rglob("*.parquet"))
    # a shard of the same name sealed anew (the job started over): its old export is not its
    manifest = orjson.loads((job.output.dir / "manifest.json").read_bytes())
    manifest["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (job.output.dir / "manifest.json").write_bytes(orjson.dumps(manifest))
    status, _, said = export(job)
    assert status == 2 and "started over (--fresh)" in said


def test_a_video_is_a_media_row_of_its_kind(tmp_path: Path):
    """The contract's sample has only images: a video (media_type 2) takes its own picture's
    fields, in its position among the review's media."""
    video = {"url_list": ["https://v.example/1.mp4", "https://v.example/2.mp4"],
             "width": 720, "height": 1280}  # fmt: skip
    image = {"url_list": ["https://i.example/1.webp"], "width": 1200, "height": 1200}
    media = [{"media_type": 1, "image": image}, {"media_type": 2, "video": video, "image": image}]
    record = {"review_id": "9", "product_id": "2", "region": "US",
              "item": {"review": {"rating": 5, "media": media}}}  # fmt: skip
    job = sealed_job(tmp_path, [orjson.dumps(record)])
    export_job(job, ExportOptions())
    rows = table(job.output.dir / "export", "review_media")
    assert [(m["position"], m["kind"], m["url"], m["width"], m["height"]) for m in rows] == [
        (0, "image", "https://i.example/1.webp", 1200, 1200),
        (1, "video", "https://v.example/1.mp4", 720, 1280),
    ]
    (review,) = table(job.output.dir / "export", "reviews")
    assert review["has_media"] is True
