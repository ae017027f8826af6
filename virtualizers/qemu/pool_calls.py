"""The blocking libvirt operations on storage pools and their volumes, each one function of a `virConnect`.

They run in `Hypervisor.call`'s worker threads (bounded there), never on the Trio thread:
``await hypervisor.call(partial(delete_volume, pool=name, name=volume_name))``. The volume store (volumes.py)
decides what to do; these only ask libvirt and build the XML it takes. `ensure_dir_pool` sets up the own dir
pool (defined persistent, built, started, autostart; or adopted if a pool of that name with that target path
exists; a pool of that name with another type or path is a SetupError naming it).
"""

from __future__ import annotations

import builtins
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import attrs
import libvirt

from launcher.plugin.errors import SetupError
from virtualizers.qemu.hypervisor import or_none
from virtualizers.qemu.volume_records import id_of

log = logging.getLogger(__name__)


@attrs.frozen
class Described:
    """What libvirt says of one volume."""

    name: str
    capacity: int  # bytes
    allocation: int  # bytes
    format: str  # from its XML; "" if it says none
    path: str
    backing: str = ""  # the path of its backing file, if it has one


def pool_xml(name: str, path: Path, mode: int, uid: int, gid: int) -> str:
    """The own dir pool's XML: its directory `path` with `mode`, owned by `uid`:`gid`."""
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    target = ET.SubElement(pool, "target")
    ET.SubElement(target, "path").text = str(path)
    _permissions(target, mode, uid, gid)
    return ET.tostring(pool, encoding="unicode")


def _lookup_pool(conn: libvirt.virConnect, name: str) -> libvirt.virStoragePool | None:
    return or_none(lambda: conn.storagePoolLookupByName(name), libvirt.VIR_ERR_NO_STORAGE_POOL)


def ensure_dir_pool(conn: libvirt.virConnect, name: str, path: Path, xml: str, local: bool) -> None:
    """Define, build, start and autostart the own pool, or adopt it (module doc). SetupError if a pool of that
    name is something else. `local`: libvirt runs on this host (its directory can be checked here)."""
    pool = _lookup_pool(conn, name)
    if pool is None:
        pool = conn.storagePoolDefineXML(xml, 0)
        log.info("volume store: defined storage pool %s at %s", name, path)
    else:
        root = ET.fromstring(pool.XMLDesc(0))
        kind, where = root.get("type"), root.findtext("target/path")
        if kind != "dir" or where is None or Path(where) != path:
            raise SetupError(f"qemu.volumes: libvirt already has a storage pool {name!r} ({kind} pool at "
                             f"{where}), which is not this data dir's {path}: remove it (virsh pool-destroy "
                             f"{name}; virsh pool-undefine {name}) or set qemu.volumes.pool to a pool to use")
    if local and pool.isActive() and not path.is_dir():
        pool.destroy()  # its directory was removed behind libvirt's back: build it again
    if not pool.isActive():
        pool.build(0)  # creates the directory, or gives an existing one the pool's owner and mode
        pool.create(0)
    if not pool.autostart():
        pool.setAutostart(1)


def find_pool(conn: libvirt.virConnect, name: str) -> None:
    """Check that the operator's pool `name` exists and is active; SetupError saying what to do otherwise."""
    pool = _lookup_pool(conn, name)
    if pool is None:
        raise SetupError(f"qemu.volumes.pool: libvirt has no storage pool {name!r} (virsh pool-list --all; "
                         "define it, or leave qemu.volumes.pool empty for the launcher's own pool)")
    if not pool.isActive():
        raise SetupError(f"qemu.volumes.pool: the storage pool {name!r} is not active (virsh pool-start {name})")


def volume_names(conn: libvirt.virConnect, pool: str) -> builtins.list[str]:
    """The names of every volume of `pool`, after a refresh."""
    storage = conn.storagePoolLookupByName(pool)
    storage.refresh(0)  # files made or removed behind libvirt's back (a dir pool caches its listing)
    return [volume.name() for volume in storage.listAllVolumes(0)]


