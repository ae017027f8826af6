"""Booted templates and their clones (issue 19): boot an image once to guest-ready, save it, restore clones of it.

A *template* lives in ``<data_dir>/templates/<key>/`` (`TemplateStore`):

- ``disk.qcow2``: the template's disk, a qcow2 overlay on the image, frozen (0444) once saved: from then on only a
  backing file of the clones' overlays;
- ``state.sav``: libvirt's save file of the running template (save_image.py reads it);
- ``template.json``: the key's inputs, the versions, sizes, timings and when it was made;
- ``seed.iso``, ``console.log`` (and ``nvram.fd`` for EFI): the template's own, kept for diagnosis (and the nvram
  as the clones' starting copy).

It is built in ``<key>.partial/`` and renamed into place: the directory exists if and only if the template is
complete. `template_key` hashes everything a template's validity depends on (`TemplateSpec`: the image id and its
content identity, vcpus, mem_mb, firmware, machine, hotplug_slots, kvm; `TEMPLATE_VERSION`; QEMU's and libvirt's
versions): a template whose image changed (another import, gc and import) has another key, so it is rebuilt, never
used stale.

The template domain is `domain.domain_xml`'s domain with no NIC, with `<genid/>` (libvirt gives each restore a new
VM generation ID: the guest kernel reseeds its RNG) and `<memoryBacking><nosharepages/>` (KSM never merges clones'
pages; each clone's RAM is its own anonymous memory), named ``launcher-template-<key[:12]>``, with the template
metadata of domain.TEMPLATE_NS (not the instance metadata: recovery must not take it for an instance). It is
booted, saved running once its console says ``guest-ready``, and undefined; it never stays defined.

A *clone* (clone_restore.py) is restored from a save file of its own, with its name, UUID, metadata, overlay, seed
and console log, and then told to take its identity; clones.py decides when.

Blocking libvirt work goes through `Hypervisor.call`; file work through worker threads under the given limiter.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid as uuid_module
import xml.etree.ElementTree as ET
from collections.abc import Callable, Collection, Iterable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import libvirt
import trio

from launcher.plugin.files import fsync_dir
from virtualizers.qemu import cloudinit, domain, qemu_img, save_image
from virtualizers.qemu.domain import DomainParams, Firmware
from virtualizers.qemu.hypervisor import Hypervisor, or_none
from virtualizers.qemu.images import ImageInfo

log = logging.getLogger(__name__)
T = TypeVar("T")

TEMPLATE_VERSION = 1  # bump whenever the template domain, the build or the guest protocol changes
TEMPLATES_DIR = "templates"
PARTIAL_SUFFIX = ".partial"
DOMAIN_PREFIX = "launcher-template-"
DISK, STATE, RECORD, SEED, CONSOLE_LOG, NVRAM = "disk.qcow2", "state.sav", "template.json", "seed.iso", \
    "console.log", "nvram.fd"
DIR_MODE = 0o711  # QEMU (libvirt-qemu) must reach the disk and the seed
BOOT_TIMEOUT_S = 300.0  # a template's boot to guest-ready (TCG on a loaded host)
SETTLE_S = 1.0  # after guest-identity: the guest's console reader and uevent listener are up before the save
POLL_S = 0.02


@attrs.frozen
class TemplateSpec:
    """What a template is built from; every field is part of its key."""

    image: ImageInfo
    vcpus: int
    mem_mb: int
    firmware: Firmware
    machine: str
    hotplug_slots: int
    kvm: bool

    def key_inputs(self, qemu_version: int, libvirt_version: int) -> dict[str, Any]:
        """The canonical inputs of `template_key`. The image's content identity is its sha256 and size as the
        image store recorded them at import (a re-import of other content under the same id changes both)."""
        return {
            "template_version": TEMPLATE_VERSION, "image_id": self.image.id, "image_path": str(self.image.path),
            "image_format": self.image.format, "image_sha256": self.image.sha256, "image_size": self.image.size,
            "image_virtual_size": self.image.virtual_size, "vcpus": self.vcpus, "mem_mb": self.mem_mb,
            "fw_type": "efi" if self.firmware.efi else "legacy",
            "ovmf": [str(self.firmware.ovmf_code), str(self.firmware.ovmf_vars_template)]
            if self.firmware.efi else None,
            "machine": self.machine, "hotplug_slots": self.hotplug_slots, "kvm": self.kvm,
            "qemu_version": qemu_version, "libvirt_version": libvirt_version,
        }


def template_key(inputs: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of `inputs` (`TemplateSpec.key_inputs`)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def template_domain_name(key: str) -> str:
    return DOMAIN_PREFIX + key[:12]


@attrs.frozen
class Template:
    """A complete template (its directory exists). `header` is its save file's header (with the saved XML)."""

    key: str
    path: Path
    record: dict[str, Any]
    header: save_image.SaveHeader

    @property
    def disk(self) -> Path:
        return self.path / DISK

    @property
    def state(self) -> Path:
        return self.path / STATE

    @property
    def disk_size(self) -> int:
        """The virtual size of the template's disk: a clone's overlay must have the same."""
        return int(self.record["disk_size"])


