"""What a person reads, fit to the terminal: honest plurals, lines broken between their parts,
and tables whose columns are chosen by priority to fit the width."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

NARROWEST = 40  # below this a terminal is taken to be 80 wide: a guess beats a column a line
GAP = "  "


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 problem``, ``2 problems``, ``1,000 reviews``: the count with its noun agreeing."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


def width_of(stream: TextIO | None) -> int:
    """The columns of the terminal ``stream`` is on; 80 when it is not one (a file, a pipe):
    what a person reads later is read at 80 too. ``COLUMNS`` overrides, as in most tools."""
    given = os.environ.get("COLUMNS", "")
    if given.isdigit() and int(given) >= NARROWEST:
        return int(given)
    try:
        columns = os.get_terminal_size(stream.fileno()).columns if stream is not None else 0
    except (OSError, ValueError, AttributeError):
        columns = 0
    return columns if columns >= NARROWEST else 80


def cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, an ellipsis where it was cut."""
    if len(text) <= width:
        return text
    return text[: max(0, width - 1)] + "…"


def lines(parts: Iterable[str], width: int, *, lead: str = "", sep: str = ", ") -> list[str]:
    """``parts`` joined by ``sep`` into lines of at most ``width``, broken only between parts:
    the first line starts with ``lead``, the next ones are indented as deep (four spaces when
    the lead is long, a path say); a part longer than a whole line is cut."""
    indent = " " * (len(lead) if len(lead) <= width // 3 else 4)
    out: list[str] = []
    line, empty = lead, True
    for part in parts:
        joined = line + part if empty else line + sep + part
        if empty or len(joined) <= width:
            line = cut(joined, width)
        else:
            out.append(line + sep.rstrip())
            line = cut(indent + part, width)
        empty = False
    out.append(line)
    return out


def fit_parts(parts: Sequence[tuple[int, str]], width: int, *, sep: str = GAP) -> str:
    """One line of ``(priority, text)`` parts in their order, the highest numbers left out
    first until it fits ``width`` (then cut); empty parts are skipped."""
    kept = [(p, text) for p, text in parts if text]
    while len(sep.join(t for _, t in kept)) > width and any(p for p, _ in kept):
        drop = max(range(len(kept)), key=lambda i: (kept[i][0], i))
        del kept[drop]
    return cut(sep.join(t for _, t in kept), width)


def prose(text: str, width: int, *, lead: str = "") -> list[str]:
    """A sentence in lines of at most ``width``, broken between words."""
    return lines(text.split(), width, lead=lead, sep=" ")


Cell = Callable[[dict[str, Any]], str]


@dataclass(frozen=True)
class Column:
    """One column a table may show: the lower its priority number, the later it is dropped
    when the terminal is narrow. A ``flexible`` column takes the width left over and is cut
    (never wrapped) down to ``least`` characters."""

    header: str
    cell: Cell
    priority: int
    right: bool = False  # numbers are right-aligned
    flexible: bool = False
    least: int = 0


def figure(name: str) -> Column:
    """A count column: the row's ``name`` with thousands separators, 0 for nothing yet."""
    return Column(name, lambda row: f"{row.get(name) or 0:,}", priority=50, right=True)


def with_priority(column: Column, priority: int) -> Column:
    return Column(column.header, column.cell, priority, column.right, column.flexible, column.least)


def choose(columns: Sequence[Column], cells: list[list[str]], width: int) -> list[int]:
    """The indexes of the columns shown: by priority while they fit (in the order given)."""
    natural = [max([len(c.header), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    needed = [min(natural[i], max(c.least, len(c.header))) if c.flexible else natural[i]
              for i, c in enumerate(columns)]  # fmt: skip
    shown: list[int] = []
    used = 0
    for i in sorted(range(len(columns)), key=lambda i: (columns[i].priority, i)):
        extra = needed[i] + (len(GAP) if shown else 0)
        if used + extra <= width:
            shown.append(i)
            used += extra
    return sorted(shown)


def table(
    columns: Sequence[Column], rows: Iterable[dict[str, Any]], width: int, *, title: str = ""
) -> list[str]:
    """``rows`` as lines of at most ``width``: a title, a header, one line per row; the
    columns that do not fit are left out (``--csv`` and ``--json`` have every figure)."""
    cells = [[c.cell(row) for c in columns] for row in rows]
    shown = choose(columns, cells, width)
    widths = {i: max([len(columns[i].header), *(len(r[i]) for r in cells)]) for i in shown}
    fixed = sum(widths[i] for i in shown if not columns[i].flexible)
    gaps = len(GAP) * (len(shown) - 1)
    flexible = [i for i in shown if columns[i].flexible]
    for i in flexible:  # the width left, shared by the flexible columns
        room = max(columns[i].least, (width - fixed - gaps) // len(flexible))
        widths[i] = min(widths[i], room)

    def line(texts: Sequence[str]) -> str:
        parts = []
        for i in shown:
            text = cut(texts[i], widths[i])
            parts.append(text.rjust(widths[i]) if columns[i].right else text.ljust(widths[i]))
        return cut(GAP.join(parts).rstrip(), width)

    out = [title] if title else []
    out.append(line([c.header for c in columns]))
    out += [line(r) for r in cells]
    return out
