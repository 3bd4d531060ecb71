"""The three tables' types, and one table file (Parquet or CSV) written a row group at a time.

The only module that imports pyarrow (the ``export`` extra): pyarrow writes Parquet row group by
row group and CSV batch by batch, so a shard of any size costs one batch of memory.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from crawler.export.records import (
    MEDIA_COLUMNS,
    REVIEW_COLUMNS,
    REVIEWER_COLUMNS,
    SNAPSHOT_COLUMNS,
)

_TIME = pa.timestamp("ms", tz="UTC")
_TYPES: dict[str, pa.DataType] = {
    "product_id": pa.string(),
    "region": pa.string(),
    "review_id": pa.string(),
    "rating": pa.int32(),
    "text": pa.string(),
    "title": pa.string(),
    "review_time": _TIME,
    "sku_id": pa.string(),
    "sku_specification": pa.string(),
    "likes": pa.int64(),
    "is_anonymous": pa.bool_(),
    "review_source_name": pa.string(),
    "country": pa.string(),
    "image_count": pa.int32(),
    "has_media": pa.bool_(),
    "is_updated": pa.bool_(),
    "harvested_at": _TIME,
    "shard": pa.string(),
    "reviewer_name": pa.string(),
    "reviewer_user_id": pa.string(),
    "reviewer_avatar": pa.string(),
    "position": pa.int32(),
    "kind": pa.string(),
    "url": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "review_count": pa.int64(),
    "product_rating": pa.float64(),
}
TABLES = ("reviews", "review_media", "product_snapshots")
SUFFIX = {"parquet": ".parquet", "csv": ".csv"}


def schema(table: str, *, reviewer: bool) -> pa.Schema:
    columns = {
        "reviews": REVIEW_COLUMNS + (REVIEWER_COLUMNS if reviewer else ()),
        "review_media": MEDIA_COLUMNS,
        "product_snapshots": SNAPSHOT_COLUMNS,
    }[table]
    return pa.schema([pa.field(name, _TYPES[name]) for name in columns])


class TableFile:
    """One table's file for one shard, at a temporary path: ``write`` a batch (one row group),
    ``close`` flushes and fsyncs it; only then may it be put where readers look."""

    def __init__(self, path: Path, table_schema: pa.Schema, file_format: str) -> None:
        self.path = path
        self.rows = 0
        self._schema = table_schema
        self._sink = path.open("wb")
        self._writer: Any
        if file_format == "parquet":
            self._writer = pq.ParquetWriter(self._sink, table_schema, compression="zstd")
        else:
            self._writer = pa_csv.CSVWriter(self._sink, table_schema)

    def write(self, columns: dict[str, list[Any]]) -> dict[str, int]:
        """One batch, one row group; the values each column could not hold (an integer too
        large for it) are written as nulls, and counted here by column."""
        arrays, nulled = [], {}
        for column in self._schema:
            values = columns[column.name]
            try:
                arrays.append(pa.array(values, type=column.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                held = [v if _fits(v, column.type) else None for v in values]
                nulled[column.name] = held.count(None) - values.count(None)
                arrays.append(pa.array(held, type=column.type))
        batch = pa.RecordBatch.from_arrays(arrays, schema=self._schema)
        if batch.num_rows:  # a file of no rows still says its columns (written at close)
            self._writer.write_batch(batch)
        self.rows += batch.num_rows
        return nulled

    def close(self) -> None:
        self._writer.close()
        self._sink.flush()
        os.fsync(self._sink.fileno())
        self._sink.close()

    def abandon(self) -> None:
        """Close without keeping: an error or a failed shard check."""
        with contextlib.suppress(Exception):  # the error that brought us here is what counts
            self._writer.close()
        self._sink.close()
        self.path.unlink(missing_ok=True)


def _fits(value: Any, kind: pa.DataType) -> bool:
    try:
        pa.array([value], type=kind)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return False
    return True
