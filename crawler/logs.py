"""Logging: structlog configured once by the program (console lines for people, JSON lines for
machines); until then the library's loggers say nothing on stdout."""

from __future__ import annotations

import logging
import os
import sys
import time
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


class Logger:
    """A module's logger. Once the program configured structlog (the command line does:
    ``configure``), it is structlog's; before that it hands every line to the standard library's
    logger of the same name, which says nothing unless the program set logging up (``crawler``
    carries a NullHandler): a program calling ``run_job`` gets no line on stdout it did not ask
    for."""

    __slots__ = ("_context", "_name")

    def __init__(self, name: str, context: dict[str, Any] | None = None) -> None:
        self._name = name
        self._context = context or {}

    def bind(self, **context: Any) -> Logger:
        return Logger(self._name, {**self._context, **context})

    def _say(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if structlog.is_configured():
            getattr(structlog.get_logger(self._name), level)(event, **self._context, **fields)
            return
        logger = logging.getLogger(self._name)
        number = logging.ERROR if level == "exception" else logging.getLevelName(level.upper())
        if logger.isEnabledFor(number):
            text = _line(event, {**self._context, **fields})
            logger.log(number, "%s", text, exc_info=level == "exception")

    def debug(self, event: str, **fields: Any) -> None:
        self._say("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._say("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._say("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._say("error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._say("exception", event, fields)


def get_logger(name: str) -> Logger:
    return Logger(name)


def _value(value: Any) -> str:
    text = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
    if any(c.isspace() for c in text) or not text:
        text = repr(text)  # one line whatever it holds: \n shown as \n
    return text


def _line(event: str, fields: MutableMapping[str, Any]) -> str:
    """``event: key=value ...``, values that say nothing (None) left out."""
    pairs = " ".join(f"{k}={_value(v)}" for k, v in fields.items() if v is not None)
    return f"{event}: {pairs}" if pairs else event


_LEVELS = {
    "debug": "debug",
    "info": "info ",
    "warning": "warn ",
    "error": "error",
    "critical": "crit ",
}
_COLOURS = {"warn ": "\x1b[33m", "error": "\x1b[31m", "crit ": "\x1b[31m"}


class TerminalLines:
    """The console renderer: one line per event (``12:00:01 info  run started: targets=8``),
    an exception as its last line only (a traceback's frames may hold a secret, and a
    traceback is many lines; JSON logs and --log-file keep it whole), cut to the terminal's
    width when it is one (the log file has every line whole)."""

    def __init__(self, *, width: int | None, colors: bool) -> None:
        self._width = width  # the fd whose width is read at each line; None: not a terminal
        self._colors = colors

    def __call__(self, _: Any, name: str, event: MutableMapping[str, Any]) -> str:
        level = _LEVELS.get(str(event.pop("level", name)), "info ")
        event.pop("timestamp", None)
        exc_info = event.pop("exc_info", None)
        text = _line(str(event.pop("event", "")), event)
        if exc_info:
            error = sys.exc_info()[1] if exc_info is True else _error_of(exc_info)
            if error is not None:
                last = (str(error).splitlines() or [""])[-1]
                text += (
                    f" | {type(error).__name__}: {last}" if last else f" | {type(error).__name__}"
                )
        text = " ".join(text.split("\n"))
        line = f"{time.strftime('%H:%M:%S')} {level} {text}"
        if self._width is not None:
            line = fit(line, _columns(self._width))
        if self._colors and level in _COLOURS:
            line = f"{_COLOURS[level]}{line}\x1b[0m"
        return line


def _error_of(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        return exc_info[1]  # type: ignore[no-any-return] # a (type, value, traceback) tuple
    return None


def _columns(fd: int) -> int:
    try:
        return os.get_terminal_size(fd).columns or 80
    except OSError:
        return 80


def fit(line: str, width: int) -> str:
    """``line`` cut to ``width`` characters, an ellipsis where it was cut."""
    return line if len(line) <= width else line[: max(0, width - 1)] + "…"


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
        else TerminalLines(width=2 if is_terminal else None, colors=is_terminal)
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    if as_json:  # a plain traceback (no frame's locals): a frame may hold the API key
        processors += [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
        ]
    else:
        processors.insert(0, _drop_per_target)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    return opened
