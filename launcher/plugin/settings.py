"""Settings declared as attrs classes and checked strictly: the one way the launcher's config and every
virtualizer's own section are validated (part of the plugin API, `launcher.plugin`).

A plugin declares its section as a frozen attrs class whose fields have defaults and plain types (int, float,
str, bool, Path, nested attrs classes, tuples of them); `parse_section(cls, raw, "name.")` builds it. An unknown
key, a wrong type or a negative number is a `ConfigError` naming the key, so a typo never falls back to a
default.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from launcher.plugin.errors import SetupError


class ConfigError(SetupError):
    """A setting that is unknown, of the wrong type or out of range; the message names its key."""


def parse_section(cls: type, raw: Any, where: str) -> Any:
    """An instance of the attrs class `cls` from the mapping `raw`, checked strictly.

    `where` prefixes the keys in error messages (e.g. "qemu."). Virtualizers use it for their own sections.
    Field validators of `cls` (such as `one_of`, `at_least`, `at_most` below) and its `__attrs_post_init__` may
    raise ValueError("<field>: <what is wrong>"); it is reported as a ConfigError prefixed with `where`. A field
    without a default is required."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = [f for f in attrs.fields(cls) if f.init]
    known = {f.name for f in fields}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}{key}: unknown setting (known: {', '.join(sorted(known))})")
    for field in fields:
        if field.default is attrs.NOTHING and field.name not in raw:
            raise ConfigError(f"{where}{field.name}: required")
    values = {k: _convert(hints[k], v, f"{where}{k}") for k, v in raw.items()}
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(f"{where}{exc}") from exc


def _convert(kind: Any, value: Any, where: str) -> Any:
    arguments = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(arguments) == 2 and type(None) in arguments:
        return None if value is None else _convert(next(a for a in arguments if a is not type(None)), value, where)
    if attrs.has(kind):
        return parse_section(kind, value, where + ".")
    if kind is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path")
        return Path(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ConfigError(f"{where}: expected a finite non-negative number, got {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: expected a non-negative integer, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if typing.get_origin(kind) is tuple and typing.get_args(kind)[1:] == (Ellipsis,):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = typing.get_args(kind)[0]
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if typing.get_origin(kind) in (dict, types.GenericAlias):
        return value
    raise ConfigError(f"{where}: unsupported setting type {kind}")  # a bug in this module, not in the file


Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def one_of(*choices: str) -> Validator:
    """A field validator: the value must be one of `choices`."""
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{attribute.name}: must be one of {', '.join(choices)}, got {value!r}")
    return check


def at_least(bound: float) -> Validator:
    """A field validator: the number must be at least `bound`."""
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value < bound:
            raise ValueError(f"{attribute.name}: must be at least {bound:g}, got {value!r}")
    return check


def at_most(bound: float) -> Validator:
    """A field validator: the number must be at most `bound`."""
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value > bound:
            raise ValueError(f"{attribute.name}: must be at most {bound:g}, got {value!r}")
    return check
