"""From bytes to plain Python values: content types, charset, size, and safe YAML and JSON loading.

The YAML loader is libyaml's (``yaml.CSafeLoader``) when available, tuned to read scalars as ciao's Go YAML
library did (see `_Loader`), refusing duplicate keys, NaN/Infinity and nesting deep enough to overflow
libyaml's recursive composer. Also the helpers every part of the parser builds its `PayloadError`s with.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, ClassVar, NoReturn

import yaml

from launcher.plugin.errors import INVALID_DATA, INVALID_PAYLOAD, PayloadError

DEFAULT_MAX_BYTES = 1 << 20
YAML_CONTENT_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml"})
JSON_CONTENT_TYPE = "application/json"
ACCEPTED_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
MAX_YAML_DEPTH = 64  # collections nested deeper than this are refused before libyaml composes them

# --------------------------------------------------------------------------------------------------------------------
# Bytes, content types, YAML and JSON
# --------------------------------------------------------------------------------------------------------------------


def payload_error(reason: str) -> PayloadError:
    """An `invalid_payload` error (the body cannot be read as a document) with `reason`; to raise."""
    return PayloadError(INVALID_PAYLOAD, reason)


def data_error(path: str, message: str) -> PayloadError:
    """An `invalid_data` error whose reason reads "<path>: <message>"; to raise."""
    return PayloadError(INVALID_DATA, f"{path}: {message}")


def show(value: object, limit: int = 60) -> str:
    """A short repr for error messages (payload values can be large)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def syntax_of(content_type: str | None) -> str | None:
    """"yaml", "json", or None (sniff) for a Content-Type value."""
    if not content_type:
        return None
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ACCEPTED_CHARSETS:
            raise payload_error(f"unsupported charset in content type {show(content_type)}: payloads are UTF-8")
    if not media:
        return None
    if media in YAML_CONTENT_TYPES:
        return "yaml"
    if media == JSON_CONTENT_TYPE:
        return "json"
    raise payload_error(f"unsupported content type {show(content_type)}; expected "
                         + ", ".join(sorted(YAML_CONTENT_TYPES)) + f" or {JSON_CONTENT_TYPE}")


def decode(body: bytes, max_bytes: int) -> str:
    """The body as text, a leading BOM dropped; `invalid_payload` if it is over `max_bytes` or not UTF-8."""
    if len(body) > max_bytes:
        raise payload_error(f"payload is {len(body)} bytes, limit is {max_bytes}")
    try:
        text = str(body, "utf-8")
    except UnicodeDecodeError as exc:
        raise payload_error(f"payload is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    return text.removeprefix("\ufeff")


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """A safe loader whose plain scalars resolve as ciao's Go yaml.v2 did for the fields we read.

    Kept from YAML 1.1: null, bool (true/false/yes/no/on/off), int (decimal, 0x, 0o/leading-0 octal, 0b), float
    and merge keys. Dropped: sexagesimal numbers (so a MAC such as ``52:54:00:12:34:56`` stays a string),
    timestamps (so ``2016-12-14`` stays a string) and the ``=`` value tag. Duplicate keys in a mapping are refused.
    """

    yaml_implicit_resolvers: ClassVar[dict[str, list[tuple[str, re.Pattern[str]]]]] = {}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        _refuse_duplicate_keys(node)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:yes|Yes|YES|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)$"),
    list("yYnNtTfFoO"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
                    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.VERBOSE),
    list("-+0123456789."))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"""^(?:[-+]?0b[0-1_]+
                    |[-+]?0[0-7_]+
                    |[-+]?(?:0|[1-9][0-9_]*)
                    |[-+]?0x[0-9a-fA-F_]+)$""", re.VERBOSE),
    list("-+0123456789"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])
_Loader.add_implicit_resolver("tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"),
                              ["~", "n", "N", ""])


def _refuse_duplicate_keys(node: yaml.MappingNode) -> None:
    seen: set[tuple[str, str]] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {show(key_node.value)}", key_node.start_mark)
            seen.add(key)


