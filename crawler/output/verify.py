"""Checks a job's shards against its manifest, and that no review id (nor an endpoint's item
id in its own series) appears twice."""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from crawler.errors import StateError
from crawler.output.dedup import SeenIds
from crawler.output.layout import Layout
from crawler.output.shards import read_lines, sha256_of
from crawler.state.sqlite import SqliteView

if TYPE_CHECKING:
    from crawler.output.bucket import Bucket


@dataclass
class Verdict:
    shards: int = 0
    records: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def verify_bucket(bucket: Bucket) -> Verdict:
    """A bucket checked as a folder is: every object its manifest lists, as listed (records,
    bytes, sha256), fetched into a temporary folder one at a time, no review id twice across
    them (nor an item id across a series' objects); objects it does not list, and parts of
    open shards, are noted."""
    from crawler.output.publisher import MANIFEST, PARTS  # noqa: PLC0415 -- a bucket's only

    where = str(bucket.url)
    verdict = Verdict()
    found = await bucket.get(MANIFEST)
    if found is None:
        verdict.problems.append(f"{where}/{MANIFEST}: missing (has the job run?)")
        return verdict
    try:
        doc = orjson.loads(found[0])
        # the reviews' objects, then each source endpoint's series (its items by item_id)
        listings = [("review_id", doc["shards"])] + [
            ("item_id", series["shards"]) for _, series in sorted(doc.get("series", {}).items())
        ]
        listed = [(entry["file"], entry) for _, shards in listings for entry in shards]
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        verdict.problems.append(f"{where}/{MANIFEST}: not a manifest ({exc})")
        return verdict
    counts = Counter(name for name, _ in listed)
    for name in sorted(name for name, count in counts.items() if count > 1):
        # a reader following the manifest would read that object's records twice
        verdict.problems.append(f"{where}/{MANIFEST}: {name} listed twice or more")
    with tempfile.TemporaryDirectory(prefix="crawler-verify-") as tmp:
        for key, shards in listings:
            seen = SeenIds()
            for name, entry in {entry["file"]: entry for entry in shards}.items():
                shard = await bucket.get(name)
                if shard is None:
                    verdict.problems.append(f"{where}/{name}: listed in the manifest but missing")
                    continue
                path = Path(tmp) / name.replace("/", "_")
                path.write_bytes(shard[0])  # one shard on disk at a time
                problems = len(verdict.problems)
                _check_shard(path, entry, seen, verdict, key=key)
                verdict.problems[problems:] = [
                    p.replace(str(path), f"{where}/{name}") for p in verdict.problems[problems:]
                ]
                path.unlink()
    for key, _ in await bucket.list("shards/"):
        if key not in counts:
            verdict.notes.append(f"{where}/{key}: not in the manifest")
    for shard_file in sorted({key.split("/")[1] for key, _ in await bucket.list(PARTS)}):
        verdict.notes.append(
            f"{where}/{PARTS}{shard_file}/: parts of an open shard (a run is under way or was "
            "interrupted)"
        )
    return verdict


def verify(layout: Layout) -> Verdict:
    verdict = Verdict()
    _check_committed_length(layout, verdict)
    try:
        manifest = orjson.loads(layout.manifest.read_bytes())
    except FileNotFoundError:
        verdict.problems.append(f"{layout.manifest}: missing (has the job run?)")
        return verdict
    except orjson.JSONDecodeError as exc:
        verdict.problems.append(f"{layout.manifest}: not JSON ({exc})")
        return verdict
    listed = _check_listing(layout, manifest, "review_id", "reviews", verdict)
    for name, series in sorted(manifest.get("series", {}).items()):  # a source's items
        listed |= _check_listing(layout, series, "item_id", f"{name} items", verdict)
    on_disk = [*layout.shard_files(), *layout.series_files(None)]
    for path in on_disk:
        if f"shards/{path.name}" not in listed:
            verdict.notes.append(f"{path}: not in the manifest (an interrupted run's leftover)")
    return verdict


def _check_committed_length(layout: Layout, verdict: Verdict) -> None:
    """The open shard against the length the state committed (the manifest's is that of the
    last seal, often 0): a file cut below it is what the next run refuses, so verify says so
    too, in the same words. A one-process job's state only (a coordinated job's is in Redis)."""
    try:
        view = SqliteView.open(layout)
    except StateError as exc:
        verdict.notes.append(f"the committed length of the open shard was not checked: {exc}")
        return
    if view is None:
        return
    try:
        name, committed = view.job["open_shard"], view.job["shard_bytes"]
    finally:
        view.close()
    path = layout.shard(name) if name else None
    size = path.stat().st_size if path is not None and path.exists() else 0
    if path is not None and size < committed:
        verdict.problems.append(
            f"{path}: {size:,} bytes, the state committed {committed:,}: the file was cut or "
            "replaced since; put the original back (a backup, another copy)"
        )


def _check_listing(
    layout: Layout, listing: dict[str, Any], key: str, what: str, verdict: Verdict
) -> set[str]:
    """One series' shards (the reviews', or an endpoint's): each as listed, each id once; the
    files it lists."""
    seen = SeenIds()
    for entry in listing["shards"]:
        _check_shard(layout.root / entry["file"], entry, seen, verdict, key=key)
    opened = {entry["file"]: entry for entry in listing.get("open_shards", [])}
    for name, entry in opened.items():  # only what is committed of them counts
        path = layout.root / name
        verdict.notes.append(
            f"{path}: open, {entry['records']:,} {what} committed so far (a run is under way or "
            "was interrupted)"
        )
        limit = entry["bytes"]
        _check_shard(path, {**entry, "sha256": None}, seen, verdict, key=key, limit=limit)
    return {entry["file"] for entry in listing["shards"]} | set(opened)


def _check_shard(
    path: Path,
    entry: dict[str, Any],
    seen: SeenIds,
    v: Verdict,
    *,
    key: str,
    limit: int | None = None,
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
            record_id = orjson.loads(line)[key]
            if not seen.add(record_id):
                v.problems.append(f"{path}:{number}: {key} {record_id} appears twice")
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
