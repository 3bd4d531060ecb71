"""The job's saved state: a snapshot plus a journal of events, behind a small store interface.

Every change of state is an event (see ``apply``). The live state is the events applied in memory
at once; the store makes them durable. On open, the snapshot is read and the journal replayed, so
the state after a crash is exactly the events that were fsynced. Saving costs one short line per
event, whatever the size of the job.

Events (short keys keep the journal small):
    L  credits leased for the next requests, before any of them is sent (negative: given back)
    P  a page of target k committed: cursor, counters, credits, the writer's position after it
    F  target k failed, with the reason and the credits its last tries cost
    O  a new shard opened;  S  the open shard sealed (records, bytes, sha256)
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import orjson

from crawler import journal
from crawler.errors import StateError
from crawler.journal import Event, Journal
from crawler.layout import Layout, write_atomically

VERSION = 1
COMPACT_AFTER_LINES = 100_000  # a crash's replay stays well under a second


@dataclass
class TargetState:
    cursor: int | str | None = None  # the next cursor to ask for; None: the first page
    exhausted: bool = False  # the API said has_more: false
    pages: int = 0
    items: int = 0  # items received, duplicates included
    records: int = 0  # reviews written
    duplicates: int = 0
    credits: int = 0
    retries: int = 0
    rate_limited: int = 0
    seconds: float = 0.0
    review_count: int | None = None
    failed: str | None = None


@dataclass
class ShardInfo:
    file: str
    records: int = 0
    bytes: int = 0
    sha256: str | None = None


@dataclass
class JobState:
    output: dict[str, Any]
    generation: int = 0
    runs: int = 0
    leased: int = 0  # credits that requests may have used: the ceiling is checked against this
    credits: int = 0  # credits attributed to targets by committed pages and failures
    next_shard: int = 1
    open_shard: ShardInfo | None = None
    shards: list[ShardInfo] = field(default_factory=list)
    seen: int = 0  # ids committed to seen.u64
    seen_other: int = 0  # bytes committed to seen-other.txt
    targets: dict[str, TargetState] = field(default_factory=dict)

    def target(self, key: str) -> TargetState:
        found = self.targets.get(key)
        if found is None:
            found = self.targets[key] = TargetState()
        return found

    def to_json(self) -> bytes:
        return orjson.dumps({"version": VERSION, **asdict(self)}, option=orjson.OPT_INDENT_2)

    @classmethod
    def from_json(cls, data: bytes) -> JobState:
        doc = orjson.loads(data)
        if doc.pop("version", None) != VERSION:
            raise ValueError(f"unknown state version (this crawler reads version {VERSION})")
        open_shard = doc.pop("open_shard")
        return cls(
            **{k: v for k, v in doc.items() if k not in ("shards", "targets")},
            open_shard=ShardInfo(**open_shard) if open_shard else None,
            shards=[ShardInfo(**s) for s in doc["shards"]],
            targets={k: TargetState(**t) for k, t in doc["targets"].items()},
        )


def apply(state: JobState, event: Event) -> None:
    """The one place where state changes: live and on replay alike."""
    kind = event["e"]
    if kind == "L":
        state.leased += event["c"]
    elif kind == "P":
        t = state.target(event["k"])
        t.credits += event["c"]
        state.credits += event["c"]
        t.cursor, t.exhausted, t.failed = event["cur"], event["x"], None
        t.pages += 1
        t.items += event["i"]
        t.records += event["n"]
        t.duplicates += event["d"]
        t.retries += event["r"]
        t.rate_limited += event["q"]
        t.seconds += event["t"]
        if event.get("tot") is not None:
            t.review_count = event["tot"]
        if state.open_shard is not None:
            state.open_shard.bytes, state.open_shard.records = event["w"][0], event["w"][1]
        state.seen, state.seen_other = event["w"][2], event["w"][3]
    elif kind == "F":
        t = state.target(event["k"])
        t.credits += event["c"]
        state.credits += event["c"]
        t.failed = event["why"]
        t.retries += event["r"]
        t.rate_limited += event["q"]
    elif kind == "O":
        state.open_shard = ShardInfo(event["file"])
        state.next_shard += 1
    elif kind == "S":
        state.shards.append(ShardInfo(event["file"], event["rec"], event["bytes"], event["sha256"]))
        state.open_shard = None
    else:
        raise StateError(f"unknown state event {kind!r}")


class StateStore(Protocol):
    """What the run needs of saved state; a shared store for several processes fits behind it."""

    state: JobState

    async def record(self, events: list[Event]) -> None:
        """Apply events now; return once they are durable."""

    def compact(self) -> None:
        """Fold the journal into a new snapshot; only while no event is in flight."""

    def close(self) -> None: ...


class FileStateStore:
    """State in the job's output folder: ``state/state.json`` plus ``state/journal-N.log``."""

    def __init__(
        self,
        layout: Layout,
        state: JobState,
        journal_: Journal,
        lock_fd: int,
        *,
        compact_after: int = COMPACT_AFTER_LINES,
    ) -> None:
        self.layout = layout
        self._compacting = False
        self._compact_after = compact_after
        self.state = state
        self._journal = journal_
        self._lock_fd = lock_fd

    @classmethod
    def open(
        cls,
        layout: Layout,
        output: dict[str, Any],
        *,
        fresh: bool = False,
        compact_after: int = COMPACT_AFTER_LINES,
    ) -> FileStateStore:
        """Lock the job, load its state (or start one), and check it fits ``output``.

        ``fresh`` first removes every file the job wrote (under the lock, so never under a
        crawler that is still running it).
        """
        layout.state_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(layout)
        try:
            if fresh:
                layout.remove_job_files()
            state, keep = load(layout, output_if_new=output)
            created = not layout.snapshot.exists()
            if created and layout.shard_files():  # before any state exists: never theirs to cut
                raise StateError(
                    f"{layout.shards_dir}: holds shards but no job state; use an empty output.dir"
                )
            if created:
                write_atomically(layout.snapshot, state.to_json())
            if state.output != output:
                raise StateError(
                    f"{layout.root}: the output settings changed since this job started "
                    f"(saved {_diff(state.output, output)}); put them back, or use another "
                    "output.dir, or start over with --fresh"
                )
            current = layout.journal(state.generation)
            for stale in layout.state_dir.glob("journal-*.log"):  # a crash mid-compaction's
                if stale != current:
                    stale.unlink()
            log = Journal(current, keep_bytes=keep)
            store = cls(layout, state, log, lock_fd, compact_after=compact_after)
        except BaseException:
            os.close(lock_fd)
            raise
        return store

    async def record(self, events: list[Event]) -> None:
        for event in events:
            apply(self.state, event)
        await self._journal.append(events)
        if self._journal.lines >= self._compact_after and not self._compacting:
            self._compacting = True
            try:
                await self._compact_live()
            finally:
                self._compacting = False

    async def _compact_live(self) -> None:
        """Fold the journal into a snapshot while the run goes on.

        Under the journal's lock no flush is running; from there to the switch nothing awaits,
        so no event can land between the snapshot and the new journal. Events buffered but not
        written are already in the state, so the snapshot makes them durable.
        """
        old = self._journal
        async with old.lock:
            pending = old.detach_pending()
            self.compact()
        if pending is not None and not pending.done():
            pending.set_result(None)

    def compact(self) -> None:
        old = self._journal
        self.state.generation += 1
        write_atomically(self.layout.snapshot, self.state.to_json())
        self._journal = Journal(self.layout.journal(self.state.generation), keep_bytes=0)
        old.close()
        old.path.unlink(missing_ok=True)

    def close(self) -> None:
        self._journal.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def load(layout: Layout, *, output_if_new: dict[str, Any] | None = None) -> tuple[JobState, int]:
    """Snapshot plus journal replay; the byte length of the journal's intact part."""
    try:
        data = layout.snapshot.read_bytes()
    except FileNotFoundError:
        data = None
    if data is None:
        if output_if_new is None or layout.journal(0).exists():
            raise StateError(
                f"{layout.snapshot}: missing, but the job has other state; start over with --fresh"
                if output_if_new is not None
                else f"{layout.root}: no saved state (the job has not run yet)"
            )
        state = JobState(output=output_if_new)
    else:
        try:
            state = JobState.from_json(data)
        except (ValueError, TypeError, KeyError) as exc:
            raise StateError(
                f"{layout.snapshot}: unreadable state ({exc}); "
                "start over with --fresh (removes this job's shards and state)"
            ) from None
    events, keep = journal.read(layout.journal(state.generation))
    try:
        for event in events:
            apply(state, event)
    except (KeyError, TypeError, AttributeError) as exc:
        raise StateError(f"{layout.journal(state.generation)}: event does not fit: {exc}") from None
    return state, keep


def _lock(layout: Layout) -> int:
    fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateError(f"{layout.root}: another crawler is running this job") from None
    return fd


def _diff(saved: dict[str, Any], now: dict[str, Any]) -> str:
    changed = [k for k in now if saved.get(k) != now.get(k)]
    return ", ".join(f"{k}={saved.get(k)!r}, now {now.get(k)!r}" for k in changed)


def output_fingerprint(shard_max_records: int, compression: str) -> dict[str, Any]:
    return {"shard_max_records": shard_max_records, "compression": compression}
