"""One change of a coordinated job's state: the checks and writes the APPLY script runs whole.

A rule (``crawler.state.rules``) decides a change from what it read; the change carries what it
read as checks, so that Redis applies it only if nothing moved meanwhile.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import orjson

from crawler.state.events import Finish, Status
from crawler.state.model import Sums, TargetState, Totals
from crawler.state.verdict import Verdict


@dataclass
class Writes:
    """Checks (key, field, value read: '' for absent) and commands, in order."""

    checks: list[list[str]] = field(default_factory=list)
    ops: list[list[str]] = field(default_factory=list)

    def check(self, key: str, name: str, value: object | None) -> None:
        self.checks.append([key, name, "" if value is None else str(value)])

    def op(self, *command: object) -> None:
        self.ops.append([str(part) for part in command])

    def unless(self, key: str, name: str, value: object, *command: object) -> None:
        """``command`` only if the field no longer holds ``value`` when the change is applied."""
        self.ops.append(["UNLESS", key, name, str(value), *(str(part) for part in command)])

    def members(self, command: str, key: str, members: list[str], chunk: int = 1000) -> None:
        """A set command over many members, in commands Lua can unpack."""
        for start in range(0, len(members), chunk):
            self.op(command, key, *members[start : start + chunk])


def flat(totals: Totals) -> dict[str, float]:
    """A Totals as the fields of the ``totals`` hash: ``<status>|<figure>``, zeros left out."""
    out: dict[str, float] = {}
    for status, sums in totals.by_status.items():
        for name, value in asdict(sums).items():
            if value:
                out[f"{status}|{name}"] = value
    return out


def totals_from(fields: dict[str, str]) -> Totals:
    totals = Totals()
    for name, value in fields.items():
        status, _, figure = name.partition("|")
        sums: Sums = totals.by_status[Status(status)]
        number = float(value)
        setattr(sums, figure, number if figure == "seconds" else round(number))
    return totals


_DEFAULTS = asdict(TargetState(0))


def doc_of(state: TargetState, max_pages: int | None, active: bool = True) -> str:
    """A target as Redis keeps it: what differs from a new target's state (a million new
    targets are then a few bytes each), its cap, and ``off`` once the job file drops it."""
    doc: dict[str, object] = {
        k: v for k, v in asdict(state).items() if k != "id" and v != _DEFAULTS[k]
    }
    if max_pages is not None:
        doc["max_pages"] = max_pages
    if not active:
        doc["off"] = 1
    return orjson.dumps(doc).decode()


def parse_doc(raw: str, local_id: int) -> tuple[TargetState, int | None, bool]:
    """(state, cap, whether the job file dropped it) from ``doc_of``'s text."""
    doc = orjson.loads(raw)
    max_pages = doc.pop("max_pages", None)
    off = bool(doc.pop("off", False))
    state = TargetState(local_id, **doc)
    state.status = Status(state.status)
    state.finish = Finish(state.finish) if state.finish else None
    state.verdict = Verdict(state.verdict) if state.verdict else None
    return state, max_pages, off