@attrs.define(eq=False)
class TemplateStore:
    """The templates of one data dir (module doc). One process owns it."""

    data_dir: Path
    hypervisor: Hypervisor
    limiter: trio.CapacityLimiter
    boot_timeout_s: float = BOOT_TIMEOUT_S
    _locks: dict[str, trio.Lock] = attrs.field(factory=dict, init=False)

    @property
    def root(self) -> Path:
        return self.data_dir / TEMPLATES_DIR

    async def key_of(self, spec: TemplateSpec) -> tuple[str, dict[str, Any]]:
        """(key, its inputs) of `spec` on this host. Asks libvirt for the QEMU and libvirt versions each time (one
        small call per template START): QEMU or libvirt upgraded while the launcher runs changes the key, so that
        a state saved by the older QEMU is never restored by the newer one."""
        qemu_version, libvirt_version = await self.hypervisor.call(lambda c: (c.getVersion(), c.getLibVersion()))
        inputs = spec.key_inputs(qemu_version, libvirt_version)
        return template_key(inputs), inputs

    async def get(self, key: str) -> Template | None:
        """The complete template `key`, or None."""
        return await self._run(_load, self.root / key, key)

    async def ensure(self, spec: TemplateSpec) -> Template:
        """The template of `spec`, built first if there is none (one build per key at a time). A failed build
        raises (TemplateBuildError, libvirt's or an OSError) and leaves neither a domain nor a directory."""
        key, inputs = await self.key_of(spec)
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            found = await self.get(key)
            if found is not None:
                return found
            return await self._build(spec, key, inputs)

    async def _build(self, spec: TemplateSpec, key: str, inputs: dict[str, Any]) -> Template:
        name = template_domain_name(key)
        final, partial_dir = self.root / key, self.root / (key + PARTIAL_SUFFIX)
        timings: dict[str, float] = {}
        started = time.monotonic()
        await self._run(_fresh_dir, self.root, partial_dir)
        try:
            await qemu_img.create_overlay(partial_dir / DISK, spec.image.path, spec.image.format,
                                          spec.image.virtual_size)
            seed = cloudinit.Seed(label="cidata", files={
                "meta-data": f"instance-id: template-{key[:12]}\nlocal-hostname: template-{key[:12]}\n".encode(),
                "user-data": b"#cloud-config\n"}, instance_id=f"template-{key[:12]}", hostname=f"template-{key[:12]}")
            await self._run(cloudinit.write_seed, seed, partial_dir / SEED)
            xml = template_xml(spec, key, self.data_dir, partial_dir)
            await self.hypervisor.call(lambda c: c.defineXML(xml).create())
            timings["define_start"] = time.monotonic() - started
            try:
                await wait_for_line(partial_dir / CONSOLE_LOG, lambda line: line.startswith("guest-identity "),
                                    self.boot_timeout_s)
            except TemplateBuildError:
                raise TemplateBuildError(
                    f"the guest printed no guest-identity line on its console within {self.boot_timeout_s:g} s: "
                    "either it boots slower than template_boot_timeout_s, or the image does not take part in the "
                    "template protocol (docs/warm-starts.md: what a guest must do)") from None
            timings["boot"] = time.monotonic() - started
            await trio.sleep(SETTLE_S)
            saving = time.monotonic()
            await self.hypervisor.call(lambda c: c.lookupByName(name).saveFlags(
                str(partial_dir / STATE), None, libvirt.VIR_DOMAIN_SAVE_RUNNING))
            timings["save"] = time.monotonic() - saving
            await self.hypervisor.call(partial(_undefine, name=name))
            header = await self._run(save_image.read_header_file, partial_dir / STATE)
            record = {"key": key, "inputs": inputs, "domain": name, "disk_size": spec.image.virtual_size,
                      "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                      "state_bytes": (partial_dir / STATE).stat().st_size, "timings_s": timings,
                      "saved_xml": header.xml}
            await self._run(_freeze, partial_dir, final, record)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.hypervisor.call(partial(_undefine, name=name))
                await self._run(_remove_tree, partial_dir)
            raise
        log.info("template %s built in %.1f s", key[:12], time.monotonic() - started)
        found = await self.get(key)
        assert found is not None
        return found

    async def cleanup(self, wanted: Collection[str], overlays: Iterable[Path]) -> list[str]:
        """At startup (nothing of this store in flight): destroy and undefine every template domain of this data
        dir, remove every ``.partial`` dir, and every template whose key is not in `wanted` unless one of
        `overlays` (the instances' overlay files) names its disk as its backing file. That check reads each
        overlay's qcow2 header only (its direct backing file): a clone's overlay backs directly onto the template's
        disk, and nothing else backs onto it. Returns what it removed (domain names and dir names)."""
        removed = await self.hypervisor.call(partial(_remove_template_domains, data_dir=self.data_dir))
        return removed + await self._run(_remove_dirs, self.root, set(wanted), list(overlays))

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)


