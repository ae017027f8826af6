"""Parsing and validation of ciao command payloads (YAML with ciao's multi-document framing, or JSON).

Every rejection is a `PayloadError` whose code is `invalid_payload` (the body cannot be parsed) or
`invalid_data` (it parses but a field is wrong), with a reason that names the field.

Public entry points:

- `split_yaml(text)`: ciao's `splitYaml` framing of a START body into (start, user-data, meta-data).
- `parse_command(body, content_type)`: any ciao command document: start, stop, restart, delete, attach_volume,
  detach_volume, evacuate, restore.
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
tuned to read scalars as ciao's Go YAML library did (see `loader._Loader`), refusing duplicate keys and refusing
nesting deep enough to overflow libyaml's recursive composer.

The package, in the order a body goes through it:

- `loader`: bytes, content type and size checks; safe YAML and JSON loading into plain values.
- `framing`: ciao's multi-document framing of a YAML START (`split_yaml`).
- `schema`: from a loaded document to a validated command: the dispatch on the single top-level key, and the
  rules of every command but START.
- `start_schema`: the START document's rules (resources and requirements, networking, storage, user-data and
  meta-data), giving a `StartCommand`.
- `fields`: typed access to one field of a map and the uuid rule, shared by `schema` and `start_schema`.

The command types it produces are the core's (`launcher.core.commands`); a START's instance model,
`InstanceSpec`, lives in `launcher.plugin.spec`, where virtualizers find it.
"""

from __future__ import annotations

from launcher.core.commands import COMMAND_NAMES, Command, StartCommand
from launcher.plugin.errors import INVALID_DATA, PayloadError
from launcher.transport.payloads.fields import is_valid_uuid
from launcher.transport.payloads.framing import split_yaml
from launcher.transport.payloads.loader import DEFAULT_MAX_BYTES, decode, payload_error, syntax_of
from launcher.transport.payloads.schema import parse_json_command, parse_yaml_command

__all__ = ["DEFAULT_MAX_BYTES", "is_valid_uuid", "parse_command", "parse_start", "split_yaml"]

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
    syntax = syntax_of(content_type)
    text = decode(body, max_bytes)
    if not text.strip():
        raise payload_error("empty payload")
    if syntax is None:
        syntax = "json" if text.lstrip().startswith("{") else "yaml"
    if syntax == "json":
        return parse_json_command(text)
    return parse_yaml_command(text)


def parse_start(body: bytes, content_type: str | None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> StartCommand:
    """`parse_command` for a body that must be a START; any other command is `invalid_data` naming its key."""
    command = parse_command(body, content_type, max_bytes=max_bytes)
    if isinstance(command, StartCommand):
        return command
    key = COMMAND_NAMES[type(command)]
    raise PayloadError(INVALID_DATA, f"{key}: expected a start command, got {key}",
                       getattr(command, "instance_uuid", ""))
