"""A job's saved state: the data (``model``), the rules that change it (``rules``), the store seam
(``store``) and the one-process store (``sqlite``, composed of the SQLite modules beside it);
the Redis store is ``crawler.coordination``."""

from crawler.state.model import (
    COLUMNS,
    Claimed,
    Held,
    Ledger,
    ShardInfo,
    Sums,
    TargetState,
    Totals,
)
from crawler.state.store import StateStore, StateView

__all__ = [
    "COLUMNS",
    "Claimed",
    "Held",
    "Ledger",
    "ShardInfo",
    "StateStore",
    "StateView",
    "Sums",
    "TargetState",
    "Totals",
]
