"""Checks a job's shards against its manifest, and that no review id appears twice."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import orjson

from crawler.dedup import SeenIds
from crawler.layout import Layout
from crawler.shards import read_lines, sha256_of


@dataclass
class Verdict:
    shards: int = 0
    records: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(layout: Layout) -> Verdict:
    verdict = Verdict()
    try:
        manifest = orjson.loads(layout.manifest.read_bytes())
    except FileNotFoundError:
        verdict.problems.append(f"{layout.manifest}: missing (has the job run?)")
        return verdict
    except orjson.JSONDecodeError as exc:
        verdict.problems.append(f"{layout.manifest}: not JSON ({exc})")
        return verdict
    listed = {entry["file"] for entry in manifest["shards"]}
    seen = SeenIds()
    for entry in manifest["shards"]:
        _check_shard(layout.root / entry["file"], entry, seen, verdict)
    open_shard = manifest.get("open_shard")
    for path in layout.shard_files():
        name = f"shards/{path.name}"
        if name in listed:
            continue
        if name == open_shard:
            verdict.notes.append(f"{path}: not sealed yet (a run was interrupted; run again)")
        else:
            verdict.notes.append(f"{path}: not in the manifest (an interrupted run's shard)")
        _check_shard(path, None, seen, verdict)
    return verdict


def _check_shard(path: Path, entry: dict[str, object] | None, seen: SeenIds, v: Verdict) -> None:
    if not path.exists():
        v.problems.append(f"{path}: listed in the manifest but missing")
        return
    v.shards += 1
    records = 0
    try:
        for number, line in enumerate(read_lines(path), start=1):
            if not line.endswith(b"\n"):
                v.problems.append(f"{path}:{number}: partial last line")
                break
            review_id = orjson.loads(line)["review_id"]
            if not seen.add(review_id):
                v.problems.append(f"{path}:{number}: review {review_id} appears twice")
            records += 1
    except (OSError, EOFError, orjson.JSONDecodeError, KeyError, ValueError) as exc:
        v.problems.append(f"{path}: unreadable ({type(exc).__name__}: {exc})")
    v.records += records
    if entry is None:
        return
    if entry["records"] != records:
        v.problems.append(f"{path}: {records} records, the manifest says {entry['records']}")
    if entry["bytes"] != path.stat().st_size:
        v.problems.append(
            f"{path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
        )
    if entry["sha256"] != sha256_of(path):
        v.problems.append(f"{path}: sha256 differs from the manifest")
