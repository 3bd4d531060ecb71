"""The SQLite state file opened: locked to one process, checked against the folder and the output
settings, created or brought to this version; a crash's lease forfeited; its errors worded."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path
from typing import Any

import orjson

from crawler.errors import OutputError, StateError
from crawler.output.layout import Layout, hold, shard_owner
from crawler.state import rules
from crawler.state.migrations import migrate, migrate_to_sources
from crawler.state.model import Ledger
from crawler.state.schema import SCHEMA, VERSION, job_row


def lock(layout: Layout) -> int:
    fd = hold(layout.lock)
    if fd is None:
        raise StateError(f"{layout.root}: another crawler is running this job")
    return fd


def connect(layout: Layout, output: dict[str, Any]) -> sqlite3.Connection:
    path = layout.state_db
    if not path.exists() and layout.old_snapshot.exists():
        raise StateError(
            f"{layout.old_snapshot}: state saved by an older crawler; finish the job with that "
            "version, or start over with --fresh"
        )
    created = not path.exists() or _never_begun(path)
    if created and layout.coordinated.exists():
        raise StateError(
            f"{layout.root}: holds a coordinated job's shards: its state is in Redis (run it "
            "with --redis URL), or use an empty output.dir"
        )
    if created and not layout.shard_files() and layout.series_files(None):
        raise StateError(
            f"{layout.shards_dir}: holds shards but no job state; use an empty output.dir"
        )
    if created and layout.shard_files():  # before any state exists: never theirs to cut
        advice = (
            "holds a coordinated job's shards: its state is in Redis (run it with --redis URL), "
            "or use an empty output.dir"
            if _coordinated(layout)
            else "holds shards but no job state; use an empty output.dir"
        )
        raise StateError(f"{layout.shards_dir}: {advice}")
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        if created:  # the schema and the job row in one transaction: a kill leaves neither
            db.executescript(f"BEGIN; {SCHEMA};")
            db.execute(
                "INSERT INTO job (id, version, output) VALUES (1, ?, ?)",
                (VERSION, orjson.dumps(output).decode()),
            )
            db.execute("COMMIT")
        job = job_row(db)
    except sqlite3.Error as exc:
        raise error_of(exc, path) from None
    if job["version"] in (2, 3):
        try:
            migrate(db, job["version"])
            job = job_row(db)
        except sqlite3.Error as exc:
            raise error_of(exc, path) from None
    if job["version"] == 4:
        try:
            migrate_to_sources(db)
            job = job_row(db)
        except sqlite3.Error as exc:
            raise error_of(exc, path) from None
    if job["version"] != VERSION:
        db.close()
        raise StateError(
            f"{path}: state version {job['version']}, this crawler reads version {VERSION}; "
            "start over with --fresh"
        )
    saved = orjson.loads(job["output"])
    if saved != output:
        db.close()
        changed = ", ".join(
            f"{k}={saved.get(k)!r}, now {output.get(k)!r}"
            for k in output
            if saved.get(k) != output.get(k)
        )
        raise StateError(
            f"{layout.root}: the output settings changed since this job started (saved "
            f"{changed}); put them back, or use another output.dir, or start over with --fresh"
        )
    return db


def _never_begun(path: Path) -> bool:
    """Whether ``path`` is a state file a kill left during a job's first start: no job row and
    no target (an empty file, or, from an earlier crawler, the schema without its job row).
    Such a file holds nothing of the job, so it is begun again rather than called unreadable;
    it is removed with its WAL, never read as a state."""
    try:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            names = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if names and not {"job", "targets"} <= names:
                return False  # not a file of ours: left for the error that names it
            if names and (
                db.execute("SELECT 1 FROM job").fetchone()
                or db.execute("SELECT 1 FROM targets LIMIT 1").fetchone()
            ):
                return False
        finally:
            db.close()
    except sqlite3.Error:
        return False  # unreadable: the connection that follows says so
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    return True


def _coordinated(layout: Layout) -> bool:
    """Whether the folder's shards are a coordinated job's: named for their workers (every
    manifest has the same version now, so it cannot tell)."""
    return any(shard_owner(path.name) for path in layout.shard_files())


def forfeit(db: sqlite3.Connection, path: Path) -> None:
    """The lease of a run that ended without giving it back (a crash) counts as forfeited."""
    (outstanding,) = db.execute("SELECT outstanding FROM job").fetchone()
    if outstanding:
        ledger = Ledger()
        rules.crashed(ledger, outstanding)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "UPDATE job SET forfeited = forfeited + ?, outstanding = 0", (ledger.forfeited,)
            )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise error_of(exc, path) from None


def error_of(exc: sqlite3.Error, path: Path) -> Exception:
    """A full disk or a read-only folder is an output problem; anything else, bad state."""
    text = str(exc)
    for words, code in _OUTPUT_ERRORS:
        if isinstance(exc, sqlite3.OperationalError) and words in text:
            if code == errno.EROFS and _read_only_file(path):  # not its file system
                return OutputError(
                    f"{path}: cannot write: the file is read-only; make it writable (chmod u+w "
                    f"{path}), then run the same command again: the state is saved",
                    path=str(path),
                )
            return OutputError.from_os(OSError(code, os.strerror(code)), path)
    return StateError(f"{path}: unreadable state ({text}); start over with --fresh")


def _read_only_file(path: Path) -> bool:
    try:
        return not path.stat().st_mode & 0o200
    except OSError:
        return False


# sqlite3 reports errno only as words in its message
_OUTPUT_ERRORS = (
    ("full", errno.ENOSPC),
    ("readonly", errno.EROFS),
    ("disk I/O", errno.EIO),
    ("unable to open", errno.EACCES),
)
