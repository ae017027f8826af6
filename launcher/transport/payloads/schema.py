"""What each ciao command document may hold: from a loaded document to a validated command.

`parse_yaml_command` and `parse_json_command` take a body's text (already decoded, see `loader`) and return one of
the core's commands (`launcher.core.commands`). The document must be a map with exactly one of the eight command
keys; this module dispatches on that key, checks the non-START commands (stop, restart, delete, attach_volume,
detach_volume, evacuate, restore) itself, and leaves the START map to `start_schema`.

Reasons read "<key path>: <what is wrong>". Unknown keys at any level, wrong types, and invalid uuids, image
names, MACs, IPv4 addresses and hostnames are refused (see the package docstring for the choices beyond ciao).
Every refusal is a `PayloadError`; one found after the document's instance_uuid was checked carries that uuid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from launcher.core.commands import (
    COMMAND_KEYS,
    AttachVolumeCommand,
    Command,
    DeleteCommand,
    DetachVolumeCommand,
    EvacuateCommand,
    RestartCommand,
    RestoreCommand,
    StartCommand,
    StopCommand,
)
from launcher.plugin.errors import INVALID_DATA, PayloadError
from launcher.transport.payloads.fields import (
    as_map,
    check_keys,
    check_uuid,
    get_bool,
    get_str,
    instance_uuid,
    type_name,
    wrong_type,
)
from launcher.transport.payloads.framing import frame
from launcher.transport.payloads.loader import data_error, json_loads, load_yaml, payload_error
from launcher.transport.payloads.start_schema import start_command

MAX_GRACE_S = 3600

_STOP_KEYS = frozenset({"instance_uuid", "workload_agent_uuid", "grace"})
_DELETE_KEYS = frozenset({"instance_uuid", "workload_agent_uuid", "stop", "grace"})
# RESTART as ciao's RestartCmd defines it (§3.3); only instance_uuid is used, the saved spec is reused.
_RESTART_KEYS = frozenset({
    "tenant_uuid", "instance_uuid", "image_uuid", "workload_agent_uuid", "fw_type", "persistence",
    "requested_resources", "estimated_resources", "networking",
})
_VOLUME_COMMAND_KEYS = frozenset({"instance_uuid", "volume_uuid", "workload_agent_uuid"})
_NODE_COMMAND_KEYS = frozenset({"workload_agent_uuid"})
_JSON_TEXT_KEYS = ("user_data", "meta_data")

_EXPECTED_COMMANDS = "expected exactly one of " + ", ".join(COMMAND_KEYS)


def parse_yaml_command(text: str) -> Command:
    """A YAML body's command: a START in ciao's multi-document framing, or any command as one plain document."""
    framed = frame(text)
    if framed.has_start_line:
        if not framed.start:
            raise payload_error("the start: document must be one of the first three documents")
        document = load_yaml(framed.start, framed.start_line)
        return _dispatch(document, "YAML", framed.user_data, framed.meta_data)
    # No column-0 "start:" line: a single plain document (stop, delete, ..., or a flow-style start).
    return _dispatch(load_yaml(text), "YAML", None, None)


def parse_json_command(text: str) -> Command:
    """A JSON body's command: ``{"<command>": {...}}``; a START may add ``user_data`` and ``meta_data``."""
    try:
        document = json_loads(text)
    except ValueError as exc:
        raise payload_error(f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise payload_error(f"the JSON document must be an object with {_EXPECTED_COMMANDS}; "
                             f"got {type_name(document)}")
    texts = {key: document.pop(key) for key in _JSON_TEXT_KEYS if key in document}
    name, _ = _single_command(document)
    if texts and name != "start":
        raise data_error(next(iter(texts)), f"only allowed with a start command, not {name}")
    return _dispatch(document, "JSON", texts.get("user_data"), texts.get("meta_data"))


def _single_command(document: dict[Any, Any]) -> tuple[str, Any]:
    for key in document:
        if key not in _COMMAND_PARSERS:
            raise data_error(str(key), f"unknown field ({_EXPECTED_COMMANDS})")
    if len(document) != 1:
        got = ", ".join(map(str, document)) or "none"
        raise PayloadError(INVALID_DATA, f"{_EXPECTED_COMMANDS}; got {got}")
    return next(iter(document.items()))


def _dispatch(document: Any, syntax: str, user_data: Any, meta_data: Any) -> Command:
    if not isinstance(document, dict):
        raise payload_error(f"the {syntax} document must be a map with {_EXPECTED_COMMANDS}; "
                             f"got {type_name(document)}")
    name, value = _single_command(document)
    if name == "start":
        return _parse_start_value(value, user_data, meta_data)
    return _COMMAND_PARSERS[name](value)


_C = TypeVar("_C", StartCommand, StopCommand, RestartCommand, DeleteCommand, AttachVolumeCommand,
             DetachVolumeCommand)


def _with_uuid(exc: PayloadError, uuid: str) -> PayloadError:
    return exc if exc.instance_uuid else PayloadError(exc.code, exc.reason, uuid)


def _for_instance(value: Any, name: str, build: Callable[[dict[Any, Any], str], _C]) -> _C:
    """Validate `name`.instance_uuid first, then build the command; later errors carry the uuid."""
    body = as_map(value, name)
    uuid = instance_uuid(body, name)
    try:
        return build(body, uuid)
    except PayloadError as exc:
        raise _with_uuid(exc, uuid) from None


def _parse_start_value(value: Any, user_data: Any, meta_data: Any) -> StartCommand:
    return _for_instance(value, "start", lambda body, uuid: start_command(body, uuid, user_data, meta_data))


def _build_stop(body: dict[Any, Any], uuid: str) -> StopCommand:
    check_keys(body, _STOP_KEYS, "stop")
    get_str(body, "workload_agent_uuid", "stop")
    return StopCommand(uuid, _get_grace(body, "stop"))


def _build_restart(body: dict[Any, Any], uuid: str) -> RestartCommand:
    check_keys(body, _RESTART_KEYS, "restart")  # the other fields are accepted and ignored, as in ciao
    return RestartCommand(uuid)


def _build_delete(body: dict[Any, Any], uuid: str) -> DeleteCommand:
    check_keys(body, _DELETE_KEYS, "delete")
    get_str(body, "workload_agent_uuid", "delete")
    return DeleteCommand(uuid, get_bool(body, "stop", "delete"), _get_grace(body, "delete"))


def _build_attach(body: dict[Any, Any], uuid: str) -> AttachVolumeCommand:
    return AttachVolumeCommand(uuid, _volume_uuid(body, "attach_volume"))


def _build_detach(body: dict[Any, Any], uuid: str) -> DetachVolumeCommand:
    return DetachVolumeCommand(uuid, _volume_uuid(body, "detach_volume"))


def _volume_uuid(body: dict[Any, Any], name: str) -> str:
    """ATTACH / DETACH (ciao's attach_volume / detach_volume): the volume_uuid, required and a uuid."""
    check_keys(body, _VOLUME_COMMAND_KEYS, name)
    get_str(body, "workload_agent_uuid", name)
    volume = get_str(body, "volume_uuid", name)
    if not volume:
        raise data_error(f"{name}.volume_uuid", "required")
    check_uuid(volume, f"{name}.volume_uuid")
    return volume


def _node_command(value: Any, name: str, command: Command) -> Command:
    """EVACUATE / RESTORE: null, or a map with an optional workload_agent_uuid."""
    if value is None:
        return command
    if not isinstance(value, dict):
        raise data_error(name, f"expected a map or null, got {type_name(value)}")
    check_keys(value, _NODE_COMMAND_KEYS, name)
    get_str(value, "workload_agent_uuid", name)
    return command


_COMMAND_PARSERS: dict[str, Callable[[Any], Command]] = {
    "start": lambda value: _parse_start_value(value, None, None),
    "stop": lambda value: _for_instance(value, "stop", _build_stop),
    "restart": lambda value: _for_instance(value, "restart", _build_restart),
    "delete": lambda value: _for_instance(value, "delete", _build_delete),
    "attach_volume": lambda value: _for_instance(value, "attach_volume", _build_attach),
    "detach_volume": lambda value: _for_instance(value, "detach_volume", _build_detach),
    "evacuate": lambda value: _node_command(value, "evacuate", EvacuateCommand()),
    "restore": lambda value: _node_command(value, "restore", RestoreCommand()),
}


def _get_grace(body: dict[Any, Any], path: str) -> float | None:
    """``grace``: seconds (integer or finite number) from 0 to MAX_GRACE_S; None when absent."""
    value = body.get("grace")
    if value is None:
        return None
    if type(value) not in (int, float):
        wrong_type(f"{path}.grace", "a number of seconds", value)
    if not 0 <= value <= MAX_GRACE_S:  # also false for NaN
        raise data_error(f"{path}.grace", f"must be between 0 and {MAX_GRACE_S} seconds, got {value}")
    return float(value)
