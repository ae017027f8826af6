"""Parsing and validation of ciao command payloads (YAML with ciao's multi-document framing, or JSON).

Every rejection is a `PayloadError` whose code is `invalid_payload` (the body cannot be parsed) or
`invalid_data` (it parses but a field is wrong), with a reason that names the field.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Networking:
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
    id: str
    boot: bool = False
    boot_index: str = ""
    ephemeral: bool = False
    local: bool = False
    swap: bool = False
    tag: str = ""
    size: int = 0


@attrs.frozen
class InstanceSpec:
    """Everything a START says about one instance. Frozen: equal specs mean an idempotent repeat."""

    instance_uuid: str
    tenant_uuid: str = ""
    image_uuid: str = ""
    fw_type: str = ""  # "legacy", "efi" or "" (which means EFI, as in ciao)
    vm_type: str = ""  # "qemu" or "" (qemu)
    persistence: str = ""
    vcpus: int | None = None  # None: not given, the launcher config's default applies
    mem_mb: int | None = None
    disk_mb: int | None = None
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
        return self.fw_type == "legacy"


@attrs.frozen
class StartCommand:
    spec: InstanceSpec


@attrs.frozen
class StopCommand:
    instance_uuid: str
    grace_s: float | None = None  # seconds before a forced power-off; None: the configured default


@attrs.frozen
class RestartCommand:
    instance_uuid: str


@attrs.frozen
class DeleteCommand:
    instance_uuid: str
    stop: bool = False  # ciao HEAD: the instance is stopped for good (e.g. migrated), not discarded
    grace_s: float | None = None


@attrs.frozen
class EvacuateCommand:
    pass


@attrs.frozen
class RestoreCommand:
    pass


Command = StartCommand | StopCommand | RestartCommand | DeleteCommand | EvacuateCommand | RestoreCommand
