"""Checks a job's shards against its manifest, and that no review id appears twice."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from crawler.output.dedup import SeenIds
from crawler.output.layout import Layout
from crawler.output.shards import read_lines, sha256_of


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
    opened = {entry["file"]: entry for entry in manifest.get("open_shards", [])}
    for name, entry in opened.items():  # only what is committed of them counts
        path = layout.root / name
        verdict.notes.append(
            f"{path}: open, {entry['records']:,} reviews committed so far (a run is under way or "
            "was interrupted)"
        )
        _check_shard(path, {**entry, "sha256": None}, seen, verdict, limit=entry["bytes"])
    for path in layout.shard_files():
        name = f"shards/{path.name}"
        if name not in listed and name not in opened:
            verdict.notes.append(f"{path}: not in the manifest (an interrupted run's leftover)")
    return verdict


def _check_shard(
    path: Path, entry: dict[str, Any], seen: SeenIds, v: Verdict, *, limit: int | None = None
) -> None:
    if not path.exists():
        v.problems.append(f"{path}: listed in the manifest but missing")
        return
    v.shards += 1
    records = 0
    try:
        for number, line in enumerate(read_lines(path, limit), start=1):
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
    if entry["records"] != records:
        v.problems.append(f"{path}: {records} records, the manifest says {entry['records']}")
    size = path.stat().st_size
    if (limit is None and entry["bytes"] != size) or (limit is not None and size < limit):
        v.problems.append(f"{path}: {size} bytes, the manifest says {entry['bytes']}")
    if entry["sha256"] is not None and entry["sha256"] != sha256_of(path):
        v.problems.append(f"{path}: sha256 differs from the manifest")