def _lookup_volume(conn: libvirt.virConnect, pool: str, name: str) -> libvirt.virStorageVol | None:
    return or_none(lambda: conn.storagePoolLookupByName(pool).storageVolLookupByName(name),
                   libvirt.VIR_ERR_NO_STORAGE_VOL)


def existing_name(conn: libvirt.virConnect, pool: str, names: tuple[str, ...]) -> str:
    """The first of `names` that is a volume of `pool`, or ""."""
    for name in names:
        if _lookup_volume(conn, pool, name) is not None:
            return name
    return ""


def create_volume(conn: libvirt.virConnect, pool: str, xml: str) -> None:
    """Create the volume `xml` describes (`volume_xml`) in `pool`."""
    conn.storagePoolLookupByName(pool).createXML(xml, 0)


def delete_volume(conn: libvirt.virConnect, pool: str, name: str) -> None:
    """Delete the volume `name` of `pool`; nothing if there is none."""
    volume = _lookup_volume(conn, pool, name)
    if volume is not None:
        volume.delete(0)


def resize_volume(conn: libvirt.virConnect, pool: str, name: str, capacity: int) -> None:
    """Give the volume `name` of `pool` `capacity` bytes (the store never shrinks one)."""
    volume = conn.storagePoolLookupByName(pool).storageVolLookupByName(name)
    volume.resize(capacity, 0)


def _describe_volume(volume: libvirt.virStorageVol) -> Described:
    _kind, capacity, allocation = volume.info()
    xml = ET.fromstring(volume.XMLDesc(0))
    fmt = xml.find("target/format")
    return Described(volume.name(), capacity, allocation, "" if fmt is None else fmt.get("type", ""),
                      volume.path(), xml.findtext("backingStore/path") or "")


def describe_one(conn: libvirt.virConnect, pool: str, name: str) -> Described | None:
    """What libvirt says of the volume `name` of `pool`; None if there is none."""
    volume = _lookup_volume(conn, pool, name)
    return None if volume is None else _describe_volume(volume)


def describe_all(conn: libvirt.virConnect, pool: str) -> builtins.list[Described]:
    """What libvirt says of every volume of `pool` named like one of the store's (``<id>.<fmt>``)."""
    found = []
    for volume in conn.storagePoolLookupByName(pool).listAllVolumes(0):
        if id_of(volume.name()) is None:
            continue
        try:
            found.append(_describe_volume(volume))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                raise  # else deleted meanwhile
    return found


def volume_xml(name: str, fmt: str, capacity: int, *, owner: tuple[int, int, int] | None = None,
               backing: tuple[Path, str] | None = None) -> str:
    """A new volume's XML: `name`, format `fmt`, `capacity` bytes, nothing allocated; `owner` (mode, uid, gid)
    for a pool that takes permissions (the own dir pool); `backing` (path, format) for a copy-on-write child."""
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity", unit="bytes").text = str(capacity)
    ET.SubElement(volume, "allocation", unit="bytes").text = "0"
    target = ET.SubElement(volume, "target")
    ET.SubElement(target, "format", type=fmt)
    if fmt == "qcow2":
        ET.SubElement(target, "compat").text = "1.1"
    if owner is not None:
        _permissions(target, *owner)
    if backing is not None:
        store = ET.SubElement(volume, "backingStore")
        ET.SubElement(store, "path").text = str(backing[0].absolute())
        ET.SubElement(store, "format", type=backing[1])
    return ET.tostring(volume, encoding="unicode")


def _permissions(target: ET.Element, mode: int, uid: int, gid: int) -> None:
    """The `<permissions>` of a pool's or volume's `<target>`."""
    permissions = ET.SubElement(target, "permissions")
    ET.SubElement(permissions, "mode").text = f"{mode:04o}"
    ET.SubElement(permissions, "owner").text = str(uid)
    ET.SubElement(permissions, "group").text = str(gid)
