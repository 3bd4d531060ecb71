"""``crawler export``: a job's sealed shards -> reviews, review_media, product_snapshots, each
shard exported exactly once, to files named after it.

One shard at a time, a batch of rows at a time (one row group each): memory does not grow with
the shard or the job. A shard's three files are written whole at staged paths, fsynced, put in
place, and then the ledger counts the shard, so a kill at any instant leaves every visible file
whole, and the next export redoes only the shards the ledger does not list.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import orjson
import zstandard

from crawler.errors import ConfigError, StateError
from crawler.export.destination import Destination, destination_for
from crawler.export.ledger import Ledger
from crawler.export.records import Rows, Tally
from crawler.export.source import ShardChanged, ShardEntry, chunks
from crawler.export.summary import ExportSummary
from crawler.output.layout import Layout

if TYPE_CHECKING:
    from crawler.config import Job
    from crawler.export.from_bucket import BucketShards
    from crawler.export.tables import TableFile

BATCH = (
    4_096  # reviews per row group at least (a chunk's more): more costs time in the GC, and memory
)
FORMATS = ("parquet", "csv")
# what a shard that cannot be read gives (the file gone, cut, or not the compression it says)
_UNREADABLE = (ShardChanged, OSError, EOFError, zlib.error, zstandard.ZstdError)


@dataclass(frozen=True)
class ExportOptions:
    file_format: str = "parquet"
    to: str | None = None  # default: <output.dir>/export
    reviewer: bool = False  # reviewer name, user id and avatar: personal data, off by default


def export_job(job: Job, options: ExportOptions) -> ExportSummary:
    """Export every sealed shard not exported yet; the summary says what was done and lacked."""
    if options.file_format not in FORMATS:
        raise ConfigError(f"--format {options.file_format}: one of {', '.join(FORMATS)}")
    tables = _tables()
    layout = Layout(job.output.dir)
    bucket = _bucket_shards(job, layout)  # None: the job writes to a folder
    try:
        return _export(layout, bucket, tables, options, default_to=f"{job.output.bucket}/export")
    finally:
        if bucket is not None:
            bucket.close()


def _export(
    layout: Layout,
    bucket: BucketShards | None,
    tables: ModuleType,
    options: ExportOptions,
    *,
    default_to: str,
) -> ExportSummary:
    to = options.to or (default_to if bucket is not None else str(layout.root / "export"))
    destination = destination_for(to)
    if bucket is None:
        entries, open_shards = _manifest(layout)
    else:
        entries, open_shards = _parse(bucket.manifest(), f"{bucket.url}/manifest.json")
    summary = ExportSummary(destination.describe(), options.file_format, options.reviewer)
    summary.open_shards = open_shards
    started = time.perf_counter()
    summary.leftovers_removed = destination.begin()
    try:
        ledger = Ledger.load(destination, options.file_format, reviewer=options.reviewer)
        todo = [entry for entry in entries if not ledger.done(entry)]  # all checked first
        summary.already = len(entries) - len(todo)
        for entry in todo:
            path = bucket.path(entry) if bucket is not None else layout.root / entry.file
            shard = _Shard(entry, path, destination, tables, options)
            try:
                rows, tally = shard.export()
            except _UNREADABLE as exc:
                summary.problems.append(_unreadable(entry, path, exc))
                continue
            finally:
                if bucket is not None:
                    bucket.release(path)
            ledger.record(entry, rows, destination)
            summary.exported += 1
            summary.tally.add(tally)
            for table, count in rows.items():
                summary.rows[table] += count
    finally:
        destination.end()
        summary.seconds = time.perf_counter() - started
    return summary


def _tables() -> ModuleType:
    try:
        from crawler.export import tables  # noqa: PLC0415 -- pyarrow is the export extra's
    except ImportError as exc:
        raise ConfigError(
            f"crawler export needs pyarrow ({exc}): pip install 'crawler[export]'"
        ) from None
    return tables


def _bucket_shards(job: Job, layout: Layout) -> BucketShards | None:
    """A bucket job's shards (obstore imported only then); None for a folder's."""
    if job.output.bucket is None:
        return None
    from crawler.export.from_bucket import BucketShards  # noqa: PLC0415 -- the s3 extra's
    from crawler.pacing.retry import RetryPolicy  # noqa: PLC0415

    return BucketShards(job.output.bucket, layout, RetryPolicy.from_settings(job.api.retry))


def _manifest(layout: Layout) -> tuple[list[ShardEntry], int]:
    """The sealed shards, in the order written, and how many are open."""
    try:
        data: bytes | None = layout.manifest.read_bytes()
    except FileNotFoundError:
        data = None
    return _parse(data, str(layout.manifest))


def _parse(data: bytes | None, where: str) -> tuple[list[ShardEntry], int]:
    if data is None:
        raise StateError(f"{where}: missing: the job has not run yet (or not to its first commit)")
    try:
        doc = orjson.loads(data)
        entries = [
            ShardEntry(str(s["file"]), int(s["records"]), int(s["bytes"]), str(s["sha256"]))
            for s in doc["shards"]
        ]
        return entries, len(doc.get("open_shards", []))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise StateError(f"{where}: unreadable ({type(exc).__name__})") from None


def _unreadable(entry: ShardEntry, path: Path, exc: BaseException) -> str:
    if isinstance(exc, ShardChanged):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"{path}: listed in the manifest but missing; not exported"
    return f"{path}: unreadable ({type(exc).__name__}: {exc}); not exported"


class _Shard:
    """One sealed shard's export: three staged files, filled a batch at a time, then put."""

    def __init__(
        self,
        entry: ShardEntry,
        path: Path,
        destination: Destination,
        tables: ModuleType,
        options: ExportOptions,
    ) -> None:
        self.entry = entry
        self.path = path
        self.destination = destination
        self.tables = tables
        self.options = options
        tail = entry.stem.removeprefix("reviews-")
        suffix = tables.SUFFIX[options.file_format]
        self.names = {t: f"{t}/{t}-{tail}{suffix}" for t in tables.TABLES}
        self.tally = Tally()

    def export(self) -> tuple[dict[str, int], Tally]:
        files: dict[str, TableFile] = {}
        try:
            for table, name in self.names.items():
                schema = self.tables.schema(table, reviewer=self.options.reviewer)
                staged = self.destination.staging(name)
                files[table] = self.tables.TableFile(staged, schema, self.options.file_format)
            rows = self._rows()
            for chunk in chunks(self.path, self.entry):
                rows.add_lines(chunk)
                if len(rows) >= BATCH:
                    self._flush(rows, files)
                    rows = self._rows()
            self._flush(rows, files)
            for one in files.values():
                one.close()
        except BaseException:
            for one in files.values():
                one.abandon()
            raise
        for table, one in files.items():
            self.destination.put(one.path, self.names[table])
        return {table: one.rows for table, one in files.items()}, self.tally

    def _rows(self) -> Rows:
        return Rows(self.entry.name, reviewer=self.options.reviewer)

    def _flush(self, rows: Rows, files: dict[str, TableFile]) -> None:
        for table, columns in zip(self.tables.TABLES, rows.tables(), strict=True):
            for column, nulled in files[table].write(columns).items():
                rows.tally.wrong_type[f"{table}.{column}"] += nulled
                rows.tally.nulls[f"{table}.{column}"] += nulled
        self.tally.add(rows.tally)
