"""The per-instance cloud-init seed: what goes into it (`make_seed`) and the ISO image that carries it (`write_seed`).

The seed is built in-process with pycdlib; no external ISO tool is run.

Identity
    Read from the meta-data by `launcher.plugin.identity` (one meaning whatever the format: instance-id from
    ``instance-id`` or ``uuid``, hostname from ``local-hostname`` or ``hostname``, SSH keys from ``public-keys``
    or ``public_keys``), then written with the keys each format's cloud-init datasource reads. Without them the
    instance-id is the instance uuid and the hostname the uuid cut to 63 characters.

Meta-data
    YAML or JSON text holding a mapping with string keys, read by `launcher.plugin.identity.parse_meta_data`
    (blank text or a null document is an empty mapping; anything else is an error). Keys other than the
    identity's are passed through unchanged, in their order.

Devices
    `make_seed`'s ``devices`` (OpenStack's device role tagging, `launcher.plugin.volumes.devices_metadata`: one
    ``{"type": "disk", "bus": "virtio", "serial": <volume id>, "tags": [<tag>]}`` per tagged volume) is written
    under the meta-data key ``devices`` in both formats (ConfigDrive's meta_data.json, as OpenStack does, and
    NoCloud's meta-data), replacing a ``devices`` key of the payload's meta-data. Without devices the payload's
    meta-data passes through as it is.

Networking
    Used only when it has a ``vnic_mac`` (six hex octets joined by ``:``, written lower-case). The NIC is matched
    by that MAC and named ``eth0`` in both formats. The address is static when both ``private_ip`` and ``subnet``
    are given (``private_ip`` must be a host address of the IPv4 CIDR ``subnet``; its prefix length is the
    subnet's: `launcher.plugin.guest_network`, the rule containers follow too); otherwise the guest asks DHCP.
    The node's `GuestNetwork` settings (``qemu.guest_network``) add:
    a default route for a static address (``gateway``: the subnet's first host, as ciao's networks used, an
    address in the subnet, or none; never the instance's own address), DNS servers and search domains (static
    or DHCP), and the MTU. Both formats carry the same configuration, so that cloud-init renders the same one
    (tests/test_cloudinit_reader.py checks it with cloud-init's own code).

``nocloud`` (the default format; ISO volume label ``cidata``)
    ``meta-data``: YAML whose first lines are ``instance-id: <instance-id>`` and ``local-hostname: <hostname>``
    (quoted only where YAML requires), then ``public-keys: [<key>, ...]`` if there are keys, followed by the
    payload's other keys in their order.
    ``user-data``: the payload's user-data, UTF-8 encoded, byte for byte (empty if there is none).
    ``network-config`` (only with a MAC): cloud-init network config version 1: one ``physical`` interface
    ``eth0`` with ``mac_address`` (and ``mtu``), one subnet (``static`` with ``address``/``netmask``, the default
    route's ``gateway`` and the DNS in ``dns_nameservers``/``dns_search``; or ``dhcp4``), and a ``nameserver``
    entry with the DNS servers (what network_data's ``dns`` services become).

``configdrive`` (OpenStack config drive, as ciao produced; label ``config-2``)
    ``openstack/latest/meta_data.json``: the payload's other keys with ``uuid`` = instance-id, ``hostname`` =
    hostname, ``name`` = hostname unless the payload has a ``name``, and ``public_keys`` = {name: key} if there
    are keys; JSON indented by 2.
    ``openstack/latest/user_data``: the user-data, written even when empty.
    ``openstack/latest/network_data.json`` (only with a MAC): OpenStack network_data with one ``phy`` link
    (``name`` ``eth0``, which cloud-init honours, and ``mtu``), one network of type ``ipv4`` (``ip_address``,
    ``netmask``, the default route's ``gateway``) or ``ipv4_dhcp``, with the DNS in ``dns_nameservers`` /
    ``dns_search`` (keys cloud-init reads), and the DNS servers as ``dns`` services (OpenStack's own form).

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import attrs
import pycdlib
import yaml
from pycdlib.pycdlibexception import PyCdlibException

from launcher.plugin import guest_network
from launcher.plugin.files import atomic_write
from launcher.plugin.guest_network import GATEWAYS, NetworkError
from launcher.plugin.identity import (
    GuestIdentity,
    IdentityError,
    MetaDataError,
    default_hostname,
    hostname_problem,
    parse_meta_data,
    read_identity,
)
from launcher.plugin.spec import Networking

SEED_FORMATS = ("nocloud", "configdrive")

_LABELS = {"nocloud": "cidata", "configdrive": "config-2"}
_OPENSTACK = "openstack/latest"
_GUEST_NIC = "eth0"  # the name the matched NIC gets in both formats
_NOT_D_CHARACTER = re.compile(r"[^A-Z0-9_]")
_YAML_WIDTH = 1 << 30  # never fold a long scalar over several lines
# yaml.safe_dump, with libyaml's implementation when available (several times faster)
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


def _gateway_setting(instance: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in GATEWAYS:
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            raise ValueError(f"{attribute.name}: must be first_host, none or an IPv4 address, got {value!r}") from None


def _addresses_setting(instance: Any, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]) -> None:
    for address in value:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"{attribute.name}: {address!r} is not an IP address") from None


def _domains_setting(instance: Any, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]) -> None:
    for domain in value:
        problem = hostname_problem(domain)
        if problem is not None:
            raise ValueError(f"{attribute.name}: {domain!r} is not a domain name: {problem}")


def _mtu_setting(instance: Any, attribute: attrs.Attribute[int], value: int) -> None:
    if value and not 68 <= value <= 65535:
        raise ValueError(f"{attribute.name}: must be 0 (not set) or from 68 to 65535, got {value}")


@attrs.frozen
class GuestNetwork:
    """The node's settings for its guests' network (the `qemu.guest_network` section)."""

    gateway: str = attrs.field(default="first_host", validator=_gateway_setting)  # for a static address
    dns_servers: tuple[str, ...] = attrs.field(default=(), validator=_addresses_setting)
    dns_search: tuple[str, ...] = attrs.field(default=(), validator=_domains_setting)
    mtu: int = attrs.field(default=0, validator=_mtu_setting)  # 0: the guest's default


@attrs.frozen
class _Nic:
    """The validated network config of the one NIC: lower-case MAC, static address (None: DHCP), default
    gateway (static only), DNS and MTU."""

    mac: str
    interface: ipaddress.IPv4Interface | None
    gateway: ipaddress.IPv4Address | None
    dns_servers: tuple[str, ...]
    dns_search: tuple[str, ...]
    mtu: int


# --------------------------------------------------------------------------------------------------------------------
# What goes into the seed (pure)
# --------------------------------------------------------------------------------------------------------------------


def make_seed(fmt: str, instance_uuid: str, user_data: str, meta_data: str, networking: Networking,
              guest_network: GuestNetwork = GuestNetwork(), devices: Sequence[Mapping[str, Any]] = ()) -> Seed:
    """The seed of one instance in format `fmt` (one of `SEED_FORMATS`), with the tagged `devices` in its
    meta-data (module docstring). Pure: no I/O.

    Raises `SeedError` for an unknown format, meta-data that is not a mapping or gives an unusable identity,
    text that is not encodable as UTF-8, or invalid networking (see the module docstring)."""
    if fmt not in SEED_FORMATS:
        raise SeedError(f"unknown seed format {fmt!r} (expected one of {', '.join(SEED_FORMATS)})")
    try:
        identity = read_identity(_with_devices(_parse_meta_data(_utf8(meta_data, "meta-data")), devices))
    except IdentityError as exc:
        raise SeedError(f"meta-data.{exc}") from None
    instance_id = identity.instance_id or instance_uuid
    hostname = identity.hostname or default_hostname(instance_uuid)
    user_bytes = _utf8(user_data, "user-data")
    nic = _nic(networking, guest_network)
    if fmt == "nocloud":
        files = _nocloud_files(identity, instance_id, hostname, user_bytes, nic)
    else:
        files = _configdrive_files(identity, instance_id, hostname, user_bytes, nic)
    return Seed(label=_LABELS[fmt], files=files, instance_id=instance_id, hostname=hostname)


def _parse_meta_data(text: bytes) -> dict[str, Any]:
    """The meta-data mapping (`launcher.plugin.identity.parse_meta_data`), its error a SeedError."""
    try:
        return parse_meta_data(text)
    except MetaDataError as exc:
        raise SeedError(str(exc)) from None


def _with_devices(meta: dict[str, Any], devices: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The meta-data with the launcher's `devices` (which replace the payload's), or as it is without any."""
    if not devices:
        return meta
    return {**meta, "devices": [dict(device) for device in devices]}


