"""The benchmark: crawler vs a bare aiohttp loop, rate fidelity, seen-set memory, resume cost.

Run with `make bench`; prints a table and writes docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

import aiohttp
import loop  # bench/loop.py: the hand-written loop, also run as a program of its own
import orjson
import yaml
from bucket import bucket_speed  # bench/bucket.py (the script's folder is on the path)
from coordination import (
    coordination,
    rate_above,
)  # bench/coordination.py: the script's folder is on the path
from export import export_speed  # bench/export.py, likewise
from targets import targets_at_scale  # bench/targets.py, likewise

from crawler import load_job, logs, run_job
from crawler.output.dedup import SeenLog
from crawler.sandbox import Catalogue

ROOT = Path(__file__).resolve().parent.parent
PRODUCTS = [str(1729679758111249333 + i) for i in range(60)]
REGIONS = ["US", "GB", "DE", "FR"]
CONCURRENCY = 16
RATES = (5, 50, 500)
ROUNDS = 3
ENV = {"KEYAPI_API_KEY": "sk_bench_key"}
NOTES = "<!-- notes: written by hand, kept when the figures above are measured again -->\n"


def targets() -> list[tuple[str, str]]:
    return [(p, r) for p in PRODUCTS for r in REGIONS]


async def bare_loop(base_url: str, sink: Path | None = None) -> tuple[float, int, int]:
    """The practical ceiling: aiohttp + orjson walking the same cursors, nothing else; with
    ``sink``, the loop a user would write by hand (``bench/loop.py``: it dedups and writes)."""
    return await loop.bare_loop(base_url, targets(), ENV["KEYAPI_API_KEY"], sink)


async def crawler_run(
    base_url: str, folder: Path, commit_every: int, compression: str = "none"
) -> tuple[float, int, int]:
    job = folder / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "api": {
                    "base_url": base_url,
                    "requests_per_second": 1_000_000,
                    "concurrency": CONCURRENCY,
                },
                "budget": {"max_credits": 10_000_000},
                "output": {
                    "dir": "out",
                    "commit_every_pages": commit_every,
                    "compression": compression,
                },
                "targets": [{"product_id": p, "region": r} for p, r in targets()],
            }
        )
    )
    started = time.perf_counter()
    result = await run_job(load_job(job), environ=ENV)
    seconds = time.perf_counter() - started
    totals = result.report["totals"]
    return seconds, totals["pages"], totals["received"]


def start_server(argv: list[str], ready: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith(ready), line
    return process


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Walk:
    """One walk's figures; CPU seconds of the client process, its event-loop thread, the server."""

    seconds: float
    pages: int
    reviews: int
    client_cpu: float
    loop_cpu: float | None  # None: the client ran in a process of its own
    server_cpu: float


def own_cpu() -> tuple[float, float]:
    """CPU seconds of this process and of its children that have ended."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


async def measured(server_pid: int, walk: Awaitable[tuple[float, int, int]]) -> Walk:
    (own0, children0), loop0 = own_cpu(), time.thread_time()
    server0 = cpu_seconds(server_pid)
    seconds, pages, reviews = await walk
    (own1, children1), loop1 = own_cpu(), time.thread_time()
    if children1 > children0:  # the walk ran in a child process
        return Walk(
            seconds, pages, reviews, children1 - children0, None, cpu_seconds(server_pid) - server0
        )
    return Walk(
        seconds, pages, reviews, own1 - own0, loop1 - loop0, cpu_seconds(server_pid) - server0
    )


SCRAPY = f"Scrapy {version('scrapy')}, same walk, JSON lines feed" if find_spec("scrapy") else None
LOOP = "bare aiohttp + orjson loop"
LOOP_WRITING = "bare loop that dedups and writes each review as a JSON line"
CRAWLER = "crawler run, state saved every page"
# name -> the walk, given the server's url and a scratch folder
WALKS: dict[str, Callable[[str, Path], Awaitable[tuple[float, int, int]]]] = {
    LOOP: lambda url, tmp: bare_loop(url),
    LOOP_WRITING: lambda url, tmp: bare_loop(url, tmp / "reviews.jsonl"),
    CRAWLER: lambda url, tmp: crawler_run(url, tmp, 1),
    "crawler run, state saved every 100 pages": lambda url, tmp: crawler_run(url, tmp, 100),
    "crawler run, zstd shards, state saved every page": lambda url, tmp: crawler_run(
        url, tmp, 1, "zstd"
    ),
}
if SCRAPY:  # installed by `make bench` (the bench extra)
    WALKS[SCRAPY] = lambda url, tmp: scrapy_walk(url, tmp / "reviews.jsonl")


async def scrapy_walk(url: str, out: Path) -> tuple[float, int, int]:
    """Scrapy in a process of its own (it runs its own reactor); it times the walk itself."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "bench" / "scrapy_walk.py"),
        url,
        str(out),
        ",".join(PRODUCTS),
        ",".join(REGIONS),
        str(CONCURRENCY),
        ENV["KEYAPI_API_KEY"],
        stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await process.communicate()
    figures = orjson.loads(stdout.splitlines()[-1])
    return figures["seconds"], figures["pages"], figures["reviews"]


