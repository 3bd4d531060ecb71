"""A bucket job's sealed shards for the export: its manifest read from the bucket, each shard
read from the working folder when it is there whole, else fetched into a temporary file (one at
a time: the export's memory and disk do not grow with the job)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from crawler.export.source import ShardEntry
from crawler.output.bucket import Bucket, BucketUrl
from crawler.output.layout import Layout
from crawler.output.publisher import MANIFEST
from crawler.pacing.retry import RetryPolicy

T = TypeVar("T")


class BucketShards:
    """Open from construction to ``close``; the bucket's calls on an event loop of its own (the
    exporter is synchronous)."""

    def __init__(self, url: str, layout: Layout, policy: RetryPolicy) -> None:
        self.url = BucketUrl.parse(url)
        self._bucket = Bucket.open(self.url, policy)
        self._layout = layout
        self._loop = asyncio.new_event_loop()
        self._fetched = Path(tempfile.mkdtemp(prefix="crawler-export-shards-"))

    def manifest(self) -> bytes | None:
        found = self._run(self._bucket.get(MANIFEST))
        return found[0] if found else None

    def path(self, entry: ShardEntry) -> Path:
        """Where to read the shard: the working folder's file if it has the sealed length (the
        export checks its sha256 as it reads), else the object, fetched. A missing object gives
        a path that does not exist: the export says so and goes on."""
        local = self._layout.root / entry.file
        if local.is_file() and local.stat().st_size == entry.bytes:
            return local
        path = self._fetched / entry.name
        found = self._run(self._bucket.get(entry.file))
        if found is not None:
            path.write_bytes(found[0])
        return path

    def release(self, path: Path) -> None:
        """A fetched shard removed once exported."""
        if path.parent == self._fetched:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self._fetched, ignore_errors=True)
        self._loop.close()

    def _run(self, call: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(call)