class TemplateBuildError(Exception):
    """The template did not reach guest-ready in time, or a clone did not answer its kick."""


def template_xml(spec: TemplateSpec, key: str, data_dir: Path, directory: Path) -> str:
    """The template domain's XML (module doc), its files in `directory`."""
    params = DomainParams(
        instance_uuid=f"template-{key[:12]}", data_dir=data_dir, vcpus=spec.vcpus, mem_mb=spec.mem_mb, kvm=spec.kvm,
        machine=spec.machine, firmware=spec.firmware, overlay=directory / DISK, seed=directory / SEED,
        network_kind="none", network_source="", mac="", console_log=directory / CONSOLE_LOG,
        nvram=directory / NVRAM, hotplug_slots=spec.hotplug_slots)
    ET.register_namespace(domain.TEMPLATE_PREFIX, domain.TEMPLATE_NS)
    root = ET.fromstring(domain.domain_xml(params))
    save_image.child(root, "name").text = template_domain_name(key)
    save_image.child(root, "uuid").text = str(uuid_module.uuid4())
    metadata = save_image.child(root, "metadata")
    for child in list(metadata):
        metadata.remove(child)
    ET.SubElement(metadata, f"{{{domain.TEMPLATE_NS}}}template", {"key": key, "data-dir": str(data_dir.absolute())})
    genid = ET.Element("genid")  # empty: libvirt picks one, and a new one at every restore
    root.insert(list(root).index(save_image.child(root, "uuid")) + 1, genid)
    backing = ET.Element("memoryBacking")
    ET.SubElement(backing, "nosharepages")
    root.insert(list(root).index(save_image.child(root, "memory")) + 1, backing)
    return ET.tostring(root, encoding="unicode")


def read_template_metadata(xml: str) -> dict[str, str] | None:
    """The template metadata of a domain's XML ({"key", "data-dir"}), or None if it is not a template domain."""
    element = ET.fromstring(xml).find(f"metadata/{{{domain.TEMPLATE_NS}}}template")
    return None if element is None else dict(element.attrib)


