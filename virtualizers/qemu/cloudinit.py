"""The per-instance cloud-init seed: what goes into it (`make_seed`) and the ISO image that carries it (`write_seed`).

The seed is built in-process with pycdlib; no external ISO tool is run.

Identity
    The *instance-id* is the meta-data's ``instance-id``, else its ``uuid``, else the instance uuid. The
    *hostname* is the meta-data's ``local-hostname``, else its ``hostname``, else the instance uuid. A key that is
    absent, null or the empty string counts as absent; any other value must be a string without control
    characters.

Meta-data
    YAML or JSON text (JSON is YAML) holding a mapping with string keys, as ciao sends it (for instance
    ``{"uuid": "ciao", "hostname": "ciao"}``). Blank text, or a document that is null, means an empty mapping.
    Anything else (unparseable text, a list, a scalar) is an error.

Networking
    Used only when it has a ``vnic_mac`` (six hex octets joined by ``:``, written lower-case). The address is
    static when both ``private_ip`` and ``subnet`` are given (``private_ip`` must be a host address of the IPv4
    CIDR ``subnet``; its prefix length is the subnet's); otherwise the guest asks DHCP. No gateway or DNS server
    is written: the payload names none (the concentrator is not known to be a gateway).

``nocloud`` (the default format; ISO volume label ``cidata``)
    ``meta-data``: YAML whose first two lines are ``instance-id: <instance-id>`` and
    ``local-hostname: <hostname>`` (quoted only where YAML requires), followed by the payload's other keys in
    their order (``uuid``, ``hostname``, ``instance-id`` and ``local-hostname`` are replaced by the two lines).
    ``user-data``: the payload's user-data, UTF-8 encoded, byte for byte (empty if there is none).
    ``network-config`` (only with a MAC): cloud-init network config version 2, one ethernet matched by
    ``macaddress`` and renamed ``eth0``, with ``addresses: [<ip>/<prefix>]`` or ``dhcp4: true``.

``configdrive`` (OpenStack config drive, as ciao produced; label ``config-2``)
    ``openstack/latest/meta_data.json``: the payload's keys with ``uuid`` = instance-id and ``hostname`` =
    hostname, plus ``name`` = hostname unless the payload has a ``name``; JSON indented by 2.
    ``openstack/latest/user_data``: the user-data, written even when empty.
    ``openstack/latest/network_data.json`` (only with a MAC): OpenStack network_data with one ``phy`` link and
    one network of type ``ipv4`` (``ip_address``, ``netmask``) or ``ipv4_dhcp``, and no services.

The ISO is ISO 9660 at interchange level 3 with Joliet (level 3) and Rock Ridge 1.09 extensions, so Linux
(which prefers Rock Ridge) and other readers (Joliet) see the names above exactly; the plain ISO 9660 names are
upper-case with ``_`` for other characters (``META_DATA.;1``). The volume identifier is the label.

Every problem with the inputs raises `SeedError` with a reason naming the field (``networking.private_ip``,
``meta-data.hostname``, ...); the caller reports it as ciao's ``image_failure``.
"""

from __future__ import annotations

import io
import ipaddress
import json
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import attrs
import pycdlib
import yaml
from pycdlib.pycdlibexception import PyCdlibException

from launcher.plugin.files import atomic_write
from launcher.plugin.spec import Networking

SEED_FORMATS = ("nocloud", "configdrive")

_LABELS = {"nocloud": "cidata", "configdrive": "config-2"}
_OPENSTACK = "openstack/latest"
_GUEST_NIC = "eth0"  # the name NoCloud gives the matched NIC
_NOCLOUD_REPLACED = frozenset({"instance-id", "uuid", "local-hostname", "hostname"})  # keys the identity replaces
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
_NOT_D_CHARACTER = re.compile(r"[^A-Z0-9_]")
_YAML_WIDTH = 1 << 30  # never fold a long scalar over several lines
# yaml.safe_load / safe_dump, with libyaml's implementation when available (several times faster)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class SeedError(ValueError):
    """The seed cannot be made from these inputs; the message names the field at fault."""


def _frozen_files(files: Mapping[str, bytes]) -> Mapping[str, bytes]:
    return MappingProxyType(dict(files))


@attrs.frozen
class Seed:
    """The content of one seed ISO: its volume label and its files (ISO path -> content, in writing order)."""

    label: str
    files: Mapping[str, bytes] = attrs.field(converter=_frozen_files)
    instance_id: str
    hostname: str


@attrs.frozen
class _Address:
    """A validated network config: the lower-case MAC, and the static address (None: DHCP)."""

    mac: str
    interface: ipaddress.IPv4Interface | None


# --------------------------------------------------------------------------------------------------------------------
# What goes into the seed (pure)
# --------------------------------------------------------------------------------------------------------------------


