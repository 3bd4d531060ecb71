"""A job's saved state read from its SQLite file, read-only: for status, plan and the run report."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

from crawler.errors import StateError
from crawler.output.layout import Layout
from crawler.state import rules
from crawler.state.connection import error_of
from crawler.state.model import Ledger, ShardInfo, Totals
from crawler.state.schema import job_row
from crawler.state.table import totals_of
from crawler.state.verdict import MISSING_SQL


class SqliteView:
    """A job's saved state, read-only: for status, plan and the run report, beside a run or not
    (WAL lets readers and the one writer go on together)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.job = job_row(db)
        self.walking = False  # one process stores its own stopped_budget at a budget stop
        self.budget_stopped = False

    @classmethod
    def open(cls, layout: Layout) -> SqliteView | None:
        """None before the job's first run."""
        if not layout.state_db.exists():
            if layout.old_snapshot.exists():
                raise StateError(f"{layout.old_snapshot}: state saved by an older crawler")
            return None
        try:
            db = sqlite3.connect(
                f"file:{layout.state_db}?mode=ro", uri=True, check_same_thread=False
            )
            return cls(db)
        except sqlite3.Error as exc:
            raise error_of(exc, layout.state_db) from None

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.job["leased"], self.job["credits"], self.job["forfeited"])

    def totals(self) -> Totals:
        return totals_of(self._db)

    def shards(self) -> list[ShardInfo]:
        query = "SELECT file, records, bytes, sha256 FROM shards ORDER BY seq"
        return [ShardInfo(*row) for row in self._db.execute(query)]

    def last_run(self) -> dict[str, Any] | None:
        runs = self._dicts("SELECT * FROM runs ORDER BY id DESC LIMIT 1", ())
        return runs[0] if runs else None

    def refreshes(self) -> list[dict[str, Any]]:
        """Per refresh: targets it covered, how many changed, new reviews, credits, pages
        (``rules.refresh_figures``, kept as they happened: a later refresh changes none)."""
        return self._dicts(
            f"SELECT id AS refresh, mode, started_at, {', '.join(rules.REFRESH_FIGURES)} "  # noqa: S608 -- ours
            "FROM refreshes ORDER BY id",
            (),
        )

    def attention(self, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` targets a person should look at: failed first, then those whose feed
        ended short of its count, then stopped at a credit cap, then walks under way."""
        rows: list[dict[str, Any]] = []
        for where in (
            "status = 'failed'",
            "status = 'done' AND verdict = 'short'",
            "status = 'stopped_budget' AND walk_pages > 0",
            "status = 'pending' AND walk_pages > 0",
        ):
            if len(rows) >= limit:
                break
            rows += self._dicts(
                f"SELECT *, {MISSING_SQL} AS missing FROM targets "  # noqa: S608 -- ours
                f"WHERE active AND {where} ORDER BY id LIMIT ?",
                (limit - len(rows),),
            )
        return rows

    def rows(self, columns: tuple[str, ...]) -> Iterator[tuple[Any, ...]]:
        """Every active target's ``columns``, in the order first listed; a million in a few
        seconds (seconds rounded to milliseconds)."""
        chosen = ", ".join(_SELECTED.get(c, c) for c in columns)
        yield from self._db.execute(
            f"SELECT {chosen} FROM targets WHERE active ORDER BY id"  # noqa: S608 -- ours
        )

    def sources(self) -> list[dict[str, Any]]:
        """Per source: its targets, those done, pages, products found, items, credits."""
        if self.job["version"] < 5:  # a state no run of this version has opened yet
            return []
        return self._dicts(
            "SELECT source, count(*) AS targets, sum(status = 'done') AS targets_done, "
            "sum(pages) AS pages, sum(found) AS products_found, sum(records) AS items, "
            "sum(credits) AS credits, sum(status = 'failed') AS failed "
            "FROM source_targets WHERE active GROUP BY source ORDER BY min(id)",
            (),
        )

    def _dicts(self, query: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        cursor = self._db.execute(query, args)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor]

    def close(self) -> None:
        self._db.close()


_SELECTED = {"seconds": "round(seconds, 3)", "missing": MISSING_SQL}
