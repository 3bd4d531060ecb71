"""Shared test parts: a sandbox served over loopback, job files in a temp dir, output readers."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
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
