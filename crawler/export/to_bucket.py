"""Export files put in an S3-compatible bucket (``--to s3://bucket/prefix``): each staged in a
local temporary folder and put whole, so an object appears complete or not at all; the ledger
replaced by compare-and-swap, so two exports to one prefix never both count a shard.

The exporter is synchronous: the bucket's calls (``crawler.output.bucket``, async) run on an
event loop of this destination's own, from ``begin`` to ``end``. Endpoint and credentials come
from the environment, as for a job's output.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from crawler.errors import ConfigError
from crawler.output.bucket import Bucket, BucketUrl
from crawler.pacing.retry import RetryPolicy

T = TypeVar("T")


class BucketDestination:
    def __init__(self, to: str) -> None:
        try:
            self._url = BucketUrl.parse(to)
        except ConfigError as exc:
            raise ConfigError(f"--to {exc}") from None
        self._bucket = Bucket.open(self._url, RetryPolicy())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._staged: Path | None = None
        self._etags: dict[str, str | None] = {}  # what ``read`` saw: the ledger's version

    def describe(self) -> str:
        return str(self._url)

    def begin(self) -> list[str]:
        self._loop = asyncio.new_event_loop()
        self._staged = Path(tempfile.mkdtemp(prefix="crawler-export-"))
        return []  # nothing is ever half-put in a bucket: staged files were local, and gone

    def staging(self, name: str) -> Path:
        assert self._staged is not None  # noqa: S101 -- begin() comes first
        path = self._staged / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def put(self, staged: Path, name: str) -> None:
        self._run(self._bucket.put_file(name, staged))
        staged.unlink()

    def read(self, name: str) -> bytes | None:
        found = self._run(self._bucket.get(name))
        self._etags[name] = found[1] if found else None
        return found[0] if found else None

    def write(self, name: str, data: bytes) -> None:
        etag = self._run(self._bucket.put_if(name, data, self._etags.get(name)))
        if etag is None:
            raise ConfigError(
                f"{self._url}/{name}: another `crawler export` wrote it meanwhile; let it "
                "finish, then export again (what this one put is counted by neither)"
            )
        self._etags[name] = etag

    def end(self) -> None:
        if self._staged is not None:
            shutil.rmtree(self._staged, ignore_errors=True)
            self._staged = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def _run(self, call: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None  # noqa: S101 -- begin() comes first
        return self._loop.run_until_complete(call)
