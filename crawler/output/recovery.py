"""After a crash: the job's files cut back to what the state committed, strays removed.

The one step that makes a crash's leftovers vanish, run before anything is opened for writing:
bytes past the committed length of the open shard and of the seen files are cut off (a page
fetched again then adds each review exactly once), and shard files the state never recorded
are removed. Files the state says are longer than they are mean the state and the files do not
belong together: that is refused, never patched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from crawler.errors import OutputError, StateError
from crawler.output.layout import SHARD_PATTERN, Layout, shard_owner
from crawler.state import ShardInfo
from crawler.state.events import WriterPosition


@dataclass
class Recovered:
    """What recovery found: for the log line of a resumed run."""

    bytes_cut: int = 0
    removed: list[Path] = field(default_factory=list)


def recover(
    layout: Layout,
    position: WriterPosition,
    sealed: list[ShardInfo],
    open_shard: ShardInfo | None,
    next_shard: int,
    *,
    owner: str | None = None,
) -> Recovered:
    """``owner``: the worker whose shard series this is (a coordinated job: the other
    workers' files in the folder are theirs, not touched); None for a one-process job, which
    also has seen files."""
    found = Recovered()
    known = {s.file for s in sealed} | ({open_shard.file} if open_shard else set())
    for path in layout.shard_files():
        if path.name in known or (owner is not None and shard_owner(path.name) != owner):
            continue
        match = SHARD_PATTERN.fullmatch(path.name)
        if match is None or int(match["seq"]) < next_shard or shard_owner(path.name) != owner:
            raise StateError(
                f"{path}: a shard this job's state does not know; move it away or use "
                "another output.dir"
            )
        _unlink(path)  # created by a batch whose commit never came
        found.removed.append(path)
    if open_shard is not None:
        found.bytes_cut += truncate(layout.shard(open_shard.file), position.shard_bytes)
    if owner is None:
        found.bytes_cut += truncate(layout.seen_ids, position.seen * 8)
        found.bytes_cut += truncate(layout.seen_other, position.seen_other)
    return found


def truncate(path: Path, length: int) -> int:
    """Truncate ``path`` to ``length``; the bytes cut."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        size = 0
    if size < length:
        # never advise --fresh here: it deletes every committed shard, to mend one file
        raise StateError(
            f"{path}: {size:,} bytes, the state committed {length:,}: the file was cut or "
            "replaced since; put the original back (a backup, another copy), or point "
            "output.dir at the folder it belongs to"
        )
    if size == length and path.exists():
        return 0
    try:
        with path.open("ab") as file:
            os.ftruncate(file.fileno(), length)
            os.fsync(file.fileno())
    except OSError as exc:
        raise OutputError.from_os(exc, path) from None
    return size - length


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError as exc:
        raise OutputError.from_os(exc, path) from None
