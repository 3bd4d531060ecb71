"""Where the library's log lines go: the command line's sink (console lines for people, JSON
lines for machines), a program's structlog, or the standard library's logging (silent unless
the program set it up): never stdout on their own."""

from __future__ import annotations

import datetime
import logging
import os
import sys
import time
import traceback
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import orjson

# one line per target: for the JSON log and the log file; on a console they would scroll a
# million lines past the live summary, which already counts them
PER_TARGET = frozenset({"target finished"})
# on a console the command line's closing summary says the same, in full
CONSOLE_SKIPS = PER_TARGET | {"run finished"}
_NUMBERS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "exception": 40}


class _CurrentStderr:
    """Writes to whatever sys.stderr is now, so a live progress display can redirect log lines."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@dataclass(frozen=True)
class _Sink:
    """The command line's logging, set by ``configure``: a level, a renderer, a stream."""

    level: int
    as_json: bool
    stream: Any
    console: TerminalLines | None

    def write(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if _NUMBERS[level] < self.level or (not self.as_json and event in CONSOLE_SKIPS):
            return
        name = "error" if level == "exception" else level
        if self.console is not None:
            exc_info = sys.exc_info()[1] if level == "exception" else None
            line = self.console.line(name, event, fields, exc_info)
        else:
            doc = {**fields, "event": event, "level": name, "timestamp": _now()}
            if level == "exception":  # a plain traceback: no frame's locals (one may hold a key)
                doc["exception"] = traceback.format_exc()
            line = orjson.dumps(doc, default=str).decode()
        self.stream.write(line + "\n")
        self.stream.flush()


_sink: _Sink | None = None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Logger:
    """A module's logger. Its lines go to the command line's sink (``configure``), else to
    structlog when the program configured it, or else to the standard library's logger of
    the same name, which says nothing unless the program set logging up (``crawler`` carries
    a NullHandler): a program calling ``run_job`` gets no line on stdout it did not ask for."""

    __slots__ = ("_context", "_name")

    def __init__(self, name: str, context: dict[str, Any] | None = None) -> None:
        self._name = name
        self._context = context or {}

    def bind(self, **context: Any) -> Logger:
        return Logger(self._name, {**self._context, **context})

    def _say(self, level: str, event: str, fields: dict[str, Any]) -> None:
        fields = {**self._context, **fields}
        structlog: Any = sys.modules.get("structlog")  # never imported here: it loads rich
        if _sink is not None:
            _sink.write(level, event, fields)
        elif structlog is not None and structlog.is_configured():
            getattr(structlog.get_logger(self._name), level)(event, **fields)
        else:
            logger = logging.getLogger(self._name)
            if logger.isEnabledFor(_NUMBERS[level]):
                text = _line(event, fields)
                logger.log(_NUMBERS[level], "%s", text, exc_info=level == "exception")

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


# info, most lines, goes untagged: the width is for what the line says
_LEVELS = {"debug": "debug ", "info": "", "warning": "warn ", "error": "error "}
_COLOURS = {"warn ": "\x1b[33m", "error ": "\x1b[31m"}


class TerminalLines:
    """The console renderer: one line per event (``12:00:01 run started: targets=8``,
    ``12:00:02 warn target failed: ...``),
    an exception as its last line only (a traceback's frames may hold a secret, and a
    traceback is many lines; the JSON logs and --log-file keep it whole), cut to the
    terminal's width when it is one."""

    def __init__(self, *, width: int | None, colors: bool) -> None:
        self._width = width  # the fd whose width is read at each line; None: not a terminal
        self._colors = colors

    def line(
        self, level: str, event: str, fields: dict[str, Any], error: BaseException | None
    ) -> str:
        shown = _LEVELS.get(level, "")
        text = _line(event, fields)
        if error is not None:
            last = (str(error).splitlines() or [""])[-1]
            text += f" | {type(error).__name__}" + (f": {last}" if last else "")
        line = f"{time.strftime('%H:%M:%S')} {shown}{' '.join(text.splitlines())}"
        if self._width is not None:
            line = fit(line, _columns(self._width))
        if self._colors and shown in _COLOURS:
            line = f"{_COLOURS[shown]}{line}\x1b[0m"
        return line


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
    global _sink  # noqa: PLW0603 -- the process's one logging setting, set by its program
    stream: Any
    opened: TextIO | None = None
    if log_file is not None:
        opened = stream = log_file.open("a", encoding="utf-8")
        is_terminal = False
    else:
        stream = _CurrentStderr()
        is_terminal = sys.stderr.isatty()
    as_json = log_format == "json" or (log_format is None and not is_terminal)
    console = (
        None if as_json else TerminalLines(width=2 if is_terminal else None, colors=is_terminal)
    )
    _sink = _Sink(_NUMBERS[level], as_json, stream, console)
    return opened


def reset() -> None:
    """Back to no sink: the standard library's logging (for tests and embedding programs)."""
    global _sink  # noqa: PLW0603 -- as in configure
    _sink = None