def make_seed(fmt: str, instance_uuid: str, user_data: str, meta_data: str, networking: Networking) -> Seed:
    """The seed of one instance in format `fmt` (one of `SEED_FORMATS`). Pure: no I/O.

    Raises `SeedError` for an unknown format, meta-data that is not a mapping, an identity value that is not a
    string, text that is not encodable as UTF-8, or invalid networking (see the module docstring)."""
    if fmt not in SEED_FORMATS:
        raise SeedError(f"unknown seed format {fmt!r} (expected one of {', '.join(SEED_FORMATS)})")
    metadata = _parse_meta_data(_utf8(meta_data, "meta-data"))
    instance_id = _identity(metadata, ("instance-id", "uuid"), instance_uuid)
    hostname = _identity(metadata, ("local-hostname", "hostname"), instance_uuid)
    user_bytes = _utf8(user_data, "user-data")
    address = _address(networking)
    if fmt == "nocloud":
        files = _nocloud_files(metadata, instance_id, hostname, user_bytes, address)
    else:
        files = _configdrive_files(metadata, instance_id, hostname, user_bytes, address)
    return Seed(label=_LABELS[fmt], files=files, instance_id=instance_id, hostname=hostname)


def _parse_meta_data(text: bytes) -> dict[str, Any]:
    """The meta-data mapping; blank text or a null document is an empty one."""
    if not text.strip():
        return {}
    try:
        value = yaml.load(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as exc:
        raise SeedError(f"meta-data: not valid YAML or JSON: {_yaml_problem(exc)}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SeedError(f"meta-data: must be a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise SeedError(f"meta-data: keys must be strings, got {key!r}")
    return value


def _identity(metadata: Mapping[str, Any], keys: tuple[str, str], default: str) -> str:
    """The value of the first of `keys` present in `metadata` (null and "" count as absent), else `default`."""
    for key in keys:
        value = metadata.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str) or not value.isprintable():
            raise SeedError(f"meta-data.{key}: must be a string without control characters, got {value!r:.60}")
        return value
    return default


def _utf8(text: str, field: str) -> bytes:
    """`text` in UTF-8; a lone surrogate (which a JSON payload can smuggle in with "\\ud800") is a SeedError."""
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise SeedError(f"{field}: not encodable as UTF-8 ({exc.reason} at offset {exc.start})") from None


def _address(networking: Networking) -> _Address | None:
    """The validated network config of `networking`; None without a MAC."""
    if not networking.vnic_mac:
        return None
    if _MAC_RE.fullmatch(networking.vnic_mac) is None:
        raise SeedError(
            f"networking.vnic_mac {networking.vnic_mac!r:.60} is not a MAC address (xx:xx:xx:xx:xx:xx)"
        )
    mac = networking.vnic_mac.lower()
    if not (networking.private_ip and networking.subnet):
        return _Address(mac, None)
    subnet = _subnet(networking.subnet)
    try:
        ip = ipaddress.IPv4Address(networking.private_ip)
    except ValueError:
        raise SeedError(f"networking.private_ip {networking.private_ip!r:.60} is not an IPv4 address") from None
    if ip not in subnet:
        raise SeedError(f"networking.private_ip {ip} is not in subnet {subnet}")
    if subnet.prefixlen < 31 and ip in (subnet.network_address, subnet.broadcast_address):
        raise SeedError(f"networking.private_ip {ip} is not a host address of subnet {subnet}")
    return _Address(mac, ipaddress.IPv4Interface((ip, subnet.prefixlen)))


def _subnet(cidr: str) -> ipaddress.IPv4Network:
    """The IPv4 network of `cidr` ("a.b.c.d/n"; host bits may be set)."""
    try:
        if "/" not in cidr:
            raise ValueError(cidr)
        return ipaddress.IPv4Network(cidr, strict=False)
    except ValueError:
        raise SeedError(f"networking.subnet {cidr!r:.60} is not an IPv4 CIDR (a.b.c.d/n)") from None


def _nocloud_files(
    metadata: Mapping[str, Any], instance_id: str, hostname: str, user_data: bytes, address: _Address | None
) -> dict[str, bytes]:
    identity = {"instance-id": instance_id, "local-hostname": hostname}
    rest = {key: value for key, value in metadata.items() if key not in _NOCLOUD_REPLACED}
    files = {"meta-data": (_yaml(identity) + (_yaml(rest) if rest else "")).encode(), "user-data": user_data}
    if address is not None:
        files["network-config"] = _yaml(_network_config_v2(address)).encode()
    return files


def _network_config_v2(address: _Address) -> dict[str, Any]:
    """cloud-init network config version 2 for the one NIC."""
    ethernet: dict[str, Any] = {"match": {"macaddress": address.mac}, "set-name": _GUEST_NIC}
    if address.interface is None:
        ethernet["dhcp4"] = True
    else:
        ethernet["addresses"] = [address.interface.with_prefixlen]
    return {"version": 2, "ethernets": {_GUEST_NIC: ethernet}}


def _configdrive_files(
    metadata: Mapping[str, Any], instance_id: str, hostname: str, user_data: bytes, address: _Address | None
) -> dict[str, bytes]:
    meta = {**metadata, "uuid": instance_id, "hostname": hostname}
    meta.setdefault("name", hostname)
    try:
        meta_json = _json(meta)
    except (TypeError, ValueError) as exc:
        raise SeedError(f"meta-data: cannot be written as JSON ({exc})") from None
    files = {f"{_OPENSTACK}/meta_data.json": meta_json, f"{_OPENSTACK}/user_data": user_data}
    if address is not None:
        files[f"{_OPENSTACK}/network_data.json"] = _json(_network_data(address))
    return files


def _network_data(address: _Address) -> dict[str, Any]:
    """OpenStack network_data for the one NIC."""
    link = {"id": "link0", "type": "phy", "ethernet_mac_address": address.mac}
    network: dict[str, Any] = {"id": "network0", "link": "link0"}
    if address.interface is None:
        network["type"] = "ipv4_dhcp"
    else:
        network.update(type="ipv4", ip_address=str(address.interface.ip), netmask=str(address.interface.netmask))
    return {"links": [link], "networks": [network], "services": []}


def _yaml(value: Mapping[str, Any]) -> str:
    return str(yaml.dump(value, Dumper=_YAML_DUMPER, sort_keys=False, allow_unicode=True, width=_YAML_WIDTH))


def _json(value: Mapping[str, Any]) -> bytes:
    """Strict JSON (no NaN) indented by 2, with a final newline. TypeError or ValueError if `value` has no JSON
    form."""
    return (json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong, and where, on one line."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        return f"{exc.problem} (line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1})"
    return " ".join(str(exc).split())


# --------------------------------------------------------------------------------------------------------------------
# The ISO (blocking I/O)
# --------------------------------------------------------------------------------------------------------------------


def write_seed(seed: Seed, path: Path) -> None:
    """Write `seed` as an ISO image to `path`, replacing any file there. Blocking: run it in a worker thread.

    The image is mastered in memory, written to a temporary file next to `path`, fsynced and renamed over
    `path`, then the directory is fsynced: `path` is never seen half-written, and on failure the temporary file
    is removed (an earlier `path` stays as it was). Raises `SeedError` if the seed cannot be laid out as an ISO
    (a label longer than 32 characters, two paths that map to one ISO 9660 name) and OSError if writing fails."""
    atomic_write(path, _master(seed))


def _master(seed: Seed) -> bytes:
    """The ISO image of `seed`. Mastering to memory and writing the image at once avoids pycdlib's many small
    seeks and writes on a real file."""
    iso = pycdlib.PyCdlib()
    try:
        iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=seed.label)
        claimed: dict[str, str] = {}
        for name, data in seed.files.items():
            _add_parents(iso, name, claimed)
            names = _names(name, is_directory=False)
            _claim(claimed, name, names.iso_path)
            iso.add_fp(io.BytesIO(data), len(data), iso_path=names.iso_path, rr_name=names.rr_name,
                       joliet_path=names.joliet_path)
        image = io.BytesIO()
        iso.write_fp(image)
    except PyCdlibException as exc:
        raise SeedError(f"the seed cannot be laid out as an ISO: {exc}") from None
    return image.getvalue()