async def wait_for_line(console_log: Path, wanted: Callable[[str], bool], timeout_s: float) -> tuple[str, float]:
    """(the first line of `console_log` that `wanted` accepts, time.monotonic() when it was seen); polls every
    POLL_S. TemplateBuildError after `timeout_s`. Lines are matched from their start after stray carriage returns
    (the kernel may write its own messages into the console)."""
    with trio.move_on_after(timeout_s):
        offset, pending = 0, b""
        while True:
            chunk = await trio.to_thread.run_sync(_read_from, console_log, offset)
            offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").replace("\r", "").strip()
                if wanted(line):
                    return line, time.monotonic()
            await trio.sleep(POLL_S)
    raise TemplateBuildError(f"no such line on {console_log} within {timeout_s:g} s")


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read()
    except FileNotFoundError:
        return b""


def fields(line: str) -> dict[str, str]:
    """The key=value fields of a guest line."""
    return dict(re.findall(r"(\S+?)=(\S*)", line))


def _undefine(conn: libvirt.virConnect, name: str) -> None:
    """Destroy (if it runs) and undefine the template domain `name`, keeping its nvram file; nothing if none."""
    dom = or_none(lambda: conn.lookupByName(name), libvirt.VIR_ERR_NO_DOMAIN)
    if dom is None:
        return
    if dom.isActive():
        dom.destroy()
    if dom.isPersistent():
        keep = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).find("os/nvram") is not None
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | (libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM if keep
                                                                      else 0))


def _remove_template_domains(conn: libvirt.virConnect, data_dir: Path) -> list[str]:
    removed, ours = [], str(data_dir.absolute())
    for dom in conn.listAllDomains():
        try:
            name = dom.name()
            meta = read_template_metadata(dom.XMLDesc(0)) if name.startswith(DOMAIN_PREFIX) else None
        except libvirt.libvirtError:
            continue
        if meta is not None and meta.get("data-dir") == ours:
            _undefine(conn, name)
            removed.append(name)
    return removed


# -- files (blocking) ---------------------------------------------------------------------------------------------


def _load(path: Path, key: str) -> Template | None:
    try:
        record = json.loads((path / RECORD).read_text())
        header = save_image.read_header_file(path / STATE)
    except (OSError, ValueError):
        return None
    return Template(key, path, record, header)


def _fresh_dir(root: Path, directory: Path) -> None:
    root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(root, DIR_MODE)
    _remove_tree(directory)
    directory.mkdir(mode=DIR_MODE)
    os.chmod(directory, DIR_MODE)


def _freeze(partial_dir: Path, final: Path, record: dict[str, Any]) -> None:
    """Write the record, freeze the disk (0444) and the state (0400), fsync all, rename into place."""
    (partial_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    for name, mode in ((DISK, 0o444), (STATE, 0o400), (RECORD, 0o444)):
        fd = os.open(partial_dir / name, os.O_RDONLY)
        try:
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(partial_dir)
    os.replace(partial_dir, final)
    fsync_dir(final.parent)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

def qcow2_backing(path: Path) -> str | None:
    """The backing file name in the qcow2 header of `path` (None if none, or not a readable qcow2 file)."""
    try:
        with path.open("rb") as file:
            head = file.read(20)
            if len(head) < 20 or head[:4] != b"QFI\xfb":
                return None
            offset, size = int.from_bytes(head[8:16], "big"), int.from_bytes(head[16:20], "big")
            if not offset or not size:
                return None
            file.seek(offset)
            return file.read(size).decode(errors="replace")
    except OSError:
        return None


def _remove_dirs(root: Path, wanted: set[str], overlays: list[Path]) -> list[str]:
    if not root.is_dir():
        return []
    backed = {os.path.realpath(b) for b in map(qcow2_backing, overlays) if b is not None}
    removed = []
    for entry in sorted(root.iterdir()):
        if entry.name.endswith(PARTIAL_SUFFIX):
            _remove_tree(entry)
            removed.append(entry.name)
        elif entry.is_dir() and entry.name not in wanted and os.path.realpath(entry / DISK) not in backed:
            _remove_tree(entry)
            removed.append(entry.name)
    return removed
