"""The instance model: what a START says about one instance, as every part of the launcher and every
virtualizer sees it (part of the plugin API, `launcher.plugin`).

A spec is frozen and compared whole: an equal spec in a repeated START makes it an idempotent repeat. It is
stored in the instance's record (`launcher.durable.records`) and never changes after the START is admitted
(RESTART reuses it). The payload parser (`launcher.transport.payloads`) builds it; the supervisor fills in the
resources the START did not name before any virtualizer sees it.
"""

from __future__ import annotations

import re

import attrs

IMAGE_RE = re.compile(r"[A-Za-z0-9._-]+")
MAX_IMAGE_LEN = 255


def is_valid_image_id(image: str) -> bool:
    """An image name that is a plain file name: letters, digits, '.', '_' and '-', not '.' or '..'."""
    return len(image) <= MAX_IMAGE_LEN and IMAGE_RE.fullmatch(image) is not None and image not in (".", "..")


def vm_image_problem(spec: InstanceSpec) -> str | None:
    """Why a VM virtualizer cannot boot `spec` for want of an image, as "start.<field>: <reason>", or None. A VM
    boots from ``image_uuid`` or, without one, from a ``boot: true`` storage entry; ``docker_image`` is a
    container's field and makes no sense for a VM. A VM backend's ``check_start`` returns it."""
    if spec.docker_image:
        return "start.docker_image: must be empty for a VM (it names a container's image)"
    if not spec.image_uuid and not any(entry.boot for entry in spec.storage):
        return "start.image_uuid: required unless a storage entry has boot: true"
    return None


@attrs.frozen
class Networking:
    """The START's ``networking`` section, in ciao's names: the VM's NIC (`vnic_mac`, which the virtualizer gives
    the VM; "" lets it choose) and what the guest's network configuration is derived from (subnet, addresses)."""

    vnic_mac: str = ""
    vnic_uuid: str = ""
    concentrator_uuid: str = ""
    concentrator_ip: str = ""
    subnet: str = ""  # CIDR
    subnet_key: str = ""
    subnet_uuid: str = ""
    private_ip: str = ""
    public_ip: bool = False


@attrs.frozen
class StorageEntry:
    """One entry of the START's ``storage`` list: the volume `id` and how the instance uses it (what each field
    means, for every virtualizer: `launcher.plugin.volumes`)."""

    id: str
    boot: bool = False
    boot_index: str = ""
    ephemeral: bool = False
    local: bool = False
    swap: bool = False
    tag: str = ""
    size: int = 0  # GiB: the size of a `local` volume the launcher makes



@attrs.frozen
class InstanceSpec:
    """Everything a START says about one instance. Frozen: equal specs mean an idempotent repeat."""

    instance_uuid: str
    tenant_uuid: str = ""
    image_uuid: str = ""  # the backing image of a VM
    docker_image: str = ""  # the image of a container (ciao's field): a Docker reference such as busybox:latest
    fw_type: str = ""  # "legacy", "efi" or "" (which means EFI, as in ciao)
    # The virtualizer that runs the instance, by name ("qemu", "docker", ...): "" in a START means the node's
    # first enabled one, and the supervisor writes that name here before the instance is admitted, so that an
    # instance keeps its virtualizer for life (records of older launchers may still hold "").
    vm_type: str = ""
    persistence: str = ""
    # What the instance is given, once the node's defaults (config `defaults:`) filled what the START did not
    # name; the class defaults here are the launcher's shipped defaults, for specs built in code.
    vcpus: int = 1
    mem_mb: int = 256
    disk_mb: int = 0  # 0: the backing image's own size
    network_node: bool = False
    hostname: str = ""
    node_id: str = ""
    privileged: bool = False
    restart: bool = False
    networking: Networking = Networking()
    storage: tuple[StorageEntry, ...] = ()
    user_data: str = ""  # cloud-init user-data, passed through byte for byte
    meta_data: str = ""  # cloud-init meta-data (JSON text in ciao), passed through byte for byte

    @property
    def legacy_boot(self) -> bool:
        """Whether the instance boots with BIOS (``fw_type: legacy``) rather than EFI (anything else)."""
        return self.fw_type == "legacy"