async def throughput(rows: list[str]) -> None:
    """Every walk once per round, rounds interleaved so a slow spell of the VM hits all of them;
    each walk's median round is reported."""
    port = 18931
    server = start_server(
        [
            sys.executable,
            str(ROOT / "bench" / "server.py"),
            str(port),
            ",".join(PRODUCTS),
            ",".join(REGIONS),
        ],
        "ready",
    )
    url = f"http://127.0.0.1:{port}"
    reviews = sum(Catalogue().review_count(p, r) for p, r in targets())
    rows.append(
        f"Walk: {len(targets())} targets, {reviews:,} reviews, concurrency {CONCURRENCY}, "
        "server pre-rendered in a second process."
    )
    rows.append("")
    runs: dict[str, list[Walk]] = {name: [] for name in WALKS}
    try:
        await bare_loop(url)  # warm-up: connections, caches
        for _ in range(ROUNDS):
            for name, walk in WALKS.items():
                with tempfile.TemporaryDirectory() as tmp:
                    runs[name].append(await measured(server.pid, walk(url, Path(tmp))))
    finally:
        server.terminate()
    median = {name: sorted(w, key=lambda w: w.seconds)[len(w) // 2] for name, w in runs.items()}
    loop, writing = median[LOOP], median[LOOP_WRITING]

    def speed(w: Walk) -> float:
        return w.pages / w.seconds

    rows.append(
        "| walk | pages | pages/s | vs the loop that dedups and writes | vs the bare loop "
        "| event-loop thread CPU µs/page | client CPU s | server CPU s |"
    )
    rows.append("|---|---|---|---|---|---|---|---|")
    for name in WALKS:
        w = median[name]
        per_page = "-" if w.loop_cpu is None else f"{w.loop_cpu / w.pages * 1e6:.0f}"
        rows.append(
            f"| {name} | {w.pages} | {speed(w):,.0f} | {speed(w) / speed(writing):.2f} "
            f"| {speed(w) / speed(loop):.2f} | {per_page} | {w.client_cpu:.2f} "
            f"| {w.server_cpu:.2f} |"
        )
    ratios = [speed(w) / speed(b) for w, b in zip(runs[CRAWLER], runs[LOOP_WRITING], strict=True)]
    capacity = loop.pages / loop.server_cpu
    rows.append("")
    rows.append(
        f"Median of {ROUNDS} interleaved rounds; `{CRAWLER}` over the loop that dedups and "
        f"writes, round by round: {', '.join(f'{r:.2f}' for r in ratios)}. "
        f"The reference server spent {loop.server_cpu / loop.pages * 1e6:.0f} µs of CPU per page "
        f"during the bare loop: alone on a core it answers about {capacity:,.0f} pages/s, "
        f"{capacity / speed(loop):.1f} times what the bare loop asked of it."
    )


SHORT_PAGES = 5_000
SHORT_ROUNDS = 5


def short_targets() -> tuple[list[str], list[str], int]:
    """Products (with every region) adding up to about ``SHORT_PAGES`` pages; their pages."""
    catalogue, products, pages = Catalogue(), [], 0
    for product_id in PRODUCTS:
        if pages >= SHORT_PAGES:
            break
        products.append(product_id)
        pages += sum(-(-catalogue.review_count(product_id, r) // 10) or 1 for r in REGIONS)
    return products, REGIONS, pages


def _timed(argv: list[str], cwd: Path) -> float:
    """Seconds from launch to exit of a whole process (Python start-up and imports included)."""
    started = time.perf_counter()
    subprocess.run(
        argv, cwd=cwd, env={**os.environ, **ENV}, check=True, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return time.perf_counter() - started


async def short_job(rows: list[str]) -> None:
    """A short job as a person runs it: `crawler run job.yaml` against `python loop.py`, each a
    whole process, alternated, ``SHORT_ROUNDS`` runs each; the medians."""
    products, regions, pages = short_targets()
    port = 18935
    server = start_server(
        [sys.executable, str(ROOT / "bench" / "server.py"), str(port), ",".join(products),
         ",".join(regions)],
        "ready",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    times: dict[str, list[float]] = {"loop": [], "crawler": []}
    try:
        pairs = [(p, r) for p in products for r in regions]
        await loop.bare_loop(url, pairs, ENV["KEYAPI_API_KEY"])  # warm-up of the server
        for _ in range(SHORT_ROUNDS):
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                program = [str(ROOT / "bench" / "loop.py"), url, "reviews.jsonl"]
                names = [",".join(products), ",".join(regions), ENV["KEYAPI_API_KEY"]]
                times["loop"].append(_timed([sys.executable, *program, *names], folder))
                job = folder / "job.yaml"
                job.write_text(
                    yaml.safe_dump(
                        {
                            "api": {
                                "base_url": url,
                                "requests_per_second": 1_000_000,
                                "concurrency": CONCURRENCY,
                            },
                            "budget": {"max_credits": 10_000_000},
                            "output": {"dir": "out"},
                            "targets": [{"product_id": p, "regions": regions} for p in products],
                        }
                    )
                )
                argv = [sys.executable, "-m", "crawler", "run", "--no-progress", str(job)]
                times["crawler"].append(_timed(argv, folder))
    finally:
        server.terminate()
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    imports = _import_seconds()
    rows.append(
        f"Job: {len(products) * len(regions)} targets, {pages:,} pages, concurrency "
        f"{CONCURRENCY}, the pre-rendered server in a second process; whole processes, launch "
        f"to exit, median of {SHORT_ROUNDS} alternated runs each."
    )
    rows.append("")
    rows.append("| program | seconds (median) | runs | vs the loop |")
    rows.append("|---|---|---|---|")
    for name, label in (
        ("loop", "`python bench/loop.py` (aiohttp + orjson, dedups and writes)"),
        ("crawler", "`crawler run job.yaml` (state saved every page)"),
    ):
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        rows.append(
            f"| {label} | {median[name]:.2f} | {runs} | {median['loop'] / median[name]:.2f} |"
        )
    rows.append("")
    rows.append(
        "Imports before the first request (`python -X importtime`, cumulative, one run): "
        + ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in imports.items())
        + "."
    )


def _import_seconds() -> dict[str, float]:
    """What the run path imports, against what the hand-written loop imports."""
    out: dict[str, float] = {}
    for name, code in (
        ("aiohttp + orjson", "import aiohttp, orjson"),
        ("the crawler's run path", "import crawler.cli, crawler.logs, crawler.runner"),
    ):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        seen: set[str] = set()
        total = 0
        for line in done.stderr.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith("  "):
                module = parts[2].strip()
                if module not in seen:  # top-level imports: their times include their children
                    seen.add(module)
                    total += int(parts[1])
        out[name] = total / 1e6
    return out


async def rate_fidelity(rows: list[str]) -> None:
    rows.append("")
    rows.append("| configured req/s | achieved req/s | ratio | 429s |")
    rows.append("|---|---|---|---|")
    for rate in RATES:
        port = 18940 + rate % 97
        server = start_server(
            [
                sys.executable,
                "-m",
                "crawler",
                "sandbox",
                "--port",
                str(port),
                "--rate",
                str(rate),
                "--latency-ms",
                "50-300",
                "--burst",
                str(max(2, rate // 10)),
            ],
            "sandbox listening",
        )
        url = f"http://127.0.0.1:{port}"
        try:
            with tempfile.TemporaryDirectory() as tmp:
                job = Path(tmp) / "job.yaml"
                many = [str(1729679758111249333 + i) for i in range(400)]
                job.write_text(
                    yaml.safe_dump(
                        {
                            "api": {
                                "base_url": url,
                                "requests_per_second": rate,
                                "concurrency": max(4, rate // 2),
                            },
                            "budget": {"max_credits": 10_000_000},
                            "output": {"dir": "out"},
                            "targets": [{"product_id": p, "regions": REGIONS} for p in many],
                        }
                    )
                )
                task = asyncio.create_task(run_job(load_job(job), environ=ENV))
                window = 12.0 if rate == 5 else 6.0
                await asyncio.sleep(2.0)  # past start-up
                r0, t0 = await ledger(url)
                await asyncio.sleep(window)
                r1, t1 = await ledger(url)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                statuses = await ledger_statuses(url)
        finally:
            server.terminate()
        achieved = (r1 - r0) / (t1 - t0)
        rows.append(
            f"| {rate} | {achieved:.1f} | {achieved / rate:.3f} | {statuses.get('429', 0)} |"
        )


async def ledger(url: str) -> tuple[int, float]:
    async with aiohttp.ClientSession() as s, s.get(url + "/_sandbox/ledger") as r:
        doc = await r.json()
    return sum(k["requests"] for k in doc["keys"].values()), time.perf_counter()


async def ledger_statuses(url: str) -> dict[str, int]:
    async with aiohttp.ClientSession() as s, s.get(url + "/_sandbox/ledger") as r:
        doc = await r.json()
    out: dict[str, int] = {}
    for book in doc["keys"].values():
        for status, n in book["statuses"].items():
            out[status] = out.get(status, 0) + n
    return out


RUN_ONE = """
import asyncio, sys, time
from crawler import load_job, logs, run_job
logs.configure(level="warning")
job = load_job(sys.argv[1])
called, started = time.time(), time.perf_counter()
result = asyncio.run(run_job(job, environ={"KEYAPI_API_KEY": "sk_bench_key"}))
seconds = time.perf_counter() - started
# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's size at fork
status = open("/proc/self/status").read()
peak = int(status.split("VmHWM:")[1].split()[0])
print(called, seconds, peak, result.report["totals"]["reviews"], result.exit_status)
"""


def lean_job(folder: Path, url: str, targets: int) -> Path:
    job = folder / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "api": {"base_url": url, "requests_per_second": 1_000_000, "concurrency": 16},
                "budget": {"max_credits": 100_000_000},
                "output": {"dir": "out", "shard_max_records": 1_000_000},
                "targets": [
                    {"product_id": str(9_000_000_000_000_000_000 + k), "region": "US"}
                    for k in range(targets)
                ],
            }
        )
    )
    return job


def run_one(job: Path) -> tuple[float, float, float, int, int]:
    launched = time.time()
    out = subprocess.check_output([sys.executable, "-c", RUN_ONE, str(job)], text=True)
    called, seconds, peak, records, status = out.splitlines()[-1].split()
    assert status == "0", out
    return launched, float(called), float(seconds), int(peak), int(records)


async def crawler_memory_and_resume(rows: list[str]) -> None:
    """Peak RSS of whole crawls at 100 k, 1 M and 5 M reviews; time to first request on resume."""
    port, per_target = 18960, 5000
    server = start_server(
        [sys.executable, str(ROOT / "bench" / "lean_server.py"), str(port), str(per_target), "50"],
        "ready",
    )
    url = f"http://127.0.0.1:{port}"
    rows.append("")
    rows.append(
        "| reviews in the job | crawl seconds | reviews/s | peak RSS (MiB) | growth per review |"
    )
    rows.append("|---|---|---|---|---|")
    resume = ""
    try:
        base: tuple[int, int] | None = None
        for n in (100_000, 1_000_000, 5_000_000):
            with tempfile.TemporaryDirectory() as tmp:
                job = lean_job(Path(tmp), url, n // per_target)
                _, _, seconds, peak, records = run_one(job)
                assert records == n, records
                growth = "-" if base is None else f"{(peak - base[1]) * 1024 / (n - base[0]):.1f} B"
                base = base or (n, peak)
                rows.append(
                    f"| {n:,} | {seconds:.1f} | {n / seconds:,.0f} | {peak / 1024:.0f} | {growth} |"
                )
                if n == 1_000_000:  # resume: one more target in the job, the rest all done
                    lean_job(Path(tmp), url, n // per_target + 1)
                    async with aiohttp.ClientSession() as s:
                        await s.post(url + "/_bench/reset")
                    launched, called, _, _, _ = run_one(job)
                    async with aiohttp.ClientSession() as s, s.get(url + "/_bench/first") as r:
                        first = (await r.json())["first"]
                    resume = (
                        f"Resuming a job that has written 1,000,000 reviews: first request "
                        f"{first - called:.2f} s after `run_job` was called, "
                        f"{first - launched:.2f} s after the process was launched (Python "
                        "start-up and imports included)."
                    )
    finally:
        server.terminate()
    rows.append("")
    rows.append(resume)


def seen_memory(rows: list[str]) -> None:
    rows.append("")
    rows.append("| reviews seen | peak RSS (MiB) | growth per review over the 100k run (bytes) |")
    rows.append("|---|---|---|")
    base = None
    for n in (100_000, 1_000_000, 5_000_000):
        code = (
            "import random;from crawler.output.dedup import SeenIds;"
            "s=SeenIds();r=random.Random(1)\n"
            f"for _ in range({n}): s.add(str(r.randrange(10**18,10**19)))\n"
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
        )
        kib = int(subprocess.check_output([sys.executable, "-c", code], text=True))
        if base is None:
            base = (n, kib)
            growth = "-"
        else:
            growth = f"{(kib - base[1]) * 1024 / (n - base[0]):.1f}"
        rows.append(f"| {n:,} | {kib / 1024:.0f} | {growth} |")


def resume_cost(rows: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ids = array("Q", range(10**18, 10**18 + 1_000_000 * 7919, 7919))
        (Path(tmp) / "seen.u64").write_bytes(ids.tobytes())
        started = time.perf_counter()
        log = SeenLog(Path(tmp) / "seen.u64", Path(tmp) / "other", len(ids), 0)
        log.load()
        seconds = time.perf_counter() - started
        log.close()
    rows.append("")
    rows.append(
        f"Building the seen-set of 1,000,000 saved ids: {seconds:.2f} s (on resume this runs in "
        "a thread while the first requests go out)."
    )


async def seen_and_resume(rows: list[str]) -> None:
    seen_memory(rows)
    resume_cost(rows)


async def coordinated(rows: list[str]) -> None:
    """The coordinated mode against the reference server: what Redis costs, and a shared rate."""
    port = 18951
    server = start_server(
        [sys.executable, str(ROOT / "bench" / "server.py"), str(port), ",".join(PRODUCTS),
         ",".join(REGIONS)],
        "ready",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        await bare_loop(url)  # warm-up
        with tempfile.TemporaryDirectory() as tmp:
            seconds, pages, _ = await crawler_run(url, Path(tmp), 1)
        rows.append(
            f"The same walk ({len(targets())} targets, {pages:,} pages) by one process without "
            f"Redis: {pages / seconds:,.0f} pages/s."
        )
        rows.append("")
        await coordination(rows, targets(), url)
    finally:
        server.terminate()


async def bucket(rows: list[str]) -> None:
    """Pages a second into a bucket against into a folder, against the reference server."""
    port = 18953
    server = start_server(
        [sys.executable, str(ROOT / "bench" / "server.py"), str(port), ",".join(PRODUCTS),
         ",".join(REGIONS)],
        "ready",
    )  # fmt: skip
    try:
        await bucket_speed(rows, f"http://127.0.0.1:{port}", targets(), ENV, ROUNDS)
    finally:
        server.terminate()


SECTIONS: dict[str, Callable[[list[str]], Awaitable[None]]] = {
    "throughput": throughput,
    "short-job": short_job,
    "rate": rate_fidelity,
    "seen-set": seen_and_resume,
    "crawl-memory-and-resume": crawler_memory_and_resume,
    "targets": targets_at_scale,
    "coordination": coordinated,
    "rate-above": rate_above,
    "export": export_speed,
    "bucket": bucket,
}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        choices=SECTIONS,
        action="append",
        help="run this section only (repeatable); updates only its part of docs/benchmarks.md",
    )
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (default 3)")
    parser.add_argument("--no-write", action="store_true", help="print, leave the docs alone")
    args = parser.parse_args()
    global ROUNDS  # noqa: PLW0603 -- the one knob the sections share, set once before they run
    ROUNDS = args.rounds
    logs.configure(level="warning")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    target = ROOT / "docs" / "benchmarks.md"
    doc = target.read_text() if target.exists() else ""
    for name in args.only or SECTIONS:
        rows: list[str] = []
        await SECTIONS[name](rows)
        table = "\n".join(rows).strip("\n")
        print(table)
        measured = f"Measured on {machine}, {time.strftime('%Y-%m-%d')}."
        doc = _with_section(doc, name, f"{measured}\n\n{table}")
    if not args.no_write:
        target.write_text(doc)


def _with_section(doc: str, name: str, body: str) -> str:
    """The document with section ``name`` replaced (or added before the hand-written notes):
    each section between its own markers, so one can be measured again alone."""
    start, end = f"<!-- section: {name} -->\n", f"\n<!-- /section: {name} -->"
    block = f"{start}{body}{end}"
    if start in doc:
        before, _, rest = doc.partition(start)
        return before + block + rest.partition(end)[2]
    head, notes, tail = doc.partition(NOTES)
    if not head:
        head = (
            "# Benchmarks\n\nMeasured with `make bench` (`python bench/run.py`); "
            "`python bench/run.py --only SECTION` measures one section again.\n"
        )
    return f"{head.rstrip()}\n\n{block}\n\n{notes}{tail}"


if __name__ == "__main__":
    asyncio.run(main())
