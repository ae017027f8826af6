"""Parsing and validation of ciao command payloads (YAML with ciao's multi-document framing, or JSON).

Every rejection is a `PayloadError` whose code is `invalid_payload` (the body cannot be parsed) or
`invalid_data` (it parses but a field is wrong), with a reason that names the field.

Public entry points:

- `split_yaml(text)`: ciao's `splitYaml` framing of a START body into (start, user-data, meta-data).
- `parse_command(body, content_type)`: any ciao command document: start, stop, restart, delete, evacuate, restore.
- `parse_start(body, content_type)`: the same, but the document must be a START.
- `is_valid_uuid(text)`: the instance uuid rule (also usable for uuids taken from URLs).

Reasons read "<key path>: <what is wrong>", e.g. ``start.networking.vnic_macc: unknown field``. A `PayloadError`
carries the instance uuid once the payload's own `instance_uuid` has been validated, else "".

Choices beyond ciao's behaviour (ciao used yaml.v2's lenient Unmarshal): unknown keys at any level, wrong types
(bools must be bools, integers integers), duplicate keys and NaN/Infinity are refused; a null value counts as an
absent field; strings are trimmed; a leading UTF-8 BOM is ignored; a blank (whitespace-only) meta-data document
means "no meta-data"; storage ids, tenant uuids, image names, MACs and IPv4 addresses are checked (see §18 of the
ciao reference: path traversal and option injection). A two-document YAML body whose non-start document is
cloud-config is therefore refused (ciao would have sent it to the VM as meta-data).

Parsing YAML uses a safe loader only (``yaml.CSafeLoader`` when libyaml is available, else ``yaml.SafeLoader``),
tuned to read scalars as ciao's Go YAML library did (see `_Loader`), refusing duplicate keys and refusing nesting
deep enough to overflow libyaml's recursive composer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from ipaddress import AddressValueError, IPv4Address, IPv4Network, NetmaskValueError
from typing import Any, ClassVar, NoReturn, TypeVar

import attrs
import yaml

from launcher.errors import INVALID_DATA, INVALID_PAYLOAD, PayloadError


@attrs.frozen
class Networking:
    vnic_mac: str = ""
    vnic_uuid: str = ""
    concentrator_uuid: str = ""
    concentrator_ip: str = ""
    subnet: str = ""  # CIDR
    subnet_key: str = ""
    subnet_uuid: str = ""
    private_ip: str = ""
    public_ip: bool = False


@attrs.frozen
class StorageEntry:
    id: str
    boot: bool = False
    boot_index: str = ""
    ephemeral: bool = False
    local: bool = False
    swap: bool = False
    tag: str = ""
    size: int = 0


@attrs.frozen
class InstanceSpec:
    """Everything a START says about one instance. Frozen: equal specs mean an idempotent repeat."""

    instance_uuid: str
    tenant_uuid: str = ""
    image_uuid: str = ""
    fw_type: str = ""  # "legacy", "efi" or "" (which means EFI, as in ciao)
    vm_type: str = ""  # "qemu" or "" (qemu)
    persistence: str = ""
    vcpus: int | None = None  # None: not given, the launcher config's default applies
    mem_mb: int | None = None
    disk_mb: int | None = None
    network_node: bool = False
    hostname: str = ""
    node_id: str = ""
    privileged: bool = False
    restart: bool = False
    networking: Networking = Networking()
    storage: tuple[StorageEntry, ...] = ()
    user_data: str = ""  # cloud-init user-data, passed through byte for byte
    meta_data: str = ""  # cloud-init meta-data (JSON text in ciao), passed through byte for byte

    @property
    def legacy_boot(self) -> bool:
        return self.fw_type == "legacy"


@attrs.frozen
class StartCommand:
    spec: InstanceSpec


@attrs.frozen
class StopCommand:
    instance_uuid: str
    grace_s: float | None = None  # seconds before a forced power-off; None: the configured default


@attrs.frozen
class RestartCommand:
    instance_uuid: str


@attrs.frozen
class DeleteCommand:
    instance_uuid: str
    stop: bool = False  # ciao HEAD: the instance is stopped for good (e.g. migrated), not discarded
    grace_s: float | None = None


@attrs.frozen
class EvacuateCommand:
    pass


@attrs.frozen
class RestoreCommand:
    pass


Command = StartCommand | StopCommand | RestartCommand | DeleteCommand | EvacuateCommand | RestoreCommand

# --------------------------------------------------------------------------------------------------------------------
# Limits and vocabularies
# --------------------------------------------------------------------------------------------------------------------

DEFAULT_MAX_BYTES = 1 << 20
YAML_CONTENT_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml"})
JSON_CONTENT_TYPE = "application/json"
ACCEPTED_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})

COMMAND_KEYS = ("start", "stop", "restart", "delete", "evacuate", "restore")

UUID_RE = re.compile(r"[0-9a-fA-F]+(?:-[0-9a-fA-F]+)*")  # ciao's uuidRegexp; used with fullmatch
MAX_UUID_LEN = 64
IMAGE_RE = re.compile(r"[A-Za-z0-9._-]+")
MAX_IMAGE_LEN = 255
MAC_RE = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
HOSTNAME_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_HOSTNAME_LEN = 253

FW_TYPES = ("legacy", "efi", "")
VM_TYPES = ("qemu", "")
PERSISTENCE_TYPES = ("all", "vm", "host", "")

# Resource names ciao payloads know (§3.1, plus INIT's disk_mb). Only READ_RESOURCES are used.
RESOURCE_TYPES = frozenset({
    "vcpus", "mem_mb", "disk_mb", "network_node", "compute_node", "physical_network",
    "instance", "volume", "image", "external_ip", "shared_disk_gib",
})
READ_RESOURCES = ("vcpus", "mem_mb", "disk_mb", "network_node")
RESOURCE_LIMITS = {"vcpus": (1, 256), "mem_mb": (16, 1_048_576), "disk_mb": (1, 67_108_864)}

MAX_GRACE_S = 3600
MAX_YAML_DEPTH = 64  # collections nested deeper than this are refused before libyaml composes them

_START_KEYS = frozenset({
    "tenant_uuid", "instance_uuid", "image_uuid", "docker_image", "fw_type", "persistence", "vm_type",
    "requested_resources", "estimated_resources", "requirements", "restart", "networking", "storage",
    "workload_agent_uuid",
})
_RESOURCE_KEYS = frozenset({"type", "value", "value_string", "mandatory"})
_REQUIREMENT_KEYS = frozenset({"mem_mb", "vcpus", "disk_mb", "node_id", "hostname", "network_node", "privileged"})
_NETWORKING_KEYS = frozenset(attrs.fields_dict(Networking))
_NETWORKING_STR_KEYS = tuple(k for k in attrs.fields_dict(Networking) if k != "public_ip")
_STORAGE_KEYS = frozenset(attrs.fields_dict(StorageEntry))
_STOP_KEYS = frozenset({"instance_uuid", "workload_agent_uuid", "grace"})
_DELETE_KEYS = frozenset({"instance_uuid", "workload_agent_uuid", "stop", "grace"})
# RESTART as ciao's RestartCmd defines it (§3.3); only instance_uuid is used, the saved spec is reused.
_RESTART_KEYS = frozenset({
    "tenant_uuid", "instance_uuid", "image_uuid", "workload_agent_uuid", "fw_type", "persistence",
    "requested_resources", "estimated_resources", "networking",
})
_NODE_COMMAND_KEYS = frozenset({"workload_agent_uuid"})
_JSON_TEXT_KEYS = ("user_data", "meta_data")

_EXPECTED_COMMANDS = "expected exactly one of " + ", ".join(COMMAND_KEYS)

# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


def is_valid_uuid(text: str) -> bool:
    """True if `text` is an acceptable instance uuid: hex groups joined by '-', at most 64 characters.

    Such a string can never contain a path separator or a '.', so it is safe as a directory name.
    """
    return len(text) <= MAX_UUID_LEN and UUID_RE.fullmatch(text) is not None


def split_yaml(text: str) -> tuple[str, str, str]:
    """Split a START body into (start, user_data, meta_data), as ciao-launcher's `splitYaml` did.

    The body holds up to three YAML-ish documents: the ``start:`` section, the cloud-init user-data and the
    cloud-init meta-data. Lines are split on "\\n" (a trailing "\\r" is dropped, as Go's bufio.Scanner does), and
    every output line is re-terminated with "\\n". Documents are cut from the end backwards: a last line starting
    with ``...`` ends a document, a line starting with ``---`` opens it (with any ``%`` directive lines directly
    before it), and a ``...`` reached first ends the previous document. Routing then depends on the count:

    - 1 document: the start block (the first line matching ``^start\\s*:\\s*$`` plus the lines that follow it and
      are empty or indented) is `start`; the document's other lines are user-data (those after a leading ``---``
      and before the start line, and the rest after the block unless it begins with ``...``).
    - 2 documents: the one holding the start line is split as above; the other one is meta-data. With no start
      line, the first is user-data and the second meta-data.
    - 3 or more: only the first three count. The one holding the start line is `start` as a whole, the other
      two are user-data then meta-data. A start line in a later document yields three empty strings.

    Deliberate fix of a ciao quirk: ciao's "indented" test was the unanchored regex ``\\s+.*``, so any line
    containing a space (``package_upgrade: true``) right after the start block was swallowed into `start`.
    Here a line continues the start block only if it is empty or *starts* with whitespace (``^\\s+``), so such
    a top-level line goes to user-data. All of ciao's start_test.go vectors still hold.
    """
    framed = _frame(text)
    return framed.start, framed.user_data, framed.meta_data


def parse_command(body: bytes, content_type: str | None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Command:
    """Parse and validate one ciao command document; dispatch on its single top-level key.

    `content_type` selects the syntax: ``application/yaml``, ``application/x-yaml`` or ``text/yaml`` for YAML,
    ``application/json`` for JSON (parameters such as ``; charset=utf-8`` are allowed; a charset other than
    UTF-8/ASCII is refused); "" or None sniffs (a body whose first non-space character is ``{`` is JSON, else YAML).

    A YAML START uses ciao's multi-document framing (`split_yaml`): the start document is parsed, the user-data
    and meta-data documents are passed through. A JSON START is ``{"start": {...}, "user_data": "...",
    "meta_data": "..." or {...}}`` (an object is re-serialized with ``json.dumps(indent=2)`` plus a final newline,
    the line ending the YAML framing gives every document). Other commands are ``{"stop": {...}}`` and so on.

    Raises `PayloadError`: `invalid_payload` for a body that is too large, not UTF-8, not parseable, of an
    unsupported content type or not a map; `invalid_data` for a parseable document with a wrong, missing or
    unknown field (the reason names the key path).
    """
    syntax = _syntax_of(content_type)
    text = _decode(body, max_bytes)
    if not text.strip():
        raise _payload_error("empty payload")
    if syntax is None:
        syntax = "json" if text.lstrip().startswith("{") else "yaml"
    if syntax == "json":
        return _parse_json_command(text)
    return _parse_yaml_command(text)


def parse_start(body: bytes, content_type: str | None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> StartCommand:
    """`parse_command` for a body that must be a START; any other command is `invalid_data` naming its key."""
    command = parse_command(body, content_type, max_bytes=max_bytes)
    if isinstance(command, StartCommand):
        return command
    key = _COMMAND_NAMES[type(command)]
    raise PayloadError(INVALID_DATA, f"{key}: expected a start command, got {key}",
                       getattr(command, "instance_uuid", ""))


# --------------------------------------------------------------------------------------------------------------------
# splitYaml
# --------------------------------------------------------------------------------------------------------------------

# Go's RE2 \s is [\t\n\f\r ]; keep exactly that set rather than Python's Unicode-aware \s.
_START_LINE_RE = re.compile(r"start[\t\n\f\r ]*:[\t\n\f\r ]*\Z")
_BLOCK_CONTINUATION = frozenset("\t\n\f\r ")


@attrs.frozen
class _Framed:
    start: str
    user_data: str
    meta_data: str
    has_start_line: bool  # a line matched the start regex (even if it ended up in an ignored document)
    start_line: int  # 0-based body line at which `start` begins (for error positions)


@attrs.frozen
class _Doc:
    lines: list[str]  # the document's lines including its markers and directives
    offset: int  # body line index of lines[0]
    real_start: int  # content is lines[real_start:real_end]
    real_end: int

    def content(self) -> list[str]:
        return self.lines[self.real_start:self.real_end]


def _split_lines(text: str) -> list[str]:
    """Lines as Go's bufio.ScanLines yields them: no final empty line, one trailing "\\r" dropped per line."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _join(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def _find_document(lines: list[str], end: int) -> tuple[_Doc, int]:
    """The last document of lines[:end], and where the document before it ends (ciao's findDocument)."""
    doc_start_found = doc_end_found = False
    real_end = end
    start = end - 1
    if lines[start].startswith("..."):
        doc_end_found = True
        real_end = start
        start -= 1
    while start >= 0:
        line = lines[start]
        if line.startswith("---"):
            doc_start_found = True
            break
        if line.startswith("..."):
            start += 1
            break
        start -= 1
    if doc_start_found:
        real_start = start + 1
        start -= 1
        while start >= 0 and lines[start].startswith("%"):
            start -= 1
        start += 1
    else:
        start = max(start, 0)
        real_start = start
    if not doc_end_found:
        real_end = end
    return _Doc(lines[start:end], start, real_start - start, real_end - start), start


def _split_start_block(doc: _Doc, start: int) -> tuple[list[str], list[str]]:
    """(start block, user-data lines) of a document holding the start line at doc.lines[start]."""
    lines = doc.lines
    content_start = 0
    for i in range(start):
        if lines[i].startswith("---"):
            content_start = i + 1
            break
    user = lines[content_start:start]
    i = start + 1
    while i < len(lines) and (lines[i] == "" or lines[i][0] in _BLOCK_CONTINUATION):
        i += 1
    block = lines[start:i]
    if i < len(lines) and not lines[i].startswith("..."):
        user = user + lines[i:]
    return block, user


def _frame(text: str) -> _Framed:
    lines = _split_lines(text)
    found = next((i for i, line in enumerate(lines) if line.startswith("start") and _START_LINE_RE.match(line)), -1)
    docs: list[_Doc] = []
    end = len(lines)
    while end > 0:
        doc, end = _find_document(lines, end)
        docs.insert(0, doc)
    has_start = found != -1
    if len(docs) == 1:
        if not has_start:
            return _Framed("", _join(docs[0].content()), "", False, 0)
        block, user = _split_start_block(docs[0], found)
        return _Framed(_join(block), _join(user), "", True, found)
    if len(docs) == 2:
        if not has_start:
            return _Framed("", _join(docs[0].content()), _join(docs[1].content()), False, 0)
        holder, other = (docs[0], docs[1]) if found < len(docs[0].lines) else (docs[1], docs[0])
        block, user = _split_start_block(holder, found - holder.offset)
        return _Framed(_join(block), _join(user), _join(other.content()), True, found)
    first_three = docs[:3]
    if has_start and found < sum(len(d.lines) for d in first_three):
        holder = next(d for d in first_three if d.offset <= found < d.offset + len(d.lines))
        user_doc, meta_doc = (d for d in first_three if d is not holder)
        return _Framed(_join(holder.content()), _join(user_doc.content()), _join(meta_doc.content()), True,
                       holder.offset + holder.real_start)
    return _Framed("", "", "", has_start, 0)  # blank body, or the start line is in the 4th or a later document


# --------------------------------------------------------------------------------------------------------------------
# Bytes, content types, YAML and JSON
# --------------------------------------------------------------------------------------------------------------------


def _payload_error(reason: str) -> PayloadError:
    return PayloadError(INVALID_PAYLOAD, reason)


def _data_error(path: str, message: str) -> PayloadError:
    return PayloadError(INVALID_DATA, f"{path}: {message}")


def _show(value: object, limit: int = 60) -> str:
    """A short repr for error messages (payload values can be large)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _syntax_of(content_type: str | None) -> str | None:
    """"yaml", "json", or None (sniff) for a Content-Type value."""
    if not content_type:
        return None
    media, _, params = content_type.partition(";")
    media = media.strip().lower()
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ACCEPTED_CHARSETS:
            raise _payload_error(f"unsupported charset in content type {_show(content_type)}: payloads are UTF-8")
    if not media:
        return None
    if media in YAML_CONTENT_TYPES:
        return "yaml"
    if media == JSON_CONTENT_TYPE:
        return "json"
    raise _payload_error(f"unsupported content type {_show(content_type)}; expected "
                         + ", ".join(sorted(YAML_CONTENT_TYPES)) + f" or {JSON_CONTENT_TYPE}")


def _decode(body: bytes, max_bytes: int) -> str:
    if len(body) > max_bytes:
        raise _payload_error(f"payload is {len(body)} bytes, limit is {max_bytes}")
    try:
        text = str(body, "utf-8")
    except UnicodeDecodeError as exc:
        raise _payload_error(f"payload is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
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
                    f"found duplicate key {_show(key_node.value)}", key_node.start_mark)
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
                raise _payload_error(f"YAML nested deeper than {MAX_YAML_DEPTH} levels (line {line})")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _yaml_reason(exc: yaml.YAMLError, line_offset: int) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f" ({exc.context})" if exc.context else ""
        return (f"invalid YAML at line {mark.line + 1 + line_offset}, column {mark.column + 1}: "
                f"{exc.problem}{context}")
    return "invalid YAML: " + " ".join(str(exc).split())


def _load_yaml(text: str, line_offset: int = 0) -> Any:
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
        raise _payload_error(_yaml_reason(exc, line_offset)) from None
    except RecursionError:
        raise _payload_error("YAML nested too deeply") from None


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
            raise ValueError(f"duplicate key {_show(key)}")
        result[key] = value
    return result


def _json_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _json_loads(text: str) -> Any:
    """json.loads that refuses duplicate keys and NaN/Infinity; raises ValueError with a positioned reason."""
    try:
        return json.loads(text, object_pairs_hook=_json_object, parse_constant=_json_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None


# --------------------------------------------------------------------------------------------------------------------
# Documents and commands
# --------------------------------------------------------------------------------------------------------------------


def _parse_yaml_command(text: str) -> Command:
    framed = _frame(text)
    if framed.has_start_line:
        if not framed.start:
            raise _payload_error("the start: document must be one of the first three documents")
        document = _load_yaml(framed.start, framed.start_line)
        return _dispatch(document, "YAML", framed.user_data, framed.meta_data)
    # No column-0 "start:" line: a single plain document (stop, delete, ..., or a flow-style start).
    return _dispatch(_load_yaml(text), "YAML", None, None)


def _parse_json_command(text: str) -> Command:
    try:
        document = _json_loads(text)
    except ValueError as exc:
        raise _payload_error(f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise _payload_error(f"the JSON document must be an object with {_EXPECTED_COMMANDS}; "
                             f"got {_type_name(document)}")
    texts = {key: document.pop(key) for key in _JSON_TEXT_KEYS if key in document}
    name, _ = _single_command(document)
    if texts and name != "start":
        raise _data_error(next(iter(texts)), f"only allowed with a start command, not {name}")
    return _dispatch(document, "JSON", texts.get("user_data"), texts.get("meta_data"))


def _single_command(document: dict[Any, Any]) -> tuple[str, Any]:
    for key in document:
        if key not in _COMMAND_PARSERS:
            raise _data_error(str(key), f"unknown field ({_EXPECTED_COMMANDS})")
    if len(document) != 1:
        got = ", ".join(map(str, document)) or "none"
        raise PayloadError(INVALID_DATA, f"{_EXPECTED_COMMANDS}; got {got}")
    return next(iter(document.items()))


def _dispatch(document: Any, syntax: str, user_data: Any, meta_data: Any) -> Command:
    if not isinstance(document, dict):
        raise _payload_error(f"the {syntax} document must be a map with {_EXPECTED_COMMANDS}; "
                             f"got {_type_name(document)}")
    name, value = _single_command(document)
    if name == "start":
        return _parse_start_value(value, user_data, meta_data)
    return _COMMAND_PARSERS[name](value)


_C = TypeVar("_C", StartCommand, StopCommand, RestartCommand, DeleteCommand)


def _with_uuid(exc: PayloadError, uuid: str) -> PayloadError:
    return exc if exc.instance_uuid else PayloadError(exc.code, exc.reason, uuid)


def _for_instance(value: Any, name: str, build: Callable[[dict[Any, Any], str], _C]) -> _C:
    """Validate `name`.instance_uuid first, then build the command; later errors carry the uuid."""
    body = _as_map(value, name)
    uuid = _instance_uuid(body, name)
    try:
        return build(body, uuid)
    except PayloadError as exc:
        raise _with_uuid(exc, uuid) from None


def _parse_start_value(value: Any, user_data: Any, meta_data: Any) -> StartCommand:
    return _for_instance(value, "start", lambda body, uuid: StartCommand(_spec(body, uuid, user_data, meta_data)))


def _build_stop(body: dict[Any, Any], uuid: str) -> StopCommand:
    _check_keys(body, _STOP_KEYS, "stop")
    _get_str(body, "workload_agent_uuid", "stop")
    return StopCommand(uuid, _get_grace(body, "stop"))


def _build_restart(body: dict[Any, Any], uuid: str) -> RestartCommand:
    _check_keys(body, _RESTART_KEYS, "restart")  # the other fields are accepted and ignored, as in ciao
    return RestartCommand(uuid)


def _build_delete(body: dict[Any, Any], uuid: str) -> DeleteCommand:
    _check_keys(body, _DELETE_KEYS, "delete")
    _get_str(body, "workload_agent_uuid", "delete")
    return DeleteCommand(uuid, _get_bool(body, "stop", "delete"), _get_grace(body, "delete"))


def _node_command(value: Any, name: str, command: Command) -> Command:
    """EVACUATE / RESTORE: null, or a map with an optional workload_agent_uuid."""
    if value is None:
        return command
    if not isinstance(value, dict):
        raise _data_error(name, f"expected a map or null, got {_type_name(value)}")
    _check_keys(value, _NODE_COMMAND_KEYS, name)
    _get_str(value, "workload_agent_uuid", name)
    return command


_COMMAND_PARSERS: dict[str, Callable[[Any], Command]] = {
    "start": lambda value: _parse_start_value(value, None, None),
    "stop": lambda value: _for_instance(value, "stop", _build_stop),
    "restart": lambda value: _for_instance(value, "restart", _build_restart),
    "delete": lambda value: _for_instance(value, "delete", _build_delete),
    "evacuate": lambda value: _node_command(value, "evacuate", EvacuateCommand()),
    "restore": lambda value: _node_command(value, "restore", RestoreCommand()),
}
_COMMAND_NAMES: dict[type, str] = {
    StartCommand: "start", StopCommand: "stop", RestartCommand: "restart", DeleteCommand: "delete",
    EvacuateCommand: "evacuate", RestoreCommand: "restore",
}

# --------------------------------------------------------------------------------------------------------------------
# START
# --------------------------------------------------------------------------------------------------------------------


def _spec(body: dict[Any, Any], uuid: str, user_data: Any, meta_data: Any) -> InstanceSpec:
    path = "start"
    _check_keys(body, _START_KEYS, path)
    tenant = _get_str(body, "tenant_uuid", path)
    if tenant:
        _check_uuid(tenant, "start.tenant_uuid")
    if _get_str(body, "docker_image", path):
        raise _data_error("start.docker_image", "must be empty: docker instances are not supported")
    fw_type = _get_choice(body, "fw_type", path, FW_TYPES)
    persistence = _get_choice(body, "persistence", path, PERSISTENCE_TYPES)
    vm_type = _get_choice(body, "vm_type", path, VM_TYPES)
    _get_str(body, "workload_agent_uuid", path)
    requested = _resource_list(body.get("requested_resources"), "start.requested_resources", read=True)
    _resource_list(body.get("estimated_resources"), "start.estimated_resources", read=False)
    requirements = _requirements(body.get("requirements"), "start.requirements")
    resources = _merge_resources(requested, requirements, "start.requirements")
    storage = _storage(body.get("storage"), "start.storage")
    return InstanceSpec(
        instance_uuid=uuid,
        tenant_uuid=tenant,
        image_uuid=_image_uuid(_get_str(body, "image_uuid", path), storage, "start.image_uuid"),
        fw_type=fw_type,
        vm_type=vm_type,
        persistence=persistence,
        vcpus=resources.get("vcpus"),
        mem_mb=resources.get("mem_mb"),
        disk_mb=resources.get("disk_mb"),
        network_node=bool(resources.get("network_node", False)),
        hostname=requirements.get("hostname", ""),
        node_id=requirements.get("node_id", ""),
        privileged=requirements.get("privileged", False),
        restart=_get_bool(body, "restart", path),
        networking=_networking(body.get("networking"), "start.networking"),
        storage=storage,
        user_data=_user_data(user_data),
        meta_data=_meta_data(meta_data),
    )


def _instance_uuid(body: dict[Any, Any], path: str) -> str:
    uuid = _get_str(body, "instance_uuid", path)
    if not uuid:
        raise _data_error(f"{path}.instance_uuid", "required")
    _check_uuid(uuid, f"{path}.instance_uuid")
    return uuid


def _check_uuid(value: str, path: str) -> None:
    if len(value) > MAX_UUID_LEN:
        raise _data_error(path, f"longer than {MAX_UUID_LEN} characters")
    if UUID_RE.fullmatch(value) is None:
        raise _data_error(path, f"invalid uuid {_show(value)} (expected hex groups joined by '-')")


def is_valid_image_id(image: str) -> bool:
    """An image name that is a plain file name: letters, digits, '.', '_' and '-', not '.' or '..'."""
    return len(image) <= MAX_IMAGE_LEN and IMAGE_RE.fullmatch(image) is not None and image not in (".", "..")


def _image_uuid(image: str, storage: tuple[StorageEntry, ...], path: str) -> str:
    """The backing image's name: a plain file name, never a path. Optional only with a bootable volume."""
    if not image:
        if any(entry.boot for entry in storage):
            return ""
        raise _data_error(path, "required unless a storage entry has boot: true")
    if len(image) > MAX_IMAGE_LEN:
        raise _data_error(path, f"longer than {MAX_IMAGE_LEN} characters")
    if IMAGE_RE.fullmatch(image) is None or image in (".", ".."):
        raise _data_error(path, f"invalid image name {_show(image)} (letters, digits, '.', '_' and '-' only, "
                                "not '.' or '..')")
    return image


def _check_limit(name: str, value: int, path: str) -> None:
    low, high = RESOURCE_LIMITS[name]
    if not low <= value <= high:
        raise _data_error(path, f"{name} must be between {low} and {high}, got {value}")


def _resource_list(value: Any, path: str, *, read: bool) -> dict[str, tuple[int | bool, str]]:
    """Validate a requested/estimated resource list; with `read`, return {name: (value, entry path)}, last wins."""
    found: dict[str, tuple[int | bool, str]] = {}
    if value is None:
        return found
    for index, item in enumerate(_as_list(value, path)):
        item_path = f"{path}[{index}]"
        entry = _as_map(item, item_path)
        _check_keys(entry, _RESOURCE_KEYS, item_path)
        kind = _get_str(entry, "type", item_path)
        if not kind:
            raise _data_error(f"{item_path}.type", "required")
        if kind not in RESOURCE_TYPES:
            raise _data_error(f"{item_path}.type", f"unknown resource type {_show(kind)} "
                                                   f"(known: {', '.join(sorted(RESOURCE_TYPES))})")
        amount = _get_int(entry, "value", item_path)
        _get_str(entry, "value_string", item_path)
        _get_bool(entry, "mandatory", item_path)
        if not read or kind not in READ_RESOURCES:
            continue
        if amount is None:
            raise _data_error(f"{item_path}.value", f"required for {kind}")
        if kind == "network_node":
            found[kind] = (amount != 0, item_path)
        else:
            _check_limit(kind, amount, f"{item_path}.value")
            found[kind] = (amount, item_path)
    return found


def _requirements(value: Any, path: str) -> dict[str, Any]:
    """HEAD's ``requirements:`` map; returns only the keys that were given."""
    if value is None:
        return {}
    body = _as_map(value, path)
    _check_keys(body, _REQUIREMENT_KEYS, path)
    given: dict[str, Any] = {}
    for name in RESOURCE_LIMITS:
        amount = _get_int(body, name, path)
        if amount is not None:
            _check_limit(name, amount, f"{path}.{name}")
            given[name] = amount
    for name in ("network_node", "privileged"):
        if body.get(name) is not None:
            given[name] = _get_bool(body, name, path)
    given["node_id"] = _get_str(body, "node_id", path)
    hostname = _get_str(body, "hostname", path)
    if hostname:
        _check_hostname(hostname, f"{path}.hostname")
    given["hostname"] = hostname
    return given


def _merge_resources(requested: dict[str, tuple[int | bool, str]], requirements: dict[str, Any],
                     path: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for name in READ_RESOURCES:
        if name in requested:
            merged[name] = requested[name][0]
        if name in requirements:
            if name in requested and requested[name][0] != requirements[name]:
                amount, where = requested[name]
                raise _data_error(f"{path}.{name}",
                                  f"{requirements[name]!r} disagrees with {where}.value ({amount!r})")
            merged[name] = requirements[name]
    return merged


def _check_hostname(name: str, path: str) -> None:
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    if len(name) > MAX_HOSTNAME_LEN or not all(HOSTNAME_LABEL_RE.fullmatch(label) for label in labels):
        raise _data_error(path, f"invalid hostname {_show(name)} (RFC 1123 labels joined by '.')")


def _networking(value: Any, path: str) -> Networking:
    if value is None:
        return Networking()
    body = _as_map(value, path)
    _check_keys(body, _NETWORKING_KEYS, path)
    fields: dict[str, Any] = {name: _get_str(body, name, path) for name in _NETWORKING_STR_KEYS}
    fields["public_ip"] = _get_bool(body, "public_ip", path)
    if fields["vnic_mac"]:
        _check_mac(fields["vnic_mac"], f"{path}.vnic_mac")
    for name in ("concentrator_ip", "private_ip"):
        if fields[name]:
            _check_ipv4(fields[name], f"{path}.{name}")
    if fields["subnet"]:
        _check_cidr(fields["subnet"], f"{path}.subnet")
    return Networking(**fields)


def _check_mac(mac: str, path: str) -> None:
    if MAC_RE.fullmatch(mac) is None:
        raise _data_error(path, f"invalid MAC address {_show(mac)} (expected xx:xx:xx:xx:xx:xx)")
    if int(mac[:2], 16) & 1:
        raise _data_error(path, f"{_show(mac)} is a multicast MAC address; a unicast one is required")
    if int(mac.replace(":", ""), 16) == 0:
        raise _data_error(path, "the all-zero MAC address is not a valid unicast address")


def _check_ipv4(address: str, path: str) -> None:
    try:
        IPv4Address(address)
    except AddressValueError:
        raise _data_error(path, f"invalid IPv4 address {_show(address)}") from None


def _check_cidr(subnet: str, path: str) -> None:
    try:
        if "/" not in subnet:
            raise ValueError
        IPv4Network(subnet, strict=False)
    except (AddressValueError, NetmaskValueError, ValueError):
        raise _data_error(path, f"invalid IPv4 CIDR {_show(subnet)} (expected a.b.c.d/n)") from None


def _storage(value: Any, path: str) -> tuple[StorageEntry, ...]:
    if value is None:
        return ()
    if isinstance(value, dict):
        raise _data_error(path, "must be a list of maps (- id: ...), got a map")
    entries: list[StorageEntry] = []
    seen: set[str] = set()
    for index, item in enumerate(_as_list(value, path)):
        entry = _storage_entry(item, f"{path}[{index}]")
        if entry.id in seen:
            raise _data_error(f"{path}[{index}].id", f"duplicate storage id {_show(entry.id)}")
        seen.add(entry.id)
        entries.append(entry)
    return tuple(entries)


def _storage_entry(item: Any, path: str) -> StorageEntry:
    body = _as_map(item, path)
    _check_keys(body, _STORAGE_KEYS, path)
    volume = _get_str(body, "id", path)
    if not volume:
        raise _data_error(f"{path}.id", "required (launcher-created local disks are not supported)")
    _check_uuid(volume, f"{path}.id")
    size = _get_int(body, "size", path) or 0
    if size < 0:
        raise _data_error(f"{path}.size", f"must not be negative, got {size}")
    return StorageEntry(
        id=volume,
        boot=_get_bool(body, "boot", path),
        boot_index=_get_boot_index(body, path),
        ephemeral=_get_bool(body, "ephemeral", path),
        local=_get_bool(body, "local", path),
        swap=_get_bool(body, "swap", path),
        tag=_get_str(body, "tag", path),
        size=size,
    )


def _get_boot_index(body: dict[Any, Any], path: str) -> str:
    """ciao's boot_index was an int at some revisions and a string at others; both are kept as text."""
    value = body.get("boot_index")
    if type(value) is int:
        return str(value)
    return _get_str(body, "boot_index", path)


def _user_data(value: Any) -> str:
    if value is None:
        return ""
    if type(value) is not str:
        _wrong_type("user_data", "a string", value)
    return value


def _meta_data(value: Any) -> str:
    """Meta-data text, which must be a JSON object; a JSON form's object is serialized. Blank means none."""
    if value is None:
        return ""
    if isinstance(value, dict):
        try:
            return json.dumps(value, indent=2) + "\n"
        except (RecursionError, ValueError):
            raise _data_error("meta_data", "cannot be serialized as JSON") from None
    if type(value) is not str:
        _wrong_type("meta_data", "a string or a JSON object", value)
    if not value.strip():
        return ""
    try:
        document = _json_loads(value)
    except ValueError as exc:
        raise _data_error("meta_data", f"not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise _data_error("meta_data", f"must be a JSON object, got {_type_name(document)}")
    return value


# --------------------------------------------------------------------------------------------------------------------
# Typed field access
# --------------------------------------------------------------------------------------------------------------------

_TYPE_NAMES = {type(None): "null", bool: "bool", int: "integer", float: "number", str: "string", dict: "map",
               list: "list"}


def _type_name(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _wrong_type(path: str, expected: str, value: object) -> NoReturn:
    raise _data_error(path, f"expected {expected}, got {_type_name(value)}")


def _check_keys(body: dict[Any, Any], allowed: frozenset[str], path: str) -> None:
    if not allowed.issuperset(body):
        unknown = next(key for key in body if key not in allowed)
        raise _data_error(f"{path}.{unknown}", "unknown field")


def _as_map(value: Any, path: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        _wrong_type(path, "a map", value)
    return value


def _as_list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        _wrong_type(path, "a list", value)
    return value


def _get_str(body: dict[Any, Any], key: str, path: str) -> str:
    """The trimmed string at `key`; "" when absent or null."""
    value = body.get(key)
    if value is None:
        return ""
    if type(value) is not str:
        _wrong_type(f"{path}.{key}", "a string", value)
    return value.strip()


def _get_choice(body: dict[Any, Any], key: str, path: str, choices: tuple[str, ...]) -> str:
    value = _get_str(body, key, path)
    if value not in choices:
        allowed = ", ".join(repr(choice) for choice in choices)
        raise _data_error(f"{path}.{key}", f"must be one of {allowed}; got {_show(value)}")
    return value


def _get_bool(body: dict[Any, Any], key: str, path: str) -> bool:
    """A real bool (not 0/1, not a string); False when absent or null."""
    value = body.get(key)
    if value is None:
        return False
    if type(value) is not bool:
        _wrong_type(f"{path}.{key}", "a bool", value)
    return value


def _get_int(body: dict[Any, Any], key: str, path: str) -> int | None:
    """A real integer (not a bool, not a float); None when absent or null."""
    value = body.get(key)
    if value is None:
        return None
    if type(value) is not int:
        _wrong_type(f"{path}.{key}", "an integer", value)
    return value


def _get_grace(body: dict[Any, Any], path: str) -> float | None:
    """``grace``: seconds (integer or finite number) from 0 to MAX_GRACE_S; None when absent."""
    value = body.get("grace")
    if value is None:
        return None
    if type(value) not in (int, float):
        _wrong_type(f"{path}.grace", "a number of seconds", value)
    if not 0 <= value <= MAX_GRACE_S:  # also false for NaN
        raise _data_error(f"{path}.grace", f"must be between 0 and {MAX_GRACE_S} seconds, got {value}")
    return float(value)