# Every collection needs at least one of these indicator characters, so their count bounds the nesting depth.
# libyaml's composer recurses on the C stack (a few 10 000 levels crash the process); below this bound the
# document is safe to load directly, above it the event stream is walked first to measure the real depth.
_NESTING_INDICATORS = "[{-?:"
_SAFE_INDICATOR_COUNT = 1000


def _check_yaml_depth(text: str) -> None:
    """PayloadError if `text` nests collections deeper than MAX_YAML_DEPTH.

    The event stream is walked with libyaml; if libyaml fails first (some releases refuse deep nesting with
    their own error, worded their own way), the walk is repeated with PyYAML's pure-Python parser, which has
    no limit of its own, so that the reason is ours whatever libyaml release is installed. A YAML error that
    is not about depth is left for the loader to report."""
    if sum(text.count(c) for c in _NESTING_INDICATORS) <= _SAFE_INDICATOR_COUNT:
        return
    try:
        _walk_depth(yaml.parse(text, Loader=_Loader))
    except yaml.YAMLError:
        try:
            _walk_depth(yaml.parse(text, Loader=yaml.SafeLoader))
        except yaml.YAMLError:
            pass


def _walk_depth(events: Iterator[yaml.Event]) -> None:
    depth = 0
    for event in events:
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark else 0
                raise payload_error(f"YAML nested deeper than {MAX_YAML_DEPTH} levels (line {line})")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _yaml_reason(exc: yaml.YAMLError, line_offset: int) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f" ({exc.context})" if exc.context else ""
        return (f"invalid YAML at line {mark.line + 1 + line_offset}, column {mark.column + 1}: "
                f"{exc.problem}{context}")
    return "invalid YAML: " + " ".join(str(exc).split())


def load_yaml(text: str, line_offset: int = 0) -> Any:
    """One YAML document, safely. `line_offset` maps error lines of an extracted document back to the body."""
    try:
        _check_yaml_depth(text)
        loader = _Loader(text)  # derives from (C)SafeLoader
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            if "&" not in text:  # no anchors, so no aliases: every node is built once
                try:
                    return _plain_value(loader, node)
                except Exception:
                    pass  # something unusual or wrong: the constructor builds it, or fails with its own error
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise payload_error(_yaml_reason(exc, line_offset)) from None
    except RecursionError:
        raise payload_error("YAML nested too deeply") from None


class _NotPlain(Exception):
    """A node `_plain_value` leaves to the generic constructor."""


_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_STR_TAG = "tag:yaml.org,2002:str"
_SCALAR_TAGS = frozenset({_STR_TAG, "tag:yaml.org,2002:int", "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float",
                          "tag:yaml.org,2002:null"})
_PLAIN_NESTING = 200  # deeper documents go to the constructor, which does not recurse on the Python stack


def _plain_value(loader: _Loader, node: yaml.Node, depth: int = 0) -> Any:
    """What `loader.construct_document(node)` returns, for a document of maps, lists and the scalar types our
    resolvers produce; raises for anything else (merge keys, other tags, complex keys, duplicate keys).

    The generic constructor costs about a third of a START's parsing (a generator per collection, several calls per
    scalar). Scalars still go through the constructor's own functions, so they convert exactly as before."""
    tag = node.tag
    if tag == _STR_TAG:
        return node.value
    if tag in _SCALAR_TAGS:
        return loader.yaml_constructors[tag](loader, node)
    if depth > _PLAIN_NESTING:
        raise _NotPlain
    if tag == _MAP_TAG:
        _refuse_duplicate_keys(node)
        mapping = {}
        for key_node, value_node in node.value:
            if type(key_node) is not yaml.ScalarNode or key_node.tag not in _SCALAR_TAGS:
                raise _NotPlain  # merge keys, complex keys, tagged keys
            mapping[_plain_value(loader, key_node)] = _plain_value(loader, value_node, depth + 1)
        return mapping
    if tag == _SEQ_TAG:
        return [_plain_value(loader, item, depth + 1) for item in node.value]
    raise _NotPlain


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {show(key)}")
        result[key] = value
    return result


def _json_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def json_loads(text: str) -> Any:
    """json.loads that refuses duplicate keys and NaN/Infinity; raises ValueError with a positioned reason."""
    try:
        return json.loads(text, object_pairs_hook=_json_object, parse_constant=_json_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
