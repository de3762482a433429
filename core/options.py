"""Typed method options: every method declares its options as a frozen dataclass (`Method.Options`); values from
the command line, a recipe file, the Space or the bot are checked here, in one place, against the field's type
annotation and its metadata, so a new method gets the checks by declaring its fields.

    @dataclass(frozen=True)
    class Options:
        unit: str = option("block", choices=("block", "attention", "mlp"), help="what is removed")
        samples: int = option(64, min=2, help="random sub-networks")
        keep: float = option(0.9, min=0, max=1, exclusive=True)
        layers: tuple[int, ...] | None = None  # plain defaults work too (type checks only)

Accepted values: bool fields take true/false (also yes/no, on/off, 1/0); int fields integers (or integral floats
and digit strings); float fields numbers; tuple[int, ...] fields lists or comma-separated strings ("3,5").
`None` is accepted only where the annotation allows it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from .errors import OptionError, PruningError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def option(default: Any, *, choices: tuple | None = None, min: float | None = None, max: float | None = None,
           exclusive: bool = False, help: str = "") -> Any:
    """A dataclass field with a range (`min`/`max`, open interval when `exclusive`), choices and a help line."""
    meta = {"choices": tuple(choices) if choices else None, "min": min, "max": max, "exclusive": exclusive,
            "help": help}
    return dataclasses.field(default=default, metadata=meta)


def _optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def type_name(tp: Any) -> str:
    inner, nullable = _optional(tp)
    if typing.get_origin(inner) is tuple:
        name = f"list of {typing.get_args(inner)[0].__name__}"
    else:
        name = {bool: "true/false", int: "integer", float: "number", str: "text"}.get(inner, str(inner))
    return f"{name} or null" if nullable else name


def _scalar(tp: Any, value: Any) -> Any:
    """`value` as `tp`, or raise ValueError."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError
    if tp is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise ValueError
    if tp is float:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)  # ValueError on junk; 'nan'/'inf' are caught by the range check below
        raise ValueError
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError
    return value  # an annotation this module does not know: left to the dataclass


def _convert(tp: Any, value: Any) -> Any:
    inner, nullable = _optional(tp)
    if value is None or (nullable and isinstance(value, str) and value.strip().lower() in ("null", "none", "")):
        if nullable:
            return None
        raise ValueError
    if typing.get_origin(inner) is tuple:
        item = typing.get_args(inner)[0]
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError
        return tuple(_scalar(item, v) for v in value)
    return _scalar(inner, value)


def _range_text(meta: dict) -> str:
    lo, hi, open_ = meta.get("min"), meta.get("max"), meta.get("exclusive")
    if lo is not None and hi is not None:
        return f"in ({lo}, {hi})" if open_ else f"in [{lo}, {hi}]"
    if lo is not None:
        return f"{'>' if open_ else '>='} {lo}"
    if hi is not None:
        return f"{'<' if open_ else '<='} {hi}"
    return ""


def _in_range(value: Any, meta: dict) -> bool:
    lo, hi, open_ = meta.get("min"), meta.get("max"), meta.get("exclusive")
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if v != v or (lo is not None and (v <= lo if open_ else v < lo)) or (
                hi is not None and (v >= hi if open_ else v > hi)):
            return False
    return True


def check_value(owner: str, f: dataclasses.Field, tp: Any, value: Any) -> Any:
    """One option's value converted to its declared type; OptionError naming the type, range or choices."""
    meta = dict(f.metadata)
    expected = type_name(tp)
    rng = _range_text(meta)
    choices = meta.get("choices")
    want = f"one of {', '.join(map(str, choices))}" if choices else expected + (f" {rng}" if rng else "")
    message = f"Option {f.name} must be {want} (method {owner}; got {value!r})."
    try:
        converted = _convert(tp, value)
    except (ValueError, TypeError):
        raise OptionError(message) from None
    if converted is not None and (choices and converted not in choices or not _in_range(converted, meta)):
        raise OptionError(message)
    return converted


def build_options(cls: type, values: dict, owner: str):
    """An instance of the options dataclass `cls` from `values` (unknown names and bad values are OptionErrors)."""
    if not isinstance(values, dict):
        raise OptionError(f"The options of {owner} must be a mapping of name: value (got {values!r}).")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields), key=str)
    if unknown:
        import difflib

        close = difflib.get_close_matches(str(unknown[0]), list(fields), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise OptionError(f"Method {owner!r} has no option {unknown[0]!r}; its options are: "
                          f"{', '.join(sorted(fields)) or 'none'}.{hint} (See `python -m core methods`.)")
    hints = typing.get_type_hints(cls)
    kwargs = {name: check_value(owner, fields[name], hints[name], value) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except PruningError:
        raise
    except (TypeError, ValueError) as err:
        raise OptionError(f"Options of {owner}: {err}") from None


def describe_options(cls: type) -> dict[str, dict]:
    """name -> {type, default, choices, range, help} for listings (`python -m core methods`, the Space)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else None
        out[f.name] = {"type": type_name(hints[f.name]), "default": list(default) if isinstance(default, tuple)
                       else default, "choices": list(meta["choices"]) if meta.get("choices") else None,
                       "range": _range_text(dict(meta)) or None, "help": meta.get("help") or ""}
    return out