def _utf8(text: str, field: str) -> bytes:
    """`text` in UTF-8; a lone surrogate (which a JSON payload can smuggle in with "\\ud800") is a SeedError."""
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise SeedError(f"{field}: not encodable as UTF-8 ({exc.reason} at offset {exc.start})") from None


def _nic(networking: Networking, settings: GuestNetwork) -> _Nic | None:
    """The validated network config of `networking` with the node's settings; None without a MAC. The address
    rules are `launcher.plugin.guest_network`'s; their errors are SeedErrors."""
    try:
        mac = guest_network.mac(networking)
        if not mac:
            return None
        interface = guest_network.static_address(networking)
        gateway = None if interface is None else guest_network.default_gateway(
            interface, settings.gateway, "qemu.guest_network.gateway")
    except NetworkError as exc:
        raise SeedError(str(exc)) from None
    return _Nic(mac, interface, gateway, settings.dns_servers, settings.dns_search, settings.mtu)


def _nocloud_files(
    identity: GuestIdentity, instance_id: str, hostname: str, user_data: bytes, nic: _Nic | None
) -> dict[str, bytes]:
    head: dict[str, Any] = {"instance-id": instance_id, "local-hostname": hostname}
    if identity.public_keys:
        head["public-keys"] = [key for _, key in identity.public_keys]
    rest = dict(identity.other)
    files = {"meta-data": (_yaml(head) + (_yaml(rest) if rest else "")).encode(), "user-data": user_data}
    if nic is not None:
        files["network-config"] = _yaml(_network_config_v1(nic)).encode()
    return files


