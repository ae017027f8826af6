"""Typed field access: the rules every command document shares, and the instance uuid rule.

A document arrives as plain values from the loader (`loader`); these functions read one field of a map at a time
and refuse anything but the expected type. Each either returns the field's value or raises `PayloadError`
(`invalid_data`) with a reason "<key path>: <what is wrong>", the key path being `path` and the key. Absent and
null are the same; strings come back trimmed; a bool is never an integer, nor an integer a bool.

`is_valid_uuid` is also the rule for uuids taken from URLs, which is why it is public beyond the package.
"""

from __future__ import annotations

import re
from typing import Any, NoReturn

from launcher.transport.payloads.loader import data_error, show

UUID_RE = re.compile(r"[0-9a-fA-F]+(?:-[0-9a-fA-F]+)*")  # ciao's uuidRegexp; used with fullmatch
MAX_UUID_LEN = 64

_TYPE_NAMES = {type(None): "null", bool: "bool", int: "integer", float: "number", str: "string", dict: "map",
               list: "list"}


def is_valid_uuid(text: str) -> bool:
    """True if `text` is an acceptable instance uuid: hex groups joined by '-', at most 64 characters.

    Such a string can never contain a path separator or a '.', so it is safe as a directory name.
    """
    return len(text) <= MAX_UUID_LEN and UUID_RE.fullmatch(text) is not None


def check_uuid(value: str, path: str) -> None:
    """Refuse `value` (at `path`) unless it is a uuid `is_valid_uuid` accepts, saying which rule it breaks."""
    if len(value) > MAX_UUID_LEN:
        raise data_error(path, f"longer than {MAX_UUID_LEN} characters")
    if UUID_RE.fullmatch(value) is None:
        raise data_error(path, f"invalid uuid {show(value)} (expected hex groups joined by '-')")


def instance_uuid(body: dict[Any, Any], path: str) -> str:
    """`path`.instance_uuid: required, and a valid uuid."""
    uuid = get_str(body, "instance_uuid", path)
    if not uuid:
        raise data_error(f"{path}.instance_uuid", "required")
    check_uuid(uuid, f"{path}.instance_uuid")
    return uuid


def type_name(value: object) -> str:
    """The name a reason gives the type of a loaded value ("map", "list", "integer", ...)."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def wrong_type(path: str, expected: str, value: object) -> NoReturn:
    """Raise `invalid_data` at `path`: expected `expected`, got the type of `value`."""
    raise data_error(path, f"expected {expected}, got {type_name(value)}")


def check_keys(body: dict[Any, Any], allowed: frozenset[str], path: str) -> None:
    """Refuse the first key of `body` that is not `allowed` ("<path>.<key>: unknown field")."""
    if not allowed.issuperset(body):
        unknown = next(key for key in body if key not in allowed)
        raise data_error(f"{path}.{unknown}", "unknown field")


def as_map(value: Any, path: str) -> dict[Any, Any]:
    """`value` itself if it is a map; else `invalid_data` at `path`."""
    if not isinstance(value, dict):
        wrong_type(path, "a map", value)
    return value


def as_list(value: Any, path: str) -> list[Any]:
    """`value` itself if it is a list; else `invalid_data` at `path`."""
    if not isinstance(value, list):
        wrong_type(path, "a list", value)
    return value


def get_str(body: dict[Any, Any], key: str, path: str) -> str:
    """The trimmed string at `key`; "" when absent or null."""
    value = body.get(key)
    if value is None:
        return ""
    if type(value) is not str:
        wrong_type(f"{path}.{key}", "a string", value)
    return value.strip()


def get_choice(body: dict[Any, Any], key: str, path: str, choices: tuple[str, ...]) -> str:
    """The trimmed string at `key`, which must be one of `choices` (absent or null counts as "")."""
    value = get_str(body, key, path)
    if value not in choices:
        allowed = ", ".join(repr(choice) for choice in choices)
        raise data_error(f"{path}.{key}", f"must be one of {allowed}; got {show(value)}")
    return value


def get_bool(body: dict[Any, Any], key: str, path: str) -> bool:
    """A real bool (not 0/1, not a string); False when absent or null."""
    value = body.get(key)
    if value is None:
        return False
    if type(value) is not bool:
        wrong_type(f"{path}.{key}", "a bool", value)
    return value


def get_int(body: dict[Any, Any], key: str, path: str) -> int | None:
    """A real integer (not a bool, not a float); None when absent or null."""
    value = body.get(key)
    if value is None:
        return None
    if type(value) is not int:
        wrong_type(f"{path}.{key}", "an integer", value)
    return value
