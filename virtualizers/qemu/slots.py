"""The QEMU backend's prepared slots (issue 19, `launcher.plugin.warm`): `QemuSlots`, its `SlotMaker`, which also
knows which instances' domains are claimed slots (`bound`). claim.py is how an instance claims one.

A slot is a transient domain ``launcher-slot-<slot id>`` (its libvirt uuid the slot id), started held in QEMU's
prelaunch state (slot_calls.py) on its own files in ``<data_dir>/slots/<slot id>/``: ``overlay.qcow2`` on the
shape's image at the shape's size, ``console.log``, and ``nvram.fd`` for EFI. It carries slot metadata
(domain.SLOT_NS) and no instance metadata, so the orphan scan and `our_domains` do not see it; it has an empty cdrom
and no NIC, which a claim fills.

A claimed slot's domain is the instance's: it gains instance metadata and keeps its name, so the instance's domain
is named ``launcher-slot-<id>`` (`domain_name`) until its next cold start moves its files into the instance dir
(claim.converge). Its files stay in the slot dir meanwhile; the instance dir's ``slot`` file (`SLOT_FILE`) names the
slot, written durably before the claim's first libvirt call.

Recovery (`surviving_slots`, at open): a slot domain without instance metadata still in prelaunch survives (to be
adopted or discarded by `WarmPools.recover`), any other one is destroyed; a claimed one still in prelaunch (a claim
cut short: its START is carried on cold by the core's recovery) is destroyed with its dir; a claimed one that ran
is the instance's: bound, and made persistent if it was still transient. A slot dir that no surviving or bound
domain and no instance's ``slot`` file names is removed.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import attrs
import libvirt
import trio

from launcher.plugin import files
from launcher.plugin.host import BackendHost
from launcher.plugin.warm import SlotShape
from virtualizers.qemu import domain, domain_calls, instance_files, slot_calls
from virtualizers.qemu.hypervisor import Hypervisor, Unavailable, error_text
from virtualizers.qemu.images import ImageStore
from virtualizers.qemu.instance_files import CONSOLE_LOG, NVRAM, OVERLAY
from virtualizers.qemu.settings import QemuSettings

log = logging.getLogger(__name__)

SLOTS_DIR = "slots"  # under the data dir
SLOT_FILE = "slot"  # in an instance dir whose domain is (or was) a claimed slot: the slot's id
SLOT_DIR_MODE = 0o711  # QEMU (libvirt-qemu) must reach the files libvirt hands it
MIB = 1 << 20
CLAIM_WAIT_S = 5.0  # how long a slot being made waits for the claims in flight before starting its QEMU anyway
T = TypeVar("T")


@attrs.define(eq=False)
class QemuSlots:
    """The backend's slots (module doc). Used from the Trio thread; blocking work goes to worker threads."""

    settings: QemuSettings
    host: BackendHost
    hypervisor: Hypervisor
    images: ImageStore
    kvm: bool
    bound: dict[str, str] = attrs.field(factory=dict)  # instance uuid → slot id: its domain is that claimed slot
    _claims: set[str] = attrs.field(factory=set, init=False)  # slots taken and not yet claimed or discarded
    _no_claims: trio.Event = attrs.field(factory=trio.Event, init=False)  # set when the last of those settles

    @property
    def root(self) -> Path:
        return self.host.data_dir / SLOTS_DIR

    def slot_dir(self, slot_id: str) -> Path:
        return self.root / slot_id

    def domain_name(self, instance_uuid: str) -> str:
        """The name of `instance_uuid`'s domain: its claimed slot's, or ``launcher-<uuid>``."""
        slot_id = self.bound.get(instance_uuid)
        return domain.domain_name(instance_uuid) if slot_id is None else domain.slot_domain_name(slot_id)

    def taken(self, slot_id: str) -> None:
        """An instance took the slot: until it is claimed or discarded (`settled`), slots being made wait to start
        their QEMU (at most CLAIM_WAIT_S): a QEMU start-up takes a core for about half a second, which the claim's
        libvirt calls would wait for."""
        self._claims.add(slot_id)

    def settled(self, slot_id: str) -> None:
        """The taken slot was claimed (resumed) or discarded; nothing if it was not taken."""
        self._claims.discard(slot_id)
        if not self._claims:
            self._no_claims.set()
            self._no_claims = trio.Event()

    async def make_slot(self, slot_id: str, shape: SlotShape) -> None:
        """The slot's dir and overlay, then its domain started held in prelaunch, once no claim is in flight
        (`taken`; `SlotMaker.make_slot`)."""
        started = trio.current_time()
        try:
            image = await self.images.ensure(shape.image_uuid)
            directory = self.slot_dir(slot_id)
            await self._thread(_make_slot_dir, directory)
            size = max(image.virtual_size, shape.disk_mb * MIB)
            await instance_files.make_overlay(directory, image, size, self.host.limiter)
            with trio.move_on_after(CLAIM_WAIT_S):
                while self._claims:
                    await self._no_claims.wait()
            await self.hypervisor.call(partial(slot_calls.create_paused, xml=domain.domain_xml(self._params(
                slot_id, shape))))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.discard_slot(slot_id)
            raise
        log.debug("slot %s made in %.3f s", slot_id, trio.current_time() - started)

    def _params(self, slot_id: str, shape: SlotShape) -> domain.DomainParams:
        s, directory = self.settings, self.slot_dir(slot_id)
        return domain.DomainParams(
            instance_uuid="", data_dir=self.host.data_dir, vcpus=shape.vcpus, mem_mb=shape.mem_mb, kvm=self.kvm,
            machine=s.machine,
            firmware=s.firmware(efi=shape.fw_type == "efi"),
            overlay=directory / OVERLAY, seed=None, network_kind=s.network.kind, network_source=s.network.source,
            mac="", console_log=directory / CONSOLE_LOG, nvram=directory / NVRAM, hotplug_slots=s.hotplug_slots,
            slot=domain.SlotMetadata(slot_id, str(self.host.data_dir.absolute()), shape))

    async def discard_slot(self, slot_id: str) -> None:
        """Destroy the slot's domain if there is one, and remove its dir (`SlotMaker.discard_slot`)."""
        self.settled(slot_id)
        await self.hypervisor.call(partial(domain_calls.remove_domain, name=domain.slot_domain_name(slot_id)))
        await self._thread(shutil.rmtree, self.slot_dir(slot_id), True)

    async def surviving_slots(self) -> list[tuple[str, SlotShape]]:
        """Recovery at open (module doc): the unclaimed slots still in prelaunch; `bound` rebuilt."""
        survivors: list[tuple[str, SlotShape]] = []
        keep: set[str] = set()
        for found in await self.hypervisor.call(partial(slot_calls.slot_domains, data_dir=self.host.data_dir)):
            slot_id = found.slot.slot_id
            if not found.instance_uuid and found.status == slot_calls.PRELAUNCH:
                survivors.append((slot_id, found.slot.shape))
                keep.add(slot_id)
            elif not found.instance_uuid or found.status == slot_calls.PRELAUNCH:
                why = "claim cut short" if found.instance_uuid else f"not in prelaunch ({found.status or 'down'})"
                log.warning("slot %s (%s): %s; destroying it", slot_id, found.name, why)
                await self.discard_slot(slot_id)
            else:
                await self._adopt_claimed(found)
                keep.add(slot_id)
        keep |= await self._thread(_named_by_instances, self.host.data_dir / "instances")
        for stale in await self._thread(_slot_dirs, self.root):
            if stale not in keep:
                log.warning("slot dir %s: no slot domain or instance owns it; removing it", self.slot_dir(stale))
                await self._thread(shutil.rmtree, self.slot_dir(stale), True)
        return survivors

    async def _adopt_claimed(self, found: slot_calls.SlotDomain) -> None:
        """A claimed slot's domain that ran is its instance's: bound, and defined if it was still transient."""
        self.bound[found.instance_uuid] = found.slot.slot_id
        if not found.persistent:
            try:
                await self.hypervisor.call(partial(domain_calls.make_persistent, name=found.name))
            except (Unavailable, libvirt.libvirtError) as exc:
                log.error("domain %s of instance %s: cannot make it persistent: %s", found.name,
                          found.instance_uuid, error_text(exc))
                return
            log.warning("domain %s of instance %s: defined (the launcher stopped between its claim's resume and "
                        "define)", found.name, found.instance_uuid)

    async def remove_all(self) -> list[str]:
        """Destroy every slot domain of this data dir, claimed or not, and remove every slot dir (`launcher
        hard-reset`); the domains' names."""
        names = [found.name for found in await self.hypervisor.call(partial(slot_calls.slot_domains,
                                                                            data_dir=self.host.data_dir))]
        for name in names:
            await self.hypervisor.call(partial(domain_calls.remove_domain, name=name))
        await self._thread(shutil.rmtree, self.root, True)
        self.bound.clear()
        return names

    async def _thread(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.host.limiter)


def _make_slot_dir(directory: Path) -> None:
    files.make_dirs(directory.parent, mode=SLOT_DIR_MODE)
    directory.mkdir(mode=SLOT_DIR_MODE)
    directory.chmod(SLOT_DIR_MODE)  # whatever the umask


def _slot_dirs(root: Path) -> set[str]:
    try:
        return {path.name for path in root.iterdir() if path.is_dir()}
    except FileNotFoundError:
        return set()


def _named_by_instances(instances: Path) -> set[str]:
    """The slot ids that instance dirs' ``slot`` files name."""
    named = set()
    for path in instances.glob(f"*/{SLOT_FILE}"):
        try:
            named.add(path.read_text().strip())
        except OSError:
            continue
    return named
