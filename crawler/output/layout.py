"""Where each file of a job lives inside its output folder, and how to remove exactly those."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path

from crawler.errors import OutputError

# reviews-000001.jsonl in one process; reviews-<worker>-000001.jsonl for a worker of a
# coordinated job (each worker its own series)
SHARD_PATTERN = re.compile(r"reviews-(?:(?P<worker>.+)-)?(?P<seq>\d{6,})\.jsonl(?:\.gz|\.zst)?")
SUFFIX = {"none": "", "gzip": ".gz", "zstd": ".zst"}
# an endpoint's own series: shop_products-000001.jsonl (an endpoint's name has no '-'); a
# worker's of a coordinated job: shop_products-<worker>-000001.jsonl
SERIES_PATTERN = re.compile(
    r"(?P<series>[a-z][a-z0-9_]*)-(?:(?P<worker>.+)-)?(?P<seq>\d{6,})\.jsonl(?:\.gz|\.zst)?"
)


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def state_db(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def old_snapshot(self) -> Path:
        """Where the state of crawler 0.1 lived: such a job is refused, not misread."""
        return self.state_dir / "state.json"

    @property
    def lock(self) -> Path:
        return self.state_dir / "lock"

    @property
    def coordinated(self) -> Path:
        """Beside a coordinated job's shards: which job of which Redis they belong to."""
        return self.state_dir / "coordinated.json"

    def worker_lock(self, worker: str) -> Path:
        """Held by the one process of this machine that runs as ``worker``."""
        return self.state_dir / f"worker-{worker}.lock"

    @property
    def seen_ids(self) -> Path:
        return self.state_dir / "seen.u64"

    @property
    def seen_other(self) -> Path:
        return self.state_dir / "seen-other.txt"

    def series_seen(self, series: str) -> tuple[Path, Path]:
        """An endpoint's series' seen files: its item ids, as the reviews' are kept."""
        return self.state_dir / f"seen-{series}.u64", self.state_dir / f"seen-{series}-other.txt"

    def series_files(self, series: str | None) -> list[Path]:
        """An endpoint's series' shard files (None: every endpoint's but the reviews')."""
        if not self.shards_dir.is_dir() or series == "reviews":
            return []
        return sorted(
            p
            for p in self.shards_dir.iterdir()
            if (m := SERIES_PATTERN.fullmatch(p.name))
            and m["series"] != "reviews"
            and (series is None or m["series"] == series)
        )

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    def shard(self, name: str) -> Path:
        return self.shards_dir / name

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def report(self) -> Path:
        return self.root / "run-report.json"

    def owned_files(self, worker: str) -> list[Path]:
        """A coordinated worker's files here: its reviews shards and its series' shards."""
        reviews = [p for p in self.shard_files() if shard_owner(p.name) == worker]
        return reviews + [p for p in self.series_files(None) if series_owner(p.name) == worker]

    def shard_files(self) -> list[Path]:
        if not self.shards_dir.is_dir():
            return []
        return sorted(p for p in self.shards_dir.iterdir() if SHARD_PATTERN.fullmatch(p.name))

    def remove_job_files(self) -> list[Path]:
        """Delete what this job wrote, and nothing else a user may have put beside it."""
        removed: list[Path] = []
        written = (self.manifest, self.report)
        candidates = [*self.shard_files(), *written, self.seen_ids, self.seen_other]
        if self.shards_dir.is_dir():  # the endpoints' own series
            candidates += sorted(
                p for p in self.shards_dir.iterdir() if SERIES_PATTERN.fullmatch(p.name)
            )
        if self.state_dir.is_dir():
            candidates += sorted(self.state_dir.glob("seen-*.u64"))
            candidates += sorted(self.state_dir.glob("seen-*-other.txt"))
        candidates += [self.coordinated]
        candidates += [
            self.state_db.with_name(self.state_db.name + s) for s in ("", "-wal", "-shm")
        ]
        # a crash between writing and renaming leaves these beside their final names
        candidates += [t for p in written for t in sorted(self.root.glob(p.name + ".*tmp"))]
        if self.state_dir.is_dir():  # and crawler 0.1's state files
            candidates += [self.old_snapshot, *sorted(self.state_dir.glob("journal-*.log"))]
            candidates += sorted(self.state_dir.glob("*.tmp"))
        for path in candidates:
            if path.exists():
                path.unlink()
                removed.append(path)
        if self.shards_dir.is_dir() and not any(self.shards_dir.iterdir()):
            self.shards_dir.rmdir()
        return removed


def shard_name(prefix: str, sequence: int, compression: str) -> str:
    return f"{prefix}{sequence:06d}.jsonl{SUFFIX[compression]}"


def shard_sequence(name: str) -> int:
    found = SHARD_PATTERN.fullmatch(name)
    if found is None:
        raise ValueError(f"{name!r} is not a shard's name")
    return int(found["seq"])


def series_owner(name: str) -> str | None:
    """The worker whose series file this is; None for a one-process job's."""
    found = SERIES_PATTERN.fullmatch(name)
    return None if found is None else found["worker"]


def series_sequence(name: str) -> int:
    found = SERIES_PATTERN.fullmatch(name)
    if found is None:
        raise ValueError(f"{name!r} is not a series shard's name")
    return int(found["seq"])


def shard_owner(name: str) -> str | None:
    """The worker whose series a shard is in; None for a one-process job's shard."""
    found = SHARD_PATTERN.fullmatch(name)
    return None if found is None else found["worker"]


def write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename over, fsync the folder. The temp file is
    this process's own: workers of a coordinated job write the same report and manifest."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):  # a half-written temp file must not keep the space
            tmp.unlink()
        raise OutputError.from_os(exc, path) from None


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hold(path: Path) -> int | None:
    """An exclusive lock on ``path`` for as long as this process keeps the descriptor (the
    system lets go of it when the process dies, however it dies); None: another holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutputError.from_os(exc, path) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
