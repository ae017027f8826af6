"""What a START document may hold: from the start map (plus user-data and meta-data) to a `StartCommand`.

`start_command` checks every field of the START: the instance's image, its firmware and persistence, the resources
it asks for (``requested_resources``, ``estimated_resources``, HEAD's ``requirements``, which must agree), its
networking (MACs, IPv4 addresses and subnets), its storage entries (volume uuids, sizes, the boot rules of
`launcher.plugin.volumes`), its hostname and the guest identity its meta-data gives. Every refusal is a
`PayloadError` (`invalid_data`) whose reason names the key path; nothing here does I/O.

The instance model it builds, `InstanceSpec`, is the plugin API's (`launcher.plugin.spec`).
"""

from __future__ import annotations

import json
import re
from ipaddress import AddressValueError, IPv4Address, IPv4Network, NetmaskValueError
from typing import Any

import attrs

from launcher.core.commands import RESOURCE_FIELDS, StartCommand
from launcher.plugin.identity import IdentityError, hostname_problem, read_identity
from launcher.plugin.spec import IMAGE_RE, MAX_IMAGE_LEN, InstanceSpec, Networking, StorageEntry
from launcher.plugin.volumes import MAX_VOLUMES, storage_problem
from launcher.transport.payloads.fields import (
    as_list,
    as_map,
    check_keys,
    check_uuid,
    get_bool,
    get_choice,
    get_int,
    get_str,
    type_name,
    wrong_type,
)
from launcher.transport.payloads.loader import data_error, json_loads, show

# --------------------------------------------------------------------------------------------------------------------
# Limits and vocabularies
# --------------------------------------------------------------------------------------------------------------------


MAC_RE = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")

FW_TYPES = ("legacy", "efi", "")
# A virtualizer's name: ciao's `qemu` and `docker`, or another installed one. Whether it is enabled on this node is
# the supervisor's check (`invalid_data` naming the enabled ones), as is which image field it needs.
VM_TYPE_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# A Docker image reference: [registry[:port]/]path[:tag][@digest], as Docker's reference grammar allows.
DOCKER_IMAGE_RE = re.compile(r"[a-z0-9][a-z0-9._:/@-]*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?")
MAX_DOCKER_IMAGE_LEN = 255
PERSISTENCE_TYPES = ("all", "vm", "host", "")

# Resource names ciao payloads know (§3.1, plus INIT's disk_mb). Only READ_RESOURCES are used.
RESOURCE_TYPES = frozenset({
    "vcpus", "mem_mb", "disk_mb", "network_node", "compute_node", "physical_network",
    "instance", "volume", "image", "external_ip", "shared_disk_gib",
})
READ_RESOURCES = ("vcpus", "mem_mb", "disk_mb", "network_node")
RESOURCE_LIMITS = {"vcpus": (1, 256), "mem_mb": (16, 1_048_576), "disk_mb": (1, 67_108_864)}

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


# --------------------------------------------------------------------------------------------------------------------
# START
# --------------------------------------------------------------------------------------------------------------------


def start_command(body: dict[Any, Any], uuid: str, user_data: Any, meta_data: Any) -> StartCommand:
    """The START whose map is `body` and whose instance_uuid, `uuid`, is already checked; `user_data` and
    `meta_data` as the framing (YAML) or the JSON object gave them, None when absent."""
    path = "start"
    check_keys(body, _START_KEYS, path)
    tenant = get_str(body, "tenant_uuid", path)
    if tenant:
        check_uuid(tenant, "start.tenant_uuid")
    fw_type = get_choice(body, "fw_type", path, FW_TYPES)
    persistence = get_choice(body, "persistence", path, PERSISTENCE_TYPES)
    vm_type = get_str(body, "vm_type", path)
    if vm_type and VM_TYPE_RE.fullmatch(vm_type) is None:
        raise data_error("start.vm_type", f"invalid virtualizer name {show(vm_type)} (e.g. qemu or docker)")
    get_str(body, "workload_agent_uuid", path)
    requested = _resource_list(body.get("requested_resources"), "start.requested_resources", read=True)
    _resource_list(body.get("estimated_resources"), "start.estimated_resources", read=False)
    requirements = _requirements(body.get("requirements"), "start.requirements")
    resources = _merge_resources(requested, requirements, "start.requirements")
    storage = _storage(body.get("storage"), "start.storage")
    spec = InstanceSpec(
        instance_uuid=uuid,
        tenant_uuid=tenant,
        image_uuid=_image_uuid(get_str(body, "image_uuid", path), "start.image_uuid"),
        docker_image=_docker_image(get_str(body, "docker_image", path), "start.docker_image"),
        fw_type=fw_type,
        vm_type=vm_type,
        persistence=persistence,
        **{name: resources[name] for name in RESOURCE_FIELDS if name in resources},
        network_node=bool(resources.get("network_node", False)),
        hostname=requirements.get("hostname", ""),
        node_id=requirements.get("node_id", ""),
        privileged=requirements.get("privileged", False),
        restart=get_bool(body, "restart", path),
        networking=_networking(body.get("networking"), "start.networking"),
        storage=storage,
        user_data=_user_data(user_data),
        meta_data=_meta_data(meta_data),
    )
    problem = storage_problem(spec)  # boot, boot_index, swap and tag rules (launcher/plugin/volumes.py)
    if problem is not None:
        raise data_error(f"start.{problem.field}", problem.reason)
    return StartCommand(spec, frozenset(name for name in RESOURCE_FIELDS if name not in resources))


