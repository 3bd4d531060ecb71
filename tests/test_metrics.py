"""Verdicts against a sandbox whose feeds end below their counts, and Prometheus metrics scraped
over HTTP during a real run, which at its end agree with the run report."""

from __future__ import annotations

import asyncio
import csv
import io
import re
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from crawler import load_job
from crawler.errors import ConfigError
from crawler.report import STATUSES
from crawler.runner import run_job
from crawler.sandbox import Sandbox
from crawler.state.verdict import tolerance
from tests.conftest import (
    ENV,
    PRODUCTS,
    RedisServer,
    free_port,
    run_crawler,
    target_rows,
    write_job,
)

ROOT = Path(__file__).resolve().parent.parent
FEED_CAP = 50
P0, P1, P2, P3 = PRODUCTS[:4]
# (product, region, max_pages): counts 13, 119 (sharing reviews with P0 US), 28, 120, 0, 58, 55
TARGETS = [
    (P0, "US", None), (P0, "DE", None), (P1, "US", None), (P1, "FR", 2), (P2, "GB", None),
    (P3, "US", None), (P2, "IT", None),
]  # fmt: skip


def _targets() -> list[dict[str, Any]]:
    return [
        {"product_id": p, "region": r, **({"max_pages": cap} if cap else {})}
        for p, r, cap in TARGETS
    ]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and labels (prometheus_client's own parser)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def total(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str):
    return sum(
        value
        for (sample, keys), value in found.items()
        if sample == name and all((k, v) in keys for k, v in labels.items())
    )


def truth(box: Sandbox) -> dict[tuple[str, str], tuple[str, int]]:
    """What the sandbox knows of each target: its verdict, and the reviews it lacks."""
    out = {}
    for product_id, region, cap in TARGETS:
        count = box.catalogue.review_count(product_id, region)
        shown = len(box.catalogue.ids(product_id, region))
        if cap is not None and -(-shown // 10) > cap:
            out[(product_id, region)] = ("capped", 0)
        elif shown >= count - tolerance(count):
            out[(product_id, region)] = ("complete", 0)
        else:
            out[(product_id, region)] = ("short", count - shown)
    return out


async def _scrape_until(url: str, done: asyncio.Event) -> list[str]:
    scrapes: list[str] = []
    async with aiohttp.ClientSession() as session:
        while not done.is_set():
            try:
                async with session.get(url) as response:
                    assert response.status == 200
                    assert response.headers["Content-Type"].startswith("text/plain")
                    scrapes.append(await response.text())
            except aiohttp.ClientConnectionError:
                pass  # not listening yet, or no longer
            await asyncio.sleep(0.05)
    return scrapes


async def test_verdicts_match_the_feeds_and_metrics_scraped_during_the_run_match_its_report(
    sandbox, tmp_path: Path
):
    port = free_port()
    # 429s after the 10th request for a moment: an episode, and rate-limited requests
    options = {"feed_cap": FEED_CAP, "latency": (0.01, 0.03), "throttle_after": 10,
               "throttle_seconds": 0.3}  # fmt: skip
    async with sandbox(**options) as (url, box):
        job = load_job(
            write_job(tmp_path, url, _targets(), api={"concurrency": 4},
                      metrics={"port": port})
        )  # fmt: skip
        registry = CollectorRegistry()
        done = asyncio.Event()
        scraping = asyncio.create_task(_scrape_until(f"http://127.0.0.1:{port}/metrics", done))
        try:
            result = await run_job(job, environ=ENV, metrics_registry=registry)
        finally:
            done.set()
            scrapes = await scraping
        expected = truth(box)
    assert result.exit_status == 0
    rows = {(r["product_id"], r["region"]): r for r in target_rows(tmp_path / "out")}
    assert {k: (r["verdict"], r["missing"]) for k, r in rows.items()} == expected
    assert {v for v, _ in expected.values()} == {"complete", "short", "capped"}
    doc = orjson.loads((tmp_path / "out" / "run-report.json").read_bytes())
    verdicts = doc["targets_by_verdict"]
    assert verdicts["short"] == sum(v == "short" for v, _ in expected.values())
    assert doc["totals"]["reviews_missing"] == sum(m for _, m in expected.values())
    said = sum(box.catalogue.review_count(p, r) for p, r, _ in TARGETS)
    written = doc["totals"]["reviews"]
    assert doc["totals"]["reviews_said"] == said
    assert doc["totals"]["coverage"] == round(written / said, 4)

    # scraped over HTTP while the run went on: the run's own figures, growing
    during = [samples(text) for text in scrapes if "crawler_pages_total" in text]
    assert during, "no scrape saw the run"
    pages_seen = [total(s, "crawler_pages_total") for s in during]
    assert pages_seen == sorted(pages_seen)
    assert any(0 < p < doc["totals"]["pages"] for p in pages_seen)  # mid-run, not only the end

    # at the end the counters are the report's
    final = samples(generate_latest(registry).decode())
    run = doc["run"]
    assert total(final, "crawler_requests_total") == run["requests"]
    assert total(final, "crawler_requests_total", outcome="rate_limited") == run["rate_limited"]
    assert run["rate_limited"] > 0
    assert total(final, "crawler_requests_total", outcome="ok") == doc["totals"]["pages"]
    assert total(final, "crawler_request_duration_seconds_count") == run["requests"]
    assert total(final, "crawler_rate_limit_episodes_total") == run["rate_limit_episodes"] >= 1
    assert total(final, "crawler_pages_total") == doc["totals"]["pages"]
    assert total(final, "crawler_reviews_written_total") == written
    assert total(final, "crawler_duplicates_total") == doc["totals"]["duplicates"]
    assert total(final, "crawler_job_credits_spent") == doc["totals"]["credits_charged"]
    assert total(final, "crawler_job_credits_ceiling") == doc["totals"]["max_credits"]
    for verdict, count in verdicts.items():
        assert total(final, "crawler_job_targets_finished", verdict=verdict) == count
    assert total(final, "crawler_job_targets", status="done") == len(TARGETS)
    assert total(final, "crawler_job_coverage_ratio") == doc["totals"]["coverage"]
    assert total(final, "crawler_writer_queue_capacity_pages") > 0
    assert not [name for name, labels in final if ("product_id", P0) in labels]


async def test_targets_by_status_have_the_names_status_and_the_report_give(sandbox, tmp_path: Path):
    """A run the budget stops, walks cut short and targets never begun: the metric's statuses
    are the report's (in_progress, not_started, stopped_budget), each one there, 0 or not, so
    an alert on targets left finds its series."""
    targets = [{"product_id": p, "regions": ["US", "GB", "DE"]} for p in PRODUCTS[:4]]
    async with sandbox() as (url, _):
        job = load_job(
            write_job(tmp_path, url, targets, api={"concurrency": 2}, budget={"max_credits": 30})
        )
        registry = CollectorRegistry()
        result = await run_job(job, environ=ENV, metrics_registry=registry)
    assert result.exit_status == 3
    final = samples(generate_latest(registry).decode())
    shown = {
        dict(labels)["status"]: value
        for (name, labels), value in final.items()
        if name == "crawler_job_targets"
    }
    by_status = result.report["targets_by_status"]
    assert by_status["not_started"] > 0 and by_status["stopped_budget"] > 0
    assert shown == {s: by_status.get(s, 0) for s in STATUSES}
    # the README's queries and alerts name series this run served, and statuses there are
    readme = (ROOT / "README.md").read_text().split("## Metrics for Prometheus", 1)[1]
    readme = readme.split("\n## ", 1)[0]
    queries = "".join(re.findall(r"```(?:promql|yaml)\n(.*?)```", readme, flags=re.DOTALL))
    assert {"crawler_pages_total", "crawler_job_targets"} <= set(
        re.findall(r"crawler_\w+", queries)
    )
    assert set(re.findall(r"crawler_\w+", queries)) <= {name for name, _ in final}
    named = re.findall(r'status=~?"([^"]+)"', queries)
    assert named and all(set(n.split("|")) <= set(STATUSES) for n in named)


async def test_a_coordinated_worker_labels_its_metrics_with_its_name(
    sandbox, tmp_path: Path, redis_server: RedisServer
):
    async with sandbox(feed_cap=FEED_CAP) as (url, _):
        job = load_job(write_job(tmp_path, url, _targets()[:3])).coordinated(redis_server.url)
        registry = CollectorRegistry()
        result = await run_job(job, environ=ENV, worker="w1", metrics_registry=registry)
    assert result.exit_status == 0
    final = samples(generate_latest(registry).decode())
    names = {name for name, _ in final}
    assert {"crawler_requests_total", "crawler_pages_total", "crawler_job_targets"} <= names
    assert all(("worker", "w1") in labels for _, labels in final if _ != "python_info")
    assert total(final, "crawler_requests_total", worker="w1") == result.report["run"]["requests"]
    assert total(final, "crawler_job_targets_finished", worker="w1", verdict="short") == 1


def test_metrics_settings_from_the_command_line_and_the_job_file(tmp_path: Path):
    job = load_job(write_job(tmp_path, "sandbox", _targets()[:1], metrics={"port": 9101}))
    assert job.metrics is not None and (job.metrics.host, job.metrics.port) == ("127.0.0.1", 9101)
    widened = job.with_metrics(None, "0.0.0.0")  # noqa: S104 -- what --metrics-host is for
    assert widened.metrics is not None and widened.metrics.port == 9101
    plain = load_job(write_job(tmp_path, "sandbox", _targets()[:1]))
    assert plain.with_metrics(None, None).metrics is None
    with pytest.raises(ConfigError, match="--metrics-host: give --metrics-port"):
        plain.with_metrics(None, "0.0.0.0")  # noqa: S104
    with pytest.raises(ConfigError, match="--metrics-port"):
        plain.with_metrics(70000, None)
    with pytest.raises(ConfigError, match=r"job.yaml:\d+: metrics.port"):
        load_job(write_job(tmp_path, "sandbox", _targets()[:1], metrics={"port": -1}))


async def test_status_table_json_and_csv_show_verdicts_coverage_and_credits_per_review(
    tmp_path: Path,
):
    """The demo's sandbox ends every feed at 600 reviews: a target said to have 630 comes back
    short by 30, one under max_pages is capped, a small one complete."""
    targets: list[dict[str, Any]] = [
        {"product_id": "1729679758111249337", "region": "MX"},  # 630 said
        {"product_id": P0, "region": "US", "max_pages": 1},  # 13 said, 10 a page
        {"product_id": P0, "region": "DE"},
    ]
    job = write_job(tmp_path, "sandbox", targets)
    status, _, stderr = await run_crawler("run", "--no-progress", str(job))
    assert status == 0, stderr.decode()
    report = orjson.loads((tmp_path / "out" / "run-report.json").read_bytes())
    totals = report["totals"]
    assert report["targets_by_verdict"] == {"complete": 1, "short": 1, "capped": 1, "unknown": 0}
    assert totals["reviews_missing"] == 30 and 0 < totals["coverage"] < 1
    assert totals["credits_per_review"] == round(totals["credits_charged"] / totals["reviews"], 3)

    status, shown, _ = await run_crawler("status", "--json", str(job))
    doc = orjson.loads(shown)
    assert doc["targets_by_verdict"] == report["targets_by_verdict"]
    for figure in ("reviews_said", "reviews_missing", "coverage", "credits_per_review"):
        assert doc["totals"][figure] == totals[figure]
    status, table_csv, _ = await run_crawler("status", "--csv", str(job))
    rows = {r["region"]: r for r in csv.DictReader(io.StringIO(table_csv.decode()))}
    assert {region: (r["verdict"], r["missing"]) for region, r in rows.items()} == {
        "MX": ("short", "30"),
        "US": ("capped", "0"),
        "DE": ("complete", "0"),
    }
    status, table, _ = await run_crawler("status", str(job))
    said = " ".join(table.decode().split())
    assert "verdicts 1 complete, 1 short, 1 capped" in said
    assert f"coverage {totals['coverage']:.1%}" in said and "(30 missing)" in said
    assert f"{totals['credits_per_review']:.2f} credits/review" in said
    assert "done (short 30)" in said
