"""The job file's YAML, read safely: UTF-8 only, no key given twice, no alias bomb, and the
line of each field path for messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from crawler.errors import ConfigError


def read_yaml(path: Path, data: bytes) -> tuple[str, Any]:
    """The file's text (newlines as read_text gives them) and its plain data; ConfigError with
    the file and line of what is wrong."""
    try:
        text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        raise ConfigError(_not_utf8(path, data, exc)) from None
    try:
        if "&" in text:  # without an anchor there is no alias to follow
            _check_aliases(text)
        raw = yaml.load(text, Loader=_LOADER)  # noqa: S506 -- a safe loader: plain data only
    except yaml.reader.ReaderError as exc:  # its own text is two lines, and no line number
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(
            f"{path}:{line}: character U+{exc.character:04X}: {exc.reason} in YAML; remove it"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        kind = "" if isinstance(exc, _Refused) else "YAML syntax error: "
        raise ConfigError(f"{path}{where}: {kind}{problem}") from None
    return text, raw


class _Refused(yaml.constructor.ConstructorError):
    """Valid YAML that a job file must not be; its message needs no "syntax error"."""


class _DuplicateKey(_Refused):
    pass


# values YAML aliases may copy in all: a few shared settings take tens; a "billion laughs" file
# of a few hundred bytes copies 10**9 (each alias level multiplies the one below), hanging the
# load and growing until the OOM killer ends it
MAX_ALIASED_VALUES = 100_000


def _check_aliases(text: str) -> None:
    """Refuse aliases that copy more than ``MAX_ALIASED_VALUES`` values, or a node into itself.

    Counted from the parser's events, before anything is built: an alias costs the values of
    the node it names, aliases in that node included, so the count grows as the copies would.
    """
    sizes: dict[str, int] = {}  # anchor -> values its node holds, aliases expanded
    open_nodes: list[list[Any]] = []  # [values so far, anchor] of each collection being read
    copied = 0
    for event in yaml.parse(text, Loader=_BASE_LOADER):
        if isinstance(event, yaml.AliasEvent):
            name = str(event.anchor)
            mark: Any = event.start_mark  # libyaml's Mark or PyYAML's: the same fields
            if any(anchor == name for _, anchor in open_nodes):
                raise _Refused(
                    problem=f"YAML alias *{name} is inside the node it names (a loop); "
                    "write the values out",
                    problem_mark=mark,
                )
            size = sizes.get(name, 1)  # an unknown anchor: the composer says so
            copied += size
            if copied > MAX_ALIASED_VALUES:
                raise _Refused(
                    problem=f"YAML alias *{name}: aliases copy more than "
                    f"{MAX_ALIASED_VALUES:,} values in all; anchors and aliases are for a few "
                    "shared settings: write the values out, or list targets in a targets_file",
                    problem_mark=mark,
                )
        elif isinstance(event, yaml.ScalarEvent):
            size = 1
            if event.anchor is not None:
                sizes[event.anchor] = size
        elif isinstance(event, yaml.CollectionStartEvent):
            open_nodes.append([1, event.anchor])
            continue
        elif isinstance(event, yaml.CollectionEndEvent):
            size, anchor = open_nodes.pop()
            if anchor is not None:
                sizes[anchor] = size
        else:
            continue
        if open_nodes:
            open_nodes[-1][0] += size


# libyaml's parser when PyYAML was built with it: several times faster on long target lists
_BASE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BASE_LOADER):  # type: ignore[misc]  # PyYAML's loaders are untyped (Any)
    """A safe loader that refuses a key given twice in one mapping: YAML would keep the last one
    silently (``max_credits: 200`` then ``max_credits: 999999`` spends the second)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys it brings may
                continue  # be overridden here, which is what merging is for
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue  # the constructor below says what is wrong with such a key
            if key in lines:
                raise _DuplicateKey(
                    problem=f"{key}: given twice in one mapping (first on line {lines[key]}); "
                    "say it once",
                    problem_mark=key_node.start_mark,
                )
            lines[key] = key_node.start_mark.line + 1
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


_LOADER: Any = _Loader


def _not_utf8(path: Path, data: bytes, exc: UnicodeDecodeError) -> str:
    line = data.count(b"\n", 0, exc.start) + 1
    utf16 = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
    return (
        f"{path}:{line}: not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
        f"({exc.reason}){utf16}; save the file as UTF-8"
    )


def line_index(text: str) -> dict[tuple[str | int, ...], int]:
    """Map each field path of the YAML document to its 1-based line."""
    index: dict[tuple[str | int, ...], int] = {}
    node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))

    # a loop, not recursion: a document nested 990 deep (libyaml's limit is 1,000) would pass
    # Python's recursion limit
    todo: list[tuple[yaml.Node, tuple[str | int, ...]]] = [] if node is None else [(node, ())]
    while todo:
        n, at = todo.pop()
        index.setdefault(at, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                # a key's own line, not its value's: a nested block starts a line below
                index.setdefault((*at, str(key.value)), key.start_mark.line + 1)
                todo.append((value, (*at, str(key.value))))
        elif isinstance(n, yaml.SequenceNode):
            todo.extend((item, (*at, i)) for i, item in enumerate(n.value))
    return index
