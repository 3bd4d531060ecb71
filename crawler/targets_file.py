"""A targets file read into a ``Collector``: a CSV with a header naming ``product_id`` and
``region`` (and optionally ``max_pages``), or a plain list of product ids combined with
``default_regions``; each bad row named with its line."""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal, TextIO

from crawler.targets import (
    MAX_PAGES,
    REGION_INDEX,
    Collector,
    check_product_id,
    check_region,
    quoted,
)


def read_targets_file(
    path: Path, default_regions: Sequence[str] | None, into: Collector, *, shown: str
) -> None:
    """Add every target of a CSV or plain-text targets file; bad rows go to ``into.errors``.

    ``shown`` is how the file is named in messages (as the job file gives it). The file is
    streamed, never held whole: a million rows are tens of megabytes of text.
    """
    try:
        # utf-8-sig: a BOM, as spreadsheets write, is fine
        with path.open(encoding="utf-8-sig", newline="") as file:
            first = next((line for line in file if line.strip()), "")
            file.seek(0)
            delimiter = _delimiter(first)
            if delimiter is not None:
                _read_csv(file, shown, default_regions, into, delimiter)
            else:
                _read_list(file, shown, default_regions, into)
    except OSError as exc:
        into.problem(f"{shown}: cannot read targets_file: {exc.strerror}")
    except UnicodeDecodeError as exc:
        into.problem(f"{shown}: not UTF-8 text ({exc.reason} at byte {exc.start} of a block)")


_DELIMITERS = (",", ";", "\t")  # a spreadsheet saves ; where the decimal mark is a comma


def _delimiter(first: str) -> str | None:
    """The delimiter of a CSV whose header (``first``) names product_id; None: a list of ids."""
    naming = [
        d
        for d in _DELIMITERS
        if "product_id" in (name.strip().strip('"').lower() for name in first.split(d))
    ]
    # a header of product_id alone is split alike by each: the one that splits it most
    return max(naming, key=lambda d: len(first.split(d))) if naming else None


def _read_csv(
    file: TextIO,
    shown: str,
    default_regions: Sequence[str] | None,
    into: Collector,
    delimiter: str = ",",
) -> None:
    reader = csv.reader(file, delimiter=delimiter)
    line = 0  # where the last record read ends: the next one starts on the line after
    try:
        header = _header(reader)
        line = reader.line_num
        columns = {name: index for index, name in enumerate(header)}
        names = ("product_id", "region", "max_pages")
        at_id, at_region, at_cap = (columns.get(n, -1) for n in names)
        if at_region < 0 and not default_regions:
            into.problem(
                f"{shown}:{line}: the header names no 'region' column; add one, or give "
                "default_regions in the job file"
            )
            return
        width = max(at_id, at_region) + 1  # an optional column left off the end is empty
        source = into.source(f"{shown}:{{}}", "line {}")
        fixed = tuple(REGION_INDEX[r] for r in default_regions or ())
        regions_index, add = REGION_INDEX, into.add
        for row in reader:  # the per-row path: a million rows, so checks are inlined
            line = reader.line_num
            if len(row) < width:
                if any(cell.strip() for cell in row):
                    into.problem(f"{shown}:{line}: {len(row)} columns, too few for the header")
                continue
            product_id = row[at_id].strip()
            if not (product_id.isdigit() and product_id.isascii()):
                into.problem(f"{shown}:{line}: product_id: {check_product_id(product_id)}")
                continue
            cap: int | Literal[False] | None = None
            if 0 <= at_cap < len(row) and (cell := row[at_cap].strip()):
                cap = _cap(cell, f"{shown}:{line}", into)
                if cap is False:
                    continue
            if at_region < 0:
                for fixed_region in fixed:
                    add(product_id, fixed_region, cap, source, line)
                continue
            region = row[at_region].strip()
            if (index := regions_index.get(region)) is None:
                into.problem(f"{shown}:{line}: region: {check_region(region)}")
                continue
            add(product_id, index, cap, source, line)
    except csv.Error as exc:
        into.problem(_unreadable(shown, line + 1, reader.line_num, exc))


def _header(reader: Iterator[list[str]]) -> list[str]:
    """The first row that is not blank, its names as they are matched."""
    for row in reader:
        if any(cell.strip() for cell in row):
            return [name.strip().lower() for name in row]
    return []


def _unreadable(shown: str, start: int, at: int, exc: csv.Error) -> str:
    """What to say of a record the csv module refuses (from ``start`` to line ``at``)."""
    if "field larger than field limit" in str(exc):
        # the limit stays csv's default: a product id is 20 digits, a cell this long a mistake
        spans = f" (up to line {at}: a quote left open?)" if at > start else ""
        return (
            f"{shown}:{start}: a field of more than {csv.field_size_limit():,} characters"
            f"{spans}; the file is not read past it"
        )
    return f"{shown}:{start}: not readable as CSV ({exc}); the file is not read past it"


def _cap(value: str, where: str, into: Collector) -> int | Literal[False] | None:
    """The row's max_pages: None when empty, False (after reporting) when it is bad."""
    if not value:
        return None
    digits = value.lstrip("0")
    if not (value.isascii() and value.isdigit() and digits):
        into.problem(f"{where}: max_pages: {quoted(value)} is not a whole number above 0")
        return False
    if len(digits) > len(str(MAX_PAGES)) or int(digits) > MAX_PAGES:  # int() of 5,000 digits raises
        into.problem(
            f"{where}: max_pages: {quoted(value)} is more than {MAX_PAGES}, the most it may be"
        )
        return False
    return int(digits)


def _read_list(
    file: TextIO, shown: str, default_regions: Sequence[str] | None, into: Collector
) -> None:
    if not default_regions:
        into.problem(
            f"{shown}: a plain list of product ids needs default_regions in the job file "
            "(or make it a CSV with a header row naming product_id and region)"
        )
        return
    source = into.source(f"{shown}:{{}}", "line {}")
    for number, line in enumerate(file, start=1):
        product_id = line.strip()
        if not product_id or product_id.startswith("#"):
            continue
        if (why := check_product_id(product_id)) is not None:
            hint = (
                "; a CSV needs a header row naming product_id"
                if any(d in product_id for d in _DELIMITERS)
                else ""
            )
            into.problem(f"{shown}:{number}: product_id: {why}{hint}")
            continue
        for region in default_regions:
            into.add(product_id, REGION_INDEX[region], None, source, number)
