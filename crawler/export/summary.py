"""What an export did: shards exported and skipped, rows per table, what the records lacked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from crawler.export.records import Tally


@dataclass
class ExportSummary:
    to: str
    file_format: str
    reviewer: bool
    exported: int = 0  # shards exported by this run
    already: int = 0  # shards an earlier export did
    open_shards: int = 0  # not sealed yet: the next export after their run takes them
    rows: dict[str, int] = field(
        default_factory=lambda: {"reviews": 0, "review_media": 0, "product_snapshots": 0}
    )
    tally: Tally = field(default_factory=Tally)
    leftovers_removed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        reviews = self.rows["reviews"]
        return {
            "to": self.to,
            "format": self.file_format,
            "include_reviewer": self.reviewer,
            "shards": {
                "exported": self.exported,
                "already_exported": self.already,
                "open": self.open_shards,
                "failed": len(self.problems),
            },
            "rows": dict(self.rows),
            "nulls": dict(sorted(self.tally.nulls.items())),
            "wrong_type": dict(sorted(self.tally.wrong_type.items())),
            "unreadable_lines": self.tally.unreadable_lines,
            "leftovers_removed": self.leftovers_removed,
            "problems": self.problems,
            "seconds": round(self.seconds, 3),
            "reviews_per_second": round(reviews / self.seconds) if self.seconds > 0 else None,
        }

    def lines(self) -> list[str]:
        """The summary for a person: one line, and one per kind of gap when there are any."""
        rows = self.rows
        said = [
            f"{self.to}: {self.exported:,} shards exported ({self.file_format}), "
            f"{self.already:,} already were; {rows['reviews']:,} reviews, "
            f"{rows['review_media']:,} media, {rows['product_snapshots']:,} product snapshots "
            f"in {self.seconds:.1f} s"
        ]
        if self.open_shards:
            said.append(
                f"  {self.open_shards:,} open shards left for later: a run is under way or was "
                "interrupted; they are exported once it seals them"
            )
        if self.tally.wrong_type:
            found = ", ".join(f"{k} {n:,}" for k, n in sorted(self.tally.wrong_type.items()))
            said.append(f"  of another type than expected (made null): {found}")
        if self.tally.nulls:
            found = ", ".join(f"{k} {n:,}" for k, n in sorted(self.tally.nulls.items()))
            said.append(f"  nulls (missing or unreadable fields): {found}")
        if self.tally.unreadable_lines:
            said.append(f"  {self.tally.unreadable_lines:,} lines were not records: skipped")
        if self.leftovers_removed:
            said.append(
                f"  removed {len(self.leftovers_removed):,} unfinished files of an interrupted "
                "export"
            )
        said.extend(f"  problem: {p}" for p in self.problems)
        return said