def _image_uuid(image: str, path: str) -> str:
    """The backing image's name, if given: a plain file name, never a path. (Whether the instance needs one is
    its virtualizer's rule, checked at dispatch: `launcher.plugin.spec.vm_image_problem` for VMs.)"""
    if not image:
        return ""
    if len(image) > MAX_IMAGE_LEN:
        raise data_error(path, f"longer than {MAX_IMAGE_LEN} characters")
    if IMAGE_RE.fullmatch(image) is None or image in (".", ".."):
        raise data_error(path, f"invalid image name {show(image)} (letters, digits, '.', '_' and '-' only, "
                                "not '.' or '..')")
    return image


def _docker_image(image: str, path: str) -> str:
    """A container's image, if given: a Docker reference such as ``busybox:latest`` or ``registry:5000/a/b:1``."""
    if not image:
        return ""
    if len(image) > MAX_DOCKER_IMAGE_LEN:
        raise data_error(path, f"longer than {MAX_DOCKER_IMAGE_LEN} characters")
    if DOCKER_IMAGE_RE.fullmatch(image) is None or "//" in image or image.endswith(("/", ":", "@")):
        raise data_error(path, f"invalid image reference {show(image)} (e.g. busybox:latest)")
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
    for index, item in enumerate(as_list(value, path)):
        item_path = f"{path}[{index}]"
        entry = as_map(item, item_path)
        check_keys(entry, _RESOURCE_KEYS, item_path)
        kind = get_str(entry, "type", item_path)
        if not kind:
            raise data_error(f"{item_path}.type", "required")
        if kind not in RESOURCE_TYPES:
            raise data_error(f"{item_path}.type", f"unknown resource type {show(kind)} "
                                                   f"(known: {', '.join(sorted(RESOURCE_TYPES))})")
        amount = get_int(entry, "value", item_path)
        get_str(entry, "value_string", item_path)
        get_bool(entry, "mandatory", item_path)
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
    body = as_map(value, path)
    check_keys(body, _REQUIREMENT_KEYS, path)
    given: dict[str, Any] = {}
    for name in RESOURCE_LIMITS:
        amount = get_int(body, name, path)
        if amount is not None:
            _check_limit(name, amount, f"{path}.{name}")
            given[name] = amount
    for name in ("network_node", "privileged"):
        if body.get(name) is not None:
            given[name] = get_bool(body, name, path)
    given["node_id"] = get_str(body, "node_id", path)
    hostname = get_str(body, "hostname", path)
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
    body = as_map(value, path)
    check_keys(body, _NETWORKING_KEYS, path)
    fields: dict[str, Any] = {name: get_str(body, name, path) for name in _NETWORKING_STR_KEYS}
    fields["public_ip"] = get_bool(body, "public_ip", path)
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
    items = as_list(value, path)
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
    body = as_map(item, path)
    check_keys(body, _STORAGE_KEYS, path)
    volume = get_str(body, "id", path)
    if not volume:
        raise data_error(f"{path}.id", "required (a volume's uuid, also for a local volume the launcher makes)")
    check_uuid(volume, f"{path}.id")
    size = get_int(body, "size", path) or 0
    if size < 0:
        raise data_error(f"{path}.size", f"must not be negative, got {size}")
    local = get_bool(body, "local", path)
    if local and not size:
        raise data_error(f"{path}.size", "required for a local volume (GiB, at least 1)")
    return StorageEntry(
        id=volume,
        boot=get_bool(body, "boot", path),
        boot_index=_get_boot_index(body, path),
        ephemeral=get_bool(body, "ephemeral", path),
        local=local,
        swap=get_bool(body, "swap", path),
        tag=get_str(body, "tag", path),
        size=size,
    )


def _get_boot_index(body: dict[Any, Any], path: str) -> str:
    """ciao's boot_index was an int at some revisions and a string at others; both are kept as text (what it
    may say: `launcher.plugin.volumes.boot_index_of`, checked with the other storage rules)."""
    value = body.get("boot_index")
    if type(value) is int:
        return str(value)
    return get_str(body, "boot_index", path)


def _user_data(value: Any) -> str:
    if value is None:
        return ""
    if type(value) is not str:
        wrong_type("user_data", "a string", value)
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
        wrong_type("meta_data", "a string or a JSON object", value)
    if not value.strip():
        return ""
    try:
        document = json_loads(value)
    except ValueError as exc:
        raise data_error("meta_data", f"not valid JSON ({exc})") from None
    if not isinstance(document, dict):
        raise data_error("meta_data", f"must be a JSON object, got {type_name(document)}")
    _check_identity(document)
    return value


def _check_identity(document: dict[str, Any]) -> None:
    """The guest identity the meta-data gives must be usable in every seed format (`launcher.plugin.identity`)."""
    try:
        read_identity(document)
    except IdentityError as exc:
        raise data_error(f"meta_data.{exc.key}", exc.reason) from None
