"""Benchmark section: jobs of 10 to 1,000,000 targets, timed and measured from outside the process.

For each size: `crawler plan` (no probe), time to the first request of `crawler run` (and of a
resumed run), `crawler status`, and the resident memory of the running crawler, against the
sandbox in a process of its own. Targets come from a CSV, as a bulk harvest's would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SIZES = (10, 10_000, 100_000, 1_000_000)
CRAWLER = [sys.executable, "-m", "crawler"]
KEY = {"KEYAPI_API_KEY": "sk_bench_targets"}


def write_job(folder: Path, url: str, targets: int) -> Path:
    with (folder / "targets.csv").open("w") as out:
        out.write("product_id,region\n")
        for k in range(targets):
            out.write(f"{1729679758111249333 + k // 4},{('US', 'GB', 'DE', 'FR')[k % 4]}\n")
    job = folder / "job.yaml"
    job.write_text(
        f"api: {{base_url: '{url}', requests_per_second: 20, concurrency: 16}}\n"
        "budget: {max_credits: 100000000}\n"
        "output: {dir: out}\n"
        "targets_file: targets.csv\n"
    )
    return job


def requests_seen(url: str) -> int:
    with urllib.request.urlopen(url + "/_sandbox/ledger") as answer:  # noqa: S310 -- loopback
        keys = json.load(answer)["keys"]
    return sum(book["requests"] for book in keys.values())


def timed(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([*CRAWLER, *args], check=True, capture_output=True, env={**os.environ, **KEY})
    return time.perf_counter() - started


def memory_kib(pid: int) -> tuple[int, int]:
    """VmRSS and VmHWM of a running process."""
    status = Path(f"/proc/{pid}/status").read_text()
    return (
        int(status.split("VmRSS:")[1].split()[0]),
        int(status.split("VmHWM:")[1].split()[0]),
    )


def first_request(job: Path, url: str, *, settle: float) -> tuple[float, int, int]:
    """Seconds from launching `crawler run` to the sandbox's next request; then, ``settle``
    seconds into the run, its memory; then Ctrl-C, as a person would."""
    before = requests_seen(url)
    launched = time.perf_counter()
    process = subprocess.Popen(
        [*CRAWLER, "--log-level", "warning", "run", "--no-progress", str(job)],
        env={**os.environ, **KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while requests_seen(url) == before:
        if process.poll() is not None:
            raise RuntimeError(f"crawler exited with {process.returncode} before any request")
        time.sleep(0.01)
    seconds = time.perf_counter() - launched
    time.sleep(settle)
    rss, peak = memory_kib(process.pid)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    return seconds, rss, peak


def start_sandbox() -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [*CRAWLER, "sandbox", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("sandbox listening on "), line
    return process, line.split()[-1]


async def targets_at_scale(rows: list[str]) -> None:
    sandbox, url = start_sandbox()
    rows.append("")
    rows.append(
        "| targets | `crawler plan` | `run`: first request | resumed `run`: first request "
        "| `crawler status` | RSS running (MiB) | RSS over the 10-target job, per target |"
    )
    rows.append("|---|---|---|---|---|---|---|")
    base: int | None = None
    try:
        for size in SIZES:
            with tempfile.TemporaryDirectory() as tmp:
                job = write_job(Path(tmp), url, size)
                plan = timed("plan", str(job))
                first, rss, _ = first_request(job, url, settle=3.0)
                resumed, _, _ = first_request(job, url, settle=0.5)
                status = timed("status", str(job))
            base = rss if base is None else base
            per = "-" if size == SIZES[0] else f"{(rss - base) * 1024 / size:.0f} B"
            rows.append(
                f"| {size:,} | {plan:.2f} s | {first:.2f} s | {resumed:.2f} s | {status:.2f} s "
                f"| {rss / 1024:.0f} | {per} |"
            )
    finally:
        sandbox.terminate()
        sandbox.wait()
    rows.append("")
    rows.append(
        "Whole commands, launch to answer (Python start-up included); the first request is "
        "the sandbox's next request after the launch. Each job is a CSV of `product_id,region` "
        "rows; the run is at 20 requests/s and interrupted with Ctrl-C after 3 s; RSS is read "
        "from /proc then."
    )
