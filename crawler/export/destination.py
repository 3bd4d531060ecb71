"""Where an export's files go: the seam between writing a finished file and making it visible.

The exporter writes each file whole at ``staging(name)``, then ``put``s it: from then on, and
only then, a reader sees it under ``name``. ``LocalFolder`` stages beside the final name and
renames (fsynced before and after); an object store would stage in a local folder and upload
(an object appears whole or not at all), with the same two calls and ``read``/``write`` for the
export's small ledger: ``to_bucket.BucketDestination`` for ``s3://``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Protocol

from crawler.errors import ConfigError, OutputError
from crawler.output.layout import fsync_dir, hold, write_atomically

_LOCK = "_export.lock"


class Destination(Protocol):
    """What the exporter needs of the place its files go."""

    def describe(self) -> str: ...

    def staging(self, name: str) -> Path:
        """A local path to write ``name`` to before it is put; invisible to readers."""
        ...

    def put(self, staged: Path, name: str) -> None:
        """Make the staged file visible as ``name``, whole (replacing one already there)."""
        ...

    def read(self, name: str) -> bytes | None: ...

    def write(self, name: str, data: bytes) -> None:
        """A small file written whole or not at all (the ledger)."""
        ...

    def begin(self) -> list[str]:
        """Take the destination for this export (exit 2 if another holds it); remove what an
        interrupted export left staged; the names removed."""
        ...

    def end(self) -> None: ...


def destination_for(to: str) -> Destination:
    """``--to``: a folder, or an S3-compatible bucket (``s3://bucket/prefix``)."""
    scheme, sep, _ = to.partition("://")
    if scheme == "s3" and sep:
        from crawler.export.to_bucket import BucketDestination  # noqa: PLC0415 -- obstore's

        return BucketDestination(to)
    if sep and scheme:
        raise ConfigError(
            f"--to {to}: exporting to {scheme}:// is not supported yet; export to a local "
            "folder (--to DIR) and copy it, e.g. with `aws s3 sync DIR s3://...`"
        )
    return LocalFolder(Path(to))


class LocalFolder:
    """Files in a folder: staged as hidden ``.NAME.PID.tmp`` beside the final name, renamed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock: int | None = None

    def describe(self) -> str:
        return str(self.root)

    def staging(self, name: str) -> Path:
        final = self.root / name
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError.from_os(exc, final.parent) from None
        return final.with_name(f".{final.name}.{os.getpid()}.tmp")

    def put(self, staged: Path, name: str) -> None:
        final = self.root / name
        try:
            os.replace(staged, final)  # the staged file was fsynced when it was closed
            fsync_dir(final.parent)
        except OSError as exc:
            raise OutputError.from_os(exc, final) from None

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        write_atomically(self.root / name, data)

    def begin(self) -> list[str]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError.from_os(exc, self.root) from None
        self._lock = hold(self.root / _LOCK)
        if self._lock is None:
            raise ConfigError(f"{self.root}: another `crawler export` is writing here; wait for it")
        removed: list[str] = []
        # staged files of an export that was killed: under the lock, none is another's
        for leftover in sorted(self.root.glob("*/.*.tmp")) + sorted(self.root.glob("*.tmp")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
                removed.append(str(leftover.relative_to(self.root)))
        return removed

    def end(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
