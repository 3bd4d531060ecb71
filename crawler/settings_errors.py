"""A job file's invalid values said as a person reads them: file, line, field path, the key
that was meant, the value given (any password masked, cut short when long)."""

from __future__ import annotations

import difflib
import math
import reprlib
from pathlib import Path
from typing import Any, get_args

from annotated_types import Le
from pydantic import BaseModel

from crawler.settings import SECTIONS, JobModel, masked_url


def located(
    path: Path, loc: tuple[str | int, ...], why: str, lines: dict[tuple[str | int, ...], int]
) -> str:
    line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), None)
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return f"{path}{f':{line}' if line else ''}: {field}: {why}"


def describe(path: Path, err: Any, lines: dict[tuple[str | int, ...], int]) -> str:
    loc = tuple(part for part in err["loc"] if not (isinstance(part, str) and "[" in part))
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    line = next((lines[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in lines), None)
    where = f"{path}:{line}" if line else str(path)
    message = str(err["msg"]).removeprefix("Value error, ")
    kind = err["type"]
    if kind == "extra_forbidden":
        message = f"unknown key '{loc[-1]}'{_meant(loc)}"
    elif kind == "missing":
        message = "required key is missing"
    elif "input" in err and kind != "value_error" and not isinstance(err["input"], dict):
        value = err["input"]
        ceiling = _ceiling(loc)  # every number has one
        if ceiling is not None and _is_nan(value):
            message = "Input should be a number"
        elif kind == "less_than_equal":
            message = f"Input should be at most {_number(err['ctx']['le'])}"
        elif (
            kind == "int_parsing_size"  # too many digits to be an integer at all
            and ceiling is not None
            and not str(value).lstrip().startswith("-")
        ):
            message = f"Input should be at most {_number(ceiling)}"
        elif kind == "greater_than_equal":
            message = f"Input should be at least {_number(err['ctx']['ge'])}"
        message = f"{message} (got {_shown(value)})"
    return f"{where}: {field or 'job'}: {message}"


def _meant(loc: tuple[Any, ...]) -> str:
    """The key an unknown one was meant to be: a close name here, or the same name elsewhere."""
    key, model = str(loc[-1]), _model_at(loc[:-1])
    if model is None:
        return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.75)
    if close:
        return f"; did you mean '{close[0]}'?"
    home = next((at for at, m in SECTIONS.items() if key in m.model_fields and m is not model), "")
    return f"; it goes {home}" if home else ""


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The settings class of the mapping at ``loc`` in the job file (None: not one)."""
    model: type[BaseModel] | None = JobModel
    keyed = False  # the part is a key of a mapping of settings (an endpoint's name)
    for part in loc:
        if isinstance(part, int) or keyed:  # an item of a list of targets
            keyed = False
            continue
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        model = _inner_model(field.annotation)
        keyed = getattr(field.annotation, "__origin__", None) is dict
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """The settings class in an annotation: ``X``, ``X | None``, ``tuple[X, ...]``."""
    if not get_args(annotation) and isinstance(annotation, type):
        return annotation if issubclass(annotation, BaseModel) else None
    return next((m for a in get_args(annotation) if (m := _inner_model(a)) is not None), None)


def _ceiling(loc: tuple[Any, ...]) -> float | None:
    """The upper bound of the number at ``loc``, if it has one."""
    model = _model_at(loc[:-1])
    field = model.model_fields.get(loc[-1]) if model is not None and loc else None
    metadata = field.metadata if field is not None else []
    bounds = [m.le for m in metadata if isinstance(m, Le) and isinstance(m.le, int | float)]
    return float(bounds[0]) if bounds else None


def _is_nan(value: object) -> bool:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return False
    return isinstance(value, float) and math.isnan(value)


def _number(bound: float) -> str:
    """A bound as the job file would give it: 3600, not 3600.0."""
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _shown(value: object) -> str:
    """A value as a message quotes it: any URL's password masked, cut short when long or deep."""
    return _REPR.repr(_masked(value, _REPR.maxlevel))


def _masked(value: object, depth: int) -> object:
    # below reprlib's depth nothing is shown, so nothing needs masking (or recursing into)
    if isinstance(value, str):
        return masked_url(value)
    if depth < 0:
        return value
    if isinstance(value, list | tuple):
        return type(value)(_masked(v, depth - 1) for v in value)
    if isinstance(value, dict):
        return {_masked(k, depth - 1): _masked(v, depth - 1) for k, v in value.items()}
    return value


_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 4
