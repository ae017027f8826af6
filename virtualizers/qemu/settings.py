"""The `qemu:` section of the launcher config: `QemuSettings` and its groups, every key optional.

`open_backend` checks the raw section with `launcher.plugin.settings.parse_section`, so an unknown key, a value of
the wrong type or one a validator refuses is a SetupError naming the key (``qemu.network.kind: ...``). The
comments beside each field say what it sets; README "Configuration" is the operator's view of the same keys.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from launcher.plugin.settings import at_least, at_most, one_of
from launcher.plugin.volumes import MAX_VOLUMES
from launcher.plugin.warm import PoolSettings, check_pools
from virtualizers.qemu import cloudinit, domain, preflight
from virtualizers.qemu.clones import TemplateSettings
from virtualizers.qemu.images import DEFAULT_MAX_BYTES
from virtualizers.qemu.import_policy import ImportPolicy
from virtualizers.qemu.volumes import COPY_TIMEOUT_S

SECTION = "qemu"
ACCELS = ("auto", "kvm", "tcg")


@attrs.frozen
class NetworkSettings:
    """Where each VM's NIC is plugged: a libvirt network, a host bridge, or nowhere (`kind: none`)."""

    kind: str = attrs.field(default="network", validator=one_of(*domain.NETWORK_KINDS))
    source: str = "default"  # the network's or the bridge's name


@attrs.frozen
class VolumeSettings:
    """Where volumes live (virtualizers/qemu/volumes.py): "" is the launcher's own dir pool at
    <data_dir>/volumes; any other name is a libvirt storage pool the operator defined and started (RBD, LVM,
    NFS, ...; not tested here), in which the launcher creates and deletes volumes named <volume id>.<fmt> only."""

    pool: str = ""
    copy_timeout_s: float = attrs.field(default=COPY_TIMEOUT_S, validator=at_least(1))  # one full copy of an image
    # How long a hot-unplug waits for the guest to let go of the disk (the test guest does in about 0.1 s; a
    # guest that ignores the request never does).
    detach_timeout_s: float = attrs.field(default=30.0, validator=at_least(1))


@attrs.frozen
class QemuSettings:
    """The `qemu:` section of the launcher config."""

    uri: str = "qemu:///system"
    accel: str = attrs.field(default="auto", validator=one_of(*ACCELS))  # auto: kvm when it really works
    machine: str = "q35"
    hotplug_slots: int = attrs.field(default=8, validator=[at_least(0), at_most(MAX_VOLUMES)])
    seed_format: str = attrs.field(default="nocloud", validator=one_of(*cloudinit.SEED_FORMATS))
    network: NetworkSettings = NetworkSettings()
    guest_network: cloudinit.GuestNetwork = cloudinit.GuestNetwork()  # gateway, DNS, MTU written into the seed
    volumes: VolumeSettings = VolumeSettings()
    image_dirs: tuple[Path, ...] = ()  # searched for <image_uuid>[.img|.qcow2|.raw] before image_url
    image_url: str = ""  # e.g. https://images.example/{id}.qcow2 (also file://); "" for none
    # Where `launcher images import` may also read from: absolute dirs, file:// dirs, http(s):// URL prefixes.
    import_sources: tuple[str, ...] = ()
    image_max_bytes: int = DEFAULT_MAX_BYTES  # no import may be larger (64 GiB)
    image_gc_age_s: float = 7 * 86400.0  # `launcher images gc` removes unused images older than this
    ovmf_code: Path = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
    ovmf_vars: Path = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
    destroy_orphans: bool = False  # destroy domains of ours that have no instance dir (else report only)
    libvirt_threads: int = 8  # worker threads in libvirt calls at once (hypervisor.py: hung calls keep theirs)
    libvirt_timeout_s: float = 60.0  # bound on any one libvirt call (commands are also bound by their phase)
    # How often a running domain's state is re-read without a libvirt event: a backstop for a lost event
    # (hypervisor.py), so it also bounds how late a death that libvirt did not report is noticed.
    state_poll_s: float = attrs.field(default=5.0, validator=at_least(0.1))
    # Prepared pools (issue 19, slots.py, docs/warm-starts.md): keep `size` VMs of each shape held before their
    # first instruction, which a START of that shape claims.
    pools: tuple[PoolSettings, ...] = ()
    slot_make_timeout_s: float = attrs.field(default=120.0, validator=at_least(1))  # bound on making one slot
    # Booted templates (clones.py, templates.py, docs/warm-starts.md): boot each shape's image once, save it, and
    # restore a clone of it for a START of that shape.
    templates: tuple[TemplateSettings, ...] = ()
    template_boot_timeout_s: float = attrs.field(default=300.0, validator=at_least(1))  # a template's boot to ready
    clone_ready_timeout_s: float = attrs.field(default=60.0, validator=at_least(1))  # a clone's restore to its identity

    def __attrs_post_init__(self) -> None:
        ImportPolicy.from_settings(self.image_dirs, self.image_url or None, self.import_sources)  # ValueError
        check_pools(self.pools)
        shapes = [entry.shape for entry in self.templates]
        for index, shape in enumerate(shapes):
            if shape in shapes[:index]:
                raise ValueError(f"templates[{index}]: the same shape as templates[{shapes.index(shape)}]")
        if self.pools and "q35" in self.machine and self.network.kind != "none" and 0 < self.hotplug_slots < 5:
            raise ValueError(f"pools: a claim plugs the NIC into a spare PCIe root port, and hotplug_slots "
                             f"{self.hotplug_slots} leaves none on q35: set it to 0 or at least 5")

    def firmware(self, efi: bool) -> domain.Firmware:
        """A domain's firmware: UEFI from the OVMF files set here if `efi`, else legacy BIOS."""
        return domain.Firmware(efi=efi, ovmf_code=self.ovmf_code, ovmf_vars_template=self.ovmf_vars)


def resolve_accel(accel: str) -> bool:
    """True for KVM, False for TCG. `auto` is KVM where it really works (`preflight.kvm_problem`)."""
    return accel == "kvm" or (accel == "auto" and preflight.kvm_problem() is None)

