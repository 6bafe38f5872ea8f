"""Build argparse flags from a config dataclass, so flags and config fields never drift apart.

Each field becomes ``--field-name``; its help text comes from ``field(metadata={"help": ...})``.
Supported field types: str, int, float, bool, ``X | None`` of those, and ``list[str]``. ``none``
sets an optional int or float to None; a ``str | None`` field takes "none" as its text (a path
or a name may be "none"), so such a field must default to None (leaving the flag out is its
off switch).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None``; lists are returned as-is."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def add_dataclass_args(
    parser: argparse._ActionsContainer, cls: type, skip: frozenset[str] = frozenset()
) -> None:
    """Add one ``--flag`` per field of ``cls`` (defaults are left to the dataclass)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        if default is not None and default != [] and default != "":
            help_text = f"{help_text} (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if typing.get_origin(tp) is list:
            kwargs.update(nargs="*", type=str)
        elif tp is bool:
            # --flag / --no-flag
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            # NOTE: "none" sets an optional number to None: the off switch of one whose
            # default is not None (--offline-step-share none), and still accepted once a
            # default becomes None (--offline-tpot-quantile none, which the Helm chart writes
            # for "none", was the pace's off switch when it was on by default). Text stays
            # text: --model none names a path "none" (the chart writes str fields as given).
            kwargs["type"] = _none_or(tp) if optional and tp is not str else tp
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            kwargs["metavar"] = f.name.upper()
        parser.add_argument(flag, **kwargs)


def _none_or(tp: Any) -> Any:
    """An argparse ``type``: None for "none", else ``tp`` of the text."""

    def convert(text: str) -> Any:
        return None if text.strip().lower() == "none" else tp(text)

    convert.__name__ = tp.__name__  # argparse names it in "invalid float value"
    return convert


def from_args(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
    """Build ``cls`` from the parsed namespace; unspecified flags keep the dataclass defaults."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in vars(ns).items() if k in names}
    values.update(overrides)
    return cls(**values)


def parse_assignments(cls: type, items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> field values of ``cls``, converted to the fields' types
    (ValueError names a bad key or value)."""
    hints = typing.get_type_hints(cls)
    fields_ = {f.name for f in dataclasses.fields(cls) if f.init}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields_:
            raise ValueError(f"expected KEY=VALUE with KEY a field of {cls.__name__}, got {item!r}")
        tp, optional = _base_type(hints[key])
        if optional and (text == "" or (tp is not str and text.strip().lower() == "none")):
            out[key] = None  # "none" is text for a str field, as on the command line
        elif tp is bool:
            try:
                out[key] = _parse_bool(text)
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"{key}: {e}") from None
        elif tp in (int, float, str):
            try:
                out[key] = tp(text)
            except ValueError:
                raise ValueError(f"{key}: expected {tp.__name__}, got {text!r}") from None
        else:
            raise ValueError(f"{key} cannot be set as KEY=VALUE")
    return out


def to_argv(obj: Any, skip: frozenset[str] = frozenset()) -> list[str]:
    """The inverse of ``from_args``: flags that rebuild ``obj`` (non-default fields only)."""
    argv: list[str] = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in skip or not f.init:
            continue
        value = getattr(obj, f.name)
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        if value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif value is None:  # the default is not None (else value == default)
            if _base_type(hints[f.name])[0] is str:
                raise ValueError(f"{f.name}: None cannot be written as a flag (\"none\" is text "
                                 "for a str field); give the field the default None")  # fmt: skip
            argv += [flag, "none"]
        else:
            argv += [flag, str(value)]
    return argv


_WANTED = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}
_ITEMS = {int: "integers", float: "finite numbers", str: "strings", bool: "booleans"}


def check_types(obj: Any) -> None:
    """ValueError naming the first field of the config ``obj`` whose value is not of its type
    (the types ``add_dataclass_args`` supports): a float where an int is wanted, text for a
    number or a flag, a non-finite float (NaN passes every bound check, inf every upper one).
    A float field takes an int too. Call first in ``__post_init__``: flags parse to the right
    types, Python callers and configs built from JSON need not."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        tp, optional = _base_type(hints[f.name])
        if value is None and optional:
            continue
        if typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            ok = isinstance(value, list) and all(_is_a(v, item) for v in value)
            wanted = f"a list of {_ITEMS.get(item, item)}"
        else:
            ok, wanted = _is_a(value, tp), _WANTED.get(tp, "")
        if not ok:
            raise ValueError(f"{f.name} must be {wanted}{' or None' if optional else ''}, "
                             f"got {value!r}")  # fmt: skip


def _is_a(value: Any, tp: Any) -> bool:
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)  # fmt: skip
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (bool, str):
        return isinstance(value, tp)
    return True  # a type no flag is built for: its own checks
