"""Many processes, on one machine or many, working one job through Redis: the coordinated mode.

Imported only when a job is coordinated (``coordination:`` in the job file, or ``--redis``).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from crawler.config import Job
from crawler.coordination.gate import SharedRateGate
from crawler.coordination.link import Link
from crawler.coordination.orphans import repair_sealed
from crawler.coordination.store import RedisStore, default_worker
from crawler.errors import ConfigError
from crawler.layout import Layout

__all__ = ["RedisStore", "SharedRateGate", "default_worker", "key_fingerprint", "open_worker"]


def key_fingerprint(api_key: str) -> str:
    """How Redis names an API key's rate gate: never the key itself."""
    return hashlib.blake2b(api_key.encode(), digest_size=8).hexdigest()


async def open_worker(
    job: Job, layout: Layout, output: dict[str, Any], worker: str | None
) -> RedisStore:
    """Join the job as a worker: register, then seal what dead workers left open here."""
    settings = job.coordination
    assert settings is not None  # noqa: S101 -- the caller checked the job is coordinated
    if worker is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", worker):
        raise ConfigError(
            f"--worker {worker!r}: a worker's name is letters, digits, '_', '.' and '-' (it names "
            "its shard files and its keys in Redis)"
        )
    link = Link(settings.redis_url, unavailable_seconds=settings.unavailable_seconds)
    try:
        store = await RedisStore.open(
            link,
            job=job.name,
            worker=worker or default_worker(),
            layout=layout,
            output=output,
            lease_seconds=settings.lease_seconds,
        )
        layout.shards_dir.mkdir(parents=True, exist_ok=True)
        sealed, _ = await store.manifest()
        repair_sealed(layout, [(s.file, s.bytes) for s in sealed])
    except BaseException:
        await link.close()
        raise
    return store