def _add_parents(iso: pycdlib.PyCdlib, name: str, claimed: dict[str, str]) -> None:
    """Add the directories leading to file `name` that are not in the ISO yet."""
    parts = name.split("/")
    for depth in range(1, len(parts)):
        directory = "/".join(parts[:depth])
        names = _names(directory, is_directory=True)
        if _claim(claimed, directory, names.iso_path):
            iso.add_directory(iso_path=names.iso_path, rr_name=names.rr_name, joliet_path=names.joliet_path)


def _claim(claimed: dict[str, str], path: str, iso_path: str) -> bool:
    """Record in `claimed` (ISO 9660 path -> seed path) that `path` is `iso_path`; False if it already was.

    pycdlib accepts two files with one ISO 9660 name (e.g. "a-b" and "a_b") and writes a broken image, hence the
    SeedError."""
    owner = claimed.get(iso_path)
    if owner is None:
        claimed[iso_path] = path
        return True
    if owner != path:
        raise SeedError(f"seed paths {owner!r} and {path!r} have the same ISO 9660 name {iso_path}")
    return False


class _IsoNames(NamedTuple):
    iso_path: str
    rr_name: str
    joliet_path: str


def _names(path: str, *, is_directory: bool) -> _IsoNames:
    """pycdlib's three names of `path`: ISO 9660 (level 3 d-characters), Rock Ridge (the last component) and
    Joliet (the path as is)."""
    *parents, last = path.split("/")
    leaf = _d_characters(last) if is_directory else _iso9660_file_name(last)
    iso_path = "/" + "/".join([*map(_d_characters, parents), leaf])
    return _IsoNames(iso_path=iso_path, rr_name=last, joliet_path="/" + path)


def _iso9660_file_name(name: str) -> str:
    """ "meta_data.json" -> "META_DATA.JSON;1", "meta-data" -> "META_DATA.;1"."""
    stem, _, extension = name.rpartition(".") if "." in name else (name, "", "")
    return f"{_d_characters(stem)}.{_d_characters(extension)};1"


def _d_characters(text: str) -> str:
    return _NOT_D_CHARACTER.sub("_", text.upper())
