"""The export's ledger (``_exported.json``): the settings of the folder, and each shard exported.

A shard is exported once its three files are put and its line is in the ledger, written whole
after them. A shard whose files were put but whose line is missing (a kill between the two) is
exported again: its files come out the same, and replace the ones there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from crawler.errors import StateError
from crawler.export.destination import Destination
from crawler.export.source import ShardEntry

NAME = "_exported.json"
VERSION = 1


@dataclass
class Ledger:
    file_format: str
    reviewer: bool
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)  # by shard file

    @classmethod
    def load(cls, destination: Destination, file_format: str, *, reviewer: bool) -> Ledger:
        """The folder's ledger; a new one if none. StateError: a folder exported otherwise."""
        where = f"{destination.describe()}/{NAME}"
        data = destination.read(NAME)
        if data is None:
            return cls(file_format, reviewer)
        try:
            doc = orjson.loads(data)
            ledger = cls(doc["format"], bool(doc["include_reviewer"]), dict(doc["shards"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise StateError(
                f"{where}: unreadable ({type(exc).__name__}); it says which shards are exported: "
                "remove the folder to export every shard again"
            ) from None
        if (ledger.file_format, ledger.reviewer) != (file_format, reviewer):
            raise StateError(
                f"{where}: this folder was exported with --format {ledger.file_format}"
                f"{' --include-reviewer' if ledger.reviewer else ''}; export with the same "
                "options, or to another folder (--to DIR), so no table mixes two kinds of files"
            )
        return ledger

    def done(self, entry: ShardEntry) -> bool:
        """Whether the shard is exported; StateError if one of its name was, with other bytes."""
        seen = self.shards.get(entry.file)
        if seen is None:
            return False
        if seen.get("sha256") != entry.sha256:
            raise StateError(
                f"{entry.file} was exported before with other contents (sha256 "
                f"{str(seen.get('sha256'))[:12]}..., now {entry.sha256[:12]}...): the job was "
                "started over (--fresh) since; export to another folder (--to DIR), or remove "
                "this one"
            )
        return True

    def record(self, entry: ShardEntry, rows: dict[str, int], destination: Destination) -> None:
        self.shards[entry.file] = {
            "sha256": entry.sha256,
            "rows": rows,
            "exported_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        doc = {
            "version": VERSION,
            "format": self.file_format,
            "include_reviewer": self.reviewer,
            "shards": self.shards,
        }
        destination.write(NAME, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
