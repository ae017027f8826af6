"""The container a START makes: its name, labels and the engine's create parameters (`create_body`). Pure.

- name ``<docker.name_prefix><instance uuid>`` (``launcher-<uuid>``, as the VMs' domains are named), labels
  ``launcher.instance-uuid=<uuid>`` and ``launcher.data-dir=<data dir>``: how the launcher knows its own
  containers (those of another data dir, or nobody's, are never touched);
- the image ``docker_image``; the command from the user-data's ``runcmd`` (`userdata`), else the image's;
- hostname from the meta-data with the VMs' rules (`launcher.plugin.identity`: ``local-hostname`` or
  ``hostname``, else the uuid cut to 63 characters); an FQDN's first label is the hostname, the rest the
  container's domain name;
- limits: CPU period 100 000 µs and quota ``vcpus`` × the period (``vcpus`` CPUs' worth of time, on any CPU);
  memory ``mem_mb`` MiB, and memory+swap the same (no swap beyond it); ``disk_mb`` as the writable layer's size
  (storage-opt ``size``) only with ``docker.disk_quota`` (overlay2 takes it only on xfs with pquota; on ext4, as
  here, the engine refuses it, so by default it is not enforced and the instance's log says so);
- network: on the engine network ``docker.network``, with ``vnic_mac`` as the MAC and the static address of
  `launcher.plugin.guest_network` (``private_ip`` in ``subnet``) as its IPv4 address, else one the network's
  IPAM gives; the network's gateway is the default route. With no network configured the container has none
  (loopback only), and a payload's MAC and address are noted as unused;
- volumes: each bound at ``/volumes/<volume id>`` from its host mount point (mounts.py);
- an init process (the engine's docker-init) as PID 1, so that SIGTERM reaches the command; restart policy
  ``no`` (the launcher decides); ``privileged`` as the START says (ciao did the same) where
  ``docker.allow_privileged`` lets it (the backend's check_start refuses it otherwise);
- the engine's own copy of the output (json-file driver) bounded to ``docker.console_max_bytes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from launcher.plugin import guest_network
from launcher.plugin.guest_network import NetworkError
from launcher.plugin.identity import IdentityError, MetaDataError, default_hostname, parse_meta_data, read_identity
from launcher.plugin.spec import InstanceSpec
from virtualizers.docker import mounts
from virtualizers.docker.settings import DockerSettings
from virtualizers.docker.userdata import ContainerUserData

LABEL_UUID = "launcher.instance-uuid"
LABEL_DATA_DIR = "launcher.data-dir"
CPU_PERIOD_US = 100_000
MIB = 1 << 20


class ContainerSpecError(ValueError):
    """The START cannot be made into a container; the message names the field at fault."""


def container_name(settings: DockerSettings, instance_uuid: str) -> str:
    """The name of instance `instance_uuid`'s container."""
    return f"{settings.name_prefix}{instance_uuid}"


def data_dir_label(data_dir: Path) -> str:
    """The label filter ("key=value") that finds the containers of `data_dir`."""
    return f"{LABEL_DATA_DIR}={data_dir}"


def hostname_of(spec: InstanceSpec) -> str:
    """The container's hostname (an FQDN possibly), from the meta-data with the VMs' rules."""
    try:
        identity = read_identity(parse_meta_data(spec.meta_data))
    except MetaDataError as exc:
        raise ContainerSpecError(str(exc)) from None
    except IdentityError as exc:
        raise ContainerSpecError(f"meta-data.{exc}") from None
    return (identity.hostname or default_hostname(spec.instance_uuid)).rstrip(".")


@attrs.frozen
class CreateParams:
    """What `create_body` made: the body of ``POST /containers/create`` and notes for the instance's log."""

    body: dict[str, Any]
    hostname: str
    notes: tuple[str, ...] = ()


def create_body(spec: InstanceSpec, settings: DockerSettings, data_dir: Path, user: ContainerUserData,
                volume_ids: Sequence[str] = ()) -> CreateParams:
    """The create parameters of `spec`'s container (module doc), with its volumes `volume_ids` bound at
    /volumes/<id> (mounts.py); ContainerSpecError naming the field at fault."""
    notes: list[str] = []
    hostname = hostname_of(spec)
    host, _, domain = hostname.partition(".")
    host_config: dict[str, Any] = {
        "CpuPeriod": CPU_PERIOD_US,
        "CpuQuota": CPU_PERIOD_US * spec.vcpus,
        "Memory": spec.mem_mb * MIB,
        "MemorySwap": spec.mem_mb * MIB,
        "RestartPolicy": {"Name": "no"},
        "Init": True,
        "Privileged": spec.privileged,
        "LogConfig": {"Type": "json-file", "Config": {"max-size": str(settings.console_max_bytes), "max-file": "1"}},
        "NetworkMode": settings.network or "none",
    }
    if volume_ids:
        host_config["Binds"] = mounts.binds(data_dir, spec.instance_uuid, volume_ids)
    if spec.disk_mb and settings.disk_quota:
        host_config["StorageOpt"] = {"size": f"{spec.disk_mb}M"}
    elif spec.disk_mb:
        notes.append(f"disk_mb {spec.disk_mb} not enforced (docker.disk_quota is false)")
    body: dict[str, Any] = {
        "Image": spec.docker_image,
        "Hostname": host,
        "Labels": {LABEL_UUID: spec.instance_uuid, LABEL_DATA_DIR: str(data_dir)},
        "HostConfig": host_config,
        "AttachStdin": False, "AttachStdout": False, "AttachStderr": False, "Tty": False, "OpenStdin": False,
    }
    if domain:
        body["Domainname"] = domain
    if user.command is not None:
        body["Cmd"] = list(user.command)
    _network(spec, settings, body, notes)
    return CreateParams(body=body, hostname=hostname, notes=tuple(notes))


def _network(spec: InstanceSpec, settings: DockerSettings, body: dict[str, Any], notes: list[str]) -> None:
    """The MAC and address of `spec` on the configured engine network."""
    try:
        mac = guest_network.mac(spec.networking)
        address = guest_network.static_address(spec.networking)
    except NetworkError as exc:
        raise ContainerSpecError(str(exc)) from None
    if not settings.network:
        if mac or address:
            notes.append("networking: no engine network configured (docker.network): the container has none, "
                         "its MAC and address are not used")
        return
    if mac:
        body["MacAddress"] = mac
    if address is not None:
        body["NetworkingConfig"] = {"EndpointsConfig": {settings.network: {
            "IPAMConfig": {"IPv4Address": str(address.ip)}}}}
