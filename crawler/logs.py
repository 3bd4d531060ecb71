"""structlog, configured once: a console renderer for people, JSON lines for machines."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import orjson
import structlog


class _CurrentStderr:
    """Writes to whatever sys.stderr is now, so a live progress display can redirect log lines."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _dumps(event: Any, **_: Any) -> str:
    return orjson.dumps(event, default=str).decode()


# one line per target: for the JSON log and the log file; on a console they would scroll a
# million lines past the live summary, which already counts them
PER_TARGET = frozenset({"target finished"})


def _drop_per_target(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if event.get("event") in PER_TARGET:
        raise structlog.DropEvent
    return event


def configure(
    *, log_format: str | None = None, level: str = "info", log_file: Path | None = None
) -> TextIO | None:
    """Set up logging for the process; returns the log file it opened, for the caller to close.

    ``log_format`` None picks console on a terminal and JSON elsewhere (and in a file).
    """
    stream: Any
    opened: TextIO | None = None
    if log_file is not None:
        opened = stream = log_file.open("a", encoding="utf-8")
        is_terminal = False
    else:
        stream = _CurrentStderr()
        is_terminal = sys.stderr.isatty()
    as_json = log_format == "json" or (log_format is None and not is_terminal)
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if as_json
        # a plain traceback: rich's (the default) prints every frame's locals, and a frame
        # may hold the API key or what a server said
        else structlog.dev.ConsoleRenderer(
            colors=is_terminal, exception_formatter=structlog.dev.plain_traceback
        )
    )
    structlog.configure(
        processors=[
            *([] if as_json else [_drop_per_target]),
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    return opened
