"""Benchmark section: the coordinated mode. What Redis costs a job's throughput with 1, 2 and 4
workers (no rate limit, the reference server), and how well 3 workers share one rate limit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

CRAWLER = [sys.executable, "-m", "crawler"]
KEY = {"KEYAPI_API_KEY": "sk_bench_coordination"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server") or str(Path(sys.executable).with_name("redis-server"))
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
         "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(500):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.02)
    return process, f"redis://127.0.0.1:{port}/0"


def write_job(
    folder: Path, url: str, redis_url: str | None, targets: list[tuple[str, str]], **api: Any
) -> Path:
    """The job file; one process alone (no Redis) when ``redis_url`` is None."""
    doc: dict[str, Any] = {
        "api": {"base_url": url, "concurrency": 16, **api},
        "budget": {"max_credits": 100_000_000},
        "output": {"dir": "out"},
        "targets": [{"product_id": p, "region": r} for p, r in targets],
    }
    if redis_url is not None:
        doc["coordination"] = {"redis_url": redis_url, "job": folder.name}
    job = folder / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    return job


def workers(job: Path, count: int) -> list[subprocess.Popen[bytes]]:
    run = [*CRAWLER, "--log-level", "warning", "run", "--no-progress"]
    return [
        subprocess.Popen(
            [*run, "--worker", f"w{n}", str(job)],
            env={**os.environ, **KEY},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for n in range(count)
    ]


def throughput(url: str, redis_url: str, targets: list[tuple[str, str]], count: int) -> float:
    """Pages/s of ``count`` workers walking the whole job, launch of the first to the last's end."""
    with tempfile.TemporaryDirectory(prefix=f"coord{count}-") as tmp:
        job = write_job(Path(tmp), url, redis_url, targets, requests_per_second=1_000_000)
        started = time.perf_counter()
        running = workers(job, count)
        for process in running:
            _, stderr = process.communicate()
            assert process.returncode == 0, stderr.decode()
        seconds = time.perf_counter() - started
        report = json.loads((Path(tmp) / "out" / "run-report.json").read_text())
    return float(report["totals"]["pages"]) / seconds


def ledger_requests(url: str) -> tuple[int, int]:
    with urllib.request.urlopen(url + "/_sandbox/ledger") as answer:  # noqa: S310 -- loopback
        keys = json.load(answer)["keys"]
    requests = sum(book["requests"] for book in keys.values())
    limited = sum(book["statuses"].get("429", 0) for book in keys.values())
    return requests, limited


def shared_rate(
    redis_url: str | None,
    rate: float,
    *,
    allowed: float | None = None,
    count: int = 3,
    seconds: float = 10.0,
    products: int = 60,
) -> tuple[float, int, int]:
    """``count`` workers of one job asking ``rate``, against a sandbox that allows exactly
    ``allowed`` (default: ``rate``): requests/s over ``seconds``, requests, 429s."""
    allowed = allowed or rate
    sandbox = subprocess.Popen(
        [*CRAWLER, "sandbox", "--port", "0", "--rate", str(allowed), "--burst",
         str(allowed * 0.05 + 2), "--latency-ms", "20-80"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert sandbox.stdout is not None
    url = sandbox.stdout.readline().split()[-1]
    ids = [str(1729679758111249333 + i) for i in range(products)]
    targets = [(p, r) for p in ids for r in ("US", "GB", "DE", "FR")]
    try:
        with tempfile.TemporaryDirectory(prefix="rate-") as tmp:
            job = write_job(Path(tmp), url, redis_url, targets, requests_per_second=rate)
            running = workers(job, count)
            time.sleep(3.0)  # all under way (their logs are not read: few lines)
            first, limited_before = ledger_requests(url)
            started = time.perf_counter()
            time.sleep(seconds)
            last, limited_after = ledger_requests(url)
            seconds = time.perf_counter() - started
            for process in running:
                process.send_signal(signal.SIGINT)
                process.wait()
    finally:
        sandbox.terminate()
        sandbox.wait()
    return (last - first) / seconds, last - first, limited_after - limited_before


async def coordination(rows: list[str], targets: list[tuple[str, str]], url: str) -> None:
    with tempfile.TemporaryDirectory(prefix="redis-") as folder:
        redis, redis_url = start_redis(Path(folder))
        try:
            rows.append("| workers of one job, through Redis | pages/s, all workers together |")
            rows.append("|---|---|")
            for count in (1, 2, 4):
                rows.append(f"| {count} | {throughput(url, redis_url, targets, count):,.0f} |")
            rows.append("")
            rows.append("| configured req/s | 3 workers together, req/s | ratio | 429s |")
            rows.append("|---|---|---|---|")
            for rate in (50.0, 300.0):
                achieved, sent, limited = shared_rate(redis_url, rate)
                rows.append(
                    f"| {rate:g} | {achieved:.1f} | {achieved / rate:.3f} | {limited} of {sent} |"
                )
        finally:
            redis.terminate()
            redis.wait()


async def rate_above(rows: list[str]) -> None:
    """A job asking more than the API allows (50/s of 45): what the slow-down after 429s keeps."""
    rows.append("| asks | API allows | processes | achieved req/s | of allowed | 429s |")
    rows.append("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="redis-") as folder:
        redis, redis_url = start_redis(Path(folder))
        try:
            for count, through in ((1, None), (3, redis_url)):
                achieved, sent, limited = shared_rate(
                    through, 50.0, allowed=45.0, count=count, seconds=120.0, products=300
                )
                who = "1, alone" if through is None else f"{count}, through Redis"
                rows.append(
                    f"| 50 | 45 | {who} | {achieved:.1f} | {achieved / 45:.3f} | "
                    f"{limited} of {sent} ({limited / sent:.2%}) |"
                )
        finally:
            redis.terminate()
            redis.wait()
