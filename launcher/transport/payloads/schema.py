"""What each ciao command document may hold: from a loaded document to a validated command.

Reasons read "<key path>: <what is wrong>". Unknown keys at any level, wrong types, and invalid uuids, image
names, MACs, IPv4 addresses and hostnames are refused (see the package docstring for the choices beyond ciao).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from ipaddress import AddressValueError, IPv4Address, IPv4Network, NetmaskValueError
from typing import Any, NoReturn, TypeVar

import attrs

from launcher.core.commands import (
    COMMAND_KEYS,
    RESOURCE_FIELDS,
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
from launcher.plugin.identity import IdentityError, hostname_problem, read_identity
from launcher.plugin.spec import IMAGE_RE, MAX_IMAGE_LEN, InstanceSpec, Networking, StorageEntry
from launcher.plugin.volumes import MAX_VOLUMES, storage_problem
from launcher.transport.payloads.framing import frame
from launcher.transport.payloads.loader import data_error, json_loads, load_yaml, payload_error, show

# --------------------------------------------------------------------------------------------------------------------
# Limits and vocabularies
# --------------------------------------------------------------------------------------------------------------------


UUID_RE = re.compile(r"[0-9a-fA-F]+(?:-[0-9a-fA-F]+)*")  # ciao's uuidRegexp; used with fullmatch
MAX_UUID_LEN = 64
MAC_RE = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")

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
MAX_STORAGE_ENTRIES = MAX_VOLUMES

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
_VOLUME_COMMAND_KEYS = frozenset({"instance_uuid", "volume_uuid", "workload_agent_uuid"})
_NODE_COMMAND_KEYS = frozenset({"workload_agent_uuid"})
_JSON_TEXT_KEYS = ("user_data", "meta_data")

_EXPECTED_COMMANDS = "expected exactly one of " + ", ".join(COMMAND_KEYS)


def is_valid_uuid(text: str) -> bool:
    """True if `text` is an acceptable instance uuid: hex groups joined by '-', at most 64 characters.

    Such a string can never contain a path separator or a '.', so it is safe as a directory name.
    """
    return len(text) <= MAX_UUID_LEN and UUID_RE.fullmatch(text) is not None


# --------------------------------------------------------------------------------------------------------------------
# Documents and commands
# --------------------------------------------------------------------------------------------------------------------


def parse_yaml_command(text: str) -> Command:
    framed = frame(text)
    if framed.has_start_line:
        if not framed.start:
            raise payload_error("the start: document must be one of the first three documents")
        document = load_yaml(framed.start, framed.start_line)
        return _dispatch(document, "YAML", framed.user_data, framed.meta_data)
    # No column-0 "start:" line: a single plain document (stop, delete, ..., or a flow-style start).
    return _dispatch(load_yaml(text), "YAML", None, None)


def parse_json_command(text: str) -> Command:
    try:
        document = json_loads(text)
    except ValueError as exc:
        raise payload_error(f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise payload_error(f"the JSON document must be an object with {_EXPECTED_COMMANDS}; "
                             f"got {_type_name(document)}")
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
                             f"got {_type_name(document)}")
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
    body = _as_map(value, name)
    uuid = _instance_uuid(body, name)
    try:
        return build(body, uuid)
    except PayloadError as exc:
        raise _with_uuid(exc, uuid) from None


def _parse_start_value(value: Any, user_data: Any, meta_data: Any) -> StartCommand:
    return _for_instance(value, "start", lambda body, uuid: _start(body, uuid, user_data, meta_data))


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


def _build_attach(body: dict[Any, Any], uuid: str) -> AttachVolumeCommand:
    return AttachVolumeCommand(uuid, _volume_uuid(body, "attach_volume"))


def _build_detach(body: dict[Any, Any], uuid: str) -> DetachVolumeCommand:
    return DetachVolumeCommand(uuid, _volume_uuid(body, "detach_volume"))


def _volume_uuid(body: dict[Any, Any], name: str) -> str:
    """ATTACH / DETACH (ciao's attach_volume / detach_volume): the volume_uuid, required and a uuid."""
    _check_keys(body, _VOLUME_COMMAND_KEYS, name)
    _get_str(body, "workload_agent_uuid", name)
    volume = _get_str(body, "volume_uuid", name)
    if not volume:
        raise data_error(f"{name}.volume_uuid", "required")
    _check_uuid(volume, f"{name}.volume_uuid")
    return volume


def _node_command(value: Any, name: str, command: Command) -> Command:
    """EVACUATE / RESTORE: null, or a map with an optional workload_agent_uuid."""
    if value is None:
        return command
    if not isinstance(value, dict):
        raise data_error(name, f"expected a map or null, got {_type_name(value)}")
    _check_keys(value, _NODE_COMMAND_KEYS, name)
    _get_str(value, "workload_agent_uuid", name)
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


# --------------------------------------------------------------------------------------------------------------------
# START
# --------------------------------------------------------------------------------------------------------------------


def _start(body: dict[Any, Any], uuid: str, user_data: Any, meta_data: Any) -> StartCommand:
    path = "start"
    _check_keys(body, _START_KEYS, path)
    tenant = _get_str(body, "tenant_uuid", path)
    if tenant:
        _check_uuid(tenant, "start.tenant_uuid")
    if _get_str(body, "docker_image", path):
        raise data_error("start.docker_image", "must be empty: docker instances are not supported")
    fw_type = _get_choice(body, "fw_type", path, FW_TYPES)
    persistence = _get_choice(body, "persistence", path, PERSISTENCE_TYPES)
    vm_type = _get_choice(body, "vm_type", path, VM_TYPES)
    _get_str(body, "workload_agent_uuid", path)
    requested = _resource_list(body.get("requested_resources"), "start.requested_resources", read=True)
    _resource_list(body.get("estimated_resources"), "start.estimated_resources", read=False)
    requirements = _requirements(body.get("requirements"), "start.requirements")
    resources = _merge_resources(requested, requirements, "start.requirements")
    storage = _storage(body.get("storage"), "start.storage")
    spec = InstanceSpec(
        instance_uuid=uuid,
        tenant_uuid=tenant,
        image_uuid=_image_uuid(_get_str(body, "image_uuid", path), storage, "start.image_uuid"),
        fw_type=fw_type,
        vm_type=vm_type,
        persistence=persistence,
        **{name: resources[name] for name in RESOURCE_FIELDS if name in resources},
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
    problem = storage_problem(spec)  # boot, boot_index, swap and tag rules (launcher/plugin/volumes.py)
    if problem is not None:
        raise data_error(f"start.{problem.field}", problem.reason)
    return StartCommand(spec, frozenset(name for name in RESOURCE_FIELDS if name not in resources))


def _instance_uuid(body: dict[Any, Any], path: str) -> str:
    uuid = _get_str(body, "instance_uuid", path)
    if not uuid:
        raise data_error(f"{path}.instance_uuid", "required")
    _check_uuid(uuid, f"{path}.instance_uuid")
    return uuid


def _check_uuid(value: str, path: str) -> None:
    if len(value) > MAX_UUID_LEN:
        raise data_error(path, f"longer than {MAX_UUID_LEN} characters")
    if UUID_RE.fullmatch(value) is None:
        raise data_error(path, f"invalid uuid {show(value)} (expected hex groups joined by '-')")


def _image_uuid(image: str, storage: tuple[StorageEntry, ...], path: str) -> str:
    """The backing image's name: a plain file name, never a path. Optional only with a bootable volume."""
    if not image:
        if any(entry.boot for entry in storage):
            return ""
        raise data_error(path, "required unless a storage entry has boot: true")
    if len(image) > MAX_IMAGE_LEN:
        raise data_error(path, f"longer than {MAX_IMAGE_LEN} characters")
    if IMAGE_RE.fullmatch(image) is None or image in (".", ".."):
        raise data_error(path, f"invalid image name {show(image)} (letters, digits, '.', '_' and '-' only, "
                                "not '.' or '..')")
    return image


def _check_limit(name: str, value: int, path: str) -> None:
    low, high = RESOURCE_LIMITS[name]
    if not low <= value <= high:
        raise data_error(path, f"{name} must be between {low} and {high}, got {value}")


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
            raise data_error(f"{item_path}.type", "required")
        if kind not in RESOURCE_TYPES:
            raise data_error(f"{item_path}.type", f"unknown resource type {show(kind)} "
                                                   f"(known: {', '.join(sorted(RESOURCE_TYPES))})")
        amount = _get_int(entry, "value", item_path)
        _get_str(entry, "value_string", item_path)
        _get_bool(entry, "mandatory", item_path)
        if not read or kind not in READ_RESOURCES:
            continue
        if amount is None:
            raise data_error(f"{item_path}.value", f"required for {kind}")
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
                raise data_error(f"{path}.{name}",
                                  f"{requirements[name]!r} disagrees with {where}.value ({amount!r})")
            merged[name] = requirements[name]
    return merged


def _check_hostname(name: str, path: str) -> None:
    problem = hostname_problem(name)
    if problem is not None:
        raise data_error(path, f"invalid hostname {show(name)}: {problem}")


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
        raise data_error(path, f"invalid MAC address {show(mac)} (expected xx:xx:xx:xx:xx:xx)")
    if int(mac[:2], 16) & 1:
        raise data_error(path, f"{show(mac)} is a multicast MAC address; a unicast one is required")
    if int(mac.replace(":", ""), 16) == 0:
        raise data_error(path, "the all-zero MAC address is not a valid unicast address")


def _check_ipv4(address: str, path: str) -> None:
    try:
        IPv4Address(address)
    except AddressValueError:
        raise data_error(path, f"invalid IPv4 address {show(address)}") from None


def _check_cidr(subnet: str, path: str) -> None:
    try:
        if "/" not in subnet:
            raise ValueError
        IPv4Network(subnet, strict=False)
    except (AddressValueError, NetmaskValueError, ValueError):
        raise data_error(path, f"invalid IPv4 CIDR {show(subnet)} (expected a.b.c.d/n)") from None


def _storage(value: Any, path: str) -> tuple[StorageEntry, ...]:
    if value is None:
        return ()
    if isinstance(value, dict):
        raise data_error(path, "must be a list of maps (- id: ...), got a map")
    entries: list[StorageEntry] = []
    seen: set[str] = set()
    items = _as_list(value, path)
    if len(items) > MAX_STORAGE_ENTRIES:
        raise data_error(path, f"at most {MAX_STORAGE_ENTRIES} entries (the VM's disk slots), got {len(items)}")
    for index, item in enumerate(items):
        entry = _storage_entry(item, f"{path}[{index}]")
        if entry.id in seen:
            raise data_error(f"{path}[{index}].id", f"duplicate storage id {show(entry.id)}")
        seen.add(entry.id)
        entries.append(entry)
    return tuple(entries)


def _storage_entry(item: Any, path: str) -> StorageEntry:
    body = _as_map(item, path)
    _check_keys(body, _STORAGE_KEYS, path)
    volume = _get_str(body, "id", path)
    if not volume:
        raise data_error(f"{path}.id", "required (a volume's uuid, also for a local volume the launcher makes)")
    _check_uuid(volume, f"{path}.id")
    size = _get_int(body, "size", path) or 0
    if size < 0:
        raise data_error(f"{path}.size", f"must not be negative, got {size}")
    local = _get_bool(body, "local", path)
    if local and not size:
        raise data_error(f"{path}.size", "required for a local volume (GiB, at least 1)")
    return StorageEntry(
        id=volume,
        boot=_get_bool(body, "boot", path),
        boot_index=_get_boot_index(body, path),
        ephemeral=_get_bool(body, "ephemeral", path),
        local=local,
        swap=_get_bool(body, "swap", path),
        tag=_get_str(body, "tag", path),
        size=size,
    )


def _get_boot_index(body: dict[Any, Any], path: str) -> str:
    """ciao's boot_index was an int at some revisions and a string at others; both are kept as text (what it
    may say: `launcher.plugin.volumes.boot_index_of`, checked with the other storage rules)."""
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
        _check_identity(value)
        try:
            return json.dumps(value, indent=2) + "\n"
        except (RecursionError, ValueError):
            raise data_error("meta_data", "cannot be serialized as JSON") from None
    if type(value) is not str:
        _wrong_type("meta_data", "a string or a JSON object", value)
    if not value.strip():
        return ""
    try:
        document = json_loads(value)
    except ValueError as exc:
        raise data_error("meta_data", f"not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise data_error("meta_data", f"must be a JSON object, got {_type_name(document)}")
    _check_identity(document)
    return value


def _check_identity(document: dict[str, Any]) -> None:
    """The guest identity the meta-data gives must be usable in every seed format (`launcher.plugin.identity`)."""
    try:
        read_identity(document)
    except IdentityError as exc:
        raise data_error(f"meta_data.{exc.key}", exc.reason) from None


# --------------------------------------------------------------------------------------------------------------------
# Typed field access
# --------------------------------------------------------------------------------------------------------------------

_TYPE_NAMES = {type(None): "null", bool: "bool", int: "integer", float: "number", str: "string", dict: "map",
               list: "list"}


def _type_name(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _wrong_type(path: str, expected: str, value: object) -> NoReturn:
    raise data_error(path, f"expected {expected}, got {_type_name(value)}")


def _check_keys(body: dict[Any, Any], allowed: frozenset[str], path: str) -> None:
    if not allowed.issuperset(body):
        unknown = next(key for key in body if key not in allowed)
        raise data_error(f"{path}.{unknown}", "unknown field")


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
        raise data_error(f"{path}.{key}", f"must be one of {allowed}; got {show(value)}")
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
        raise data_error(f"{path}.grace", f"must be between 0 and {MAX_GRACE_S} seconds, got {value}")
    return float(value)