def _network_config_v1(nic: _Nic) -> dict[str, Any]:
    """cloud-init network config version 1 for the one NIC (the structure cloud-init converts network_data to)."""
    physical: dict[str, Any] = {"type": "physical", "name": _GUEST_NIC, "mac_address": nic.mac}
    if nic.mtu:
        physical["mtu"] = nic.mtu
    physical["subnets"] = [_subnet_v1(nic)]
    config: list[dict[str, Any]] = [physical]
    if nic.dns_servers:  # as network_data's `dns` services become: the servers, node-wide
        config.append({"type": "nameserver", "address": list(nic.dns_servers)})
    return {"version": 1, "config": config}


def _subnet_v1(nic: _Nic) -> dict[str, Any]:
    subnet: dict[str, Any]
    if nic.interface is None:
        subnet = {"type": "dhcp4"}
    else:
        subnet = {"type": "static", "address": str(nic.interface.ip), "netmask": str(nic.interface.netmask)}
        if nic.gateway is not None:
            subnet["gateway"] = str(nic.gateway)
    if nic.dns_servers:
        subnet["dns_nameservers"] = list(nic.dns_servers)
    if nic.dns_search:
        subnet["dns_search"] = list(nic.dns_search)
    return subnet


def _configdrive_files(
    identity: GuestIdentity, instance_id: str, hostname: str, user_data: bytes, nic: _Nic | None
) -> dict[str, bytes]:
    meta: dict[str, Any] = {**identity.other, "uuid": instance_id, "hostname": hostname}
    meta.setdefault("name", hostname)
    if identity.public_keys:
        meta["public_keys"] = dict(identity.public_keys)
    try:
        meta_json = _json(meta)
    except (TypeError, ValueError) as exc:
        raise SeedError(f"meta-data: cannot be written as JSON ({exc})") from None
    files = {f"{_OPENSTACK}/meta_data.json": meta_json, f"{_OPENSTACK}/user_data": user_data}
    if nic is not None:
        files[f"{_OPENSTACK}/network_data.json"] = _json(_network_data(nic))
    return files


def _network_data(nic: _Nic) -> dict[str, Any]:
    """OpenStack network_data for the one NIC."""
    link: dict[str, Any] = {"id": "link0", "name": _GUEST_NIC, "type": "phy", "ethernet_mac_address": nic.mac}
    if nic.mtu:
        link["mtu"] = nic.mtu
    network: dict[str, Any] = {"id": "network0", "link": "link0"}
    if nic.interface is None:
        network["type"] = "ipv4_dhcp"
    else:
        network.update(type="ipv4", ip_address=str(nic.interface.ip), netmask=str(nic.interface.netmask))
        if nic.gateway is not None:
            # cloud-init's key, not OpenStack's `routes` form: cloud-init renders that one for ifupdown as a
            # `route add` command, from net-tools, which a minimal Debian lacks (seen in tests/test_guest_network.py).
            network["gateway"] = str(nic.gateway)
    if nic.dns_servers:
        network["dns_nameservers"] = list(nic.dns_servers)
    if nic.dns_search:
        network["dns_search"] = list(nic.dns_search)
    services = [{"type": "dns", "address": address} for address in nic.dns_servers]
    return {"links": [link], "networks": [network], "services": services}


def _yaml(value: Mapping[str, Any]) -> str:
    return str(yaml.dump(value, Dumper=_YAML_DUMPER, sort_keys=False, allow_unicode=True, width=_YAML_WIDTH))


def _json(value: Mapping[str, Any]) -> bytes:
    """Strict JSON (no NaN) indented by 2, with a final newline. TypeError or ValueError if `value` has no JSON
    form."""
    return (json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


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
