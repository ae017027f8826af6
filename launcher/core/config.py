"""Typed launcher configuration, loaded from YAML (configs/launcher.yaml) and checked strictly.

Every key is optional; a missing key takes the default shown here. An unknown key or a value of the wrong
type is a `ConfigError` that names the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from pathlib import Path
from typing import Any

import attrs
import yaml

from launcher.core.backends import available_backends
from launcher.plugin.settings import ConfigError, at_least, at_most, one_of, parse_section


@attrs.frozen
class HttpLimits:
    """Bounds on what a client may hold (the `http:` section of the config)."""

    idle_timeout_s: float = 75.0  # a request head must be complete this long after the connection is ready
    body_timeout_s: float = 60.0  # its body this long after the head; else 408 request_timeout
    send_timeout_s: float = 60.0  # a write the client has not taken after this ends the connection
    max_connections: int = 4096  # open connections at once (also bounded by the open-file limit)


@attrs.frozen
class Admission:
    """Limits checked when a START is admitted, against what admitted instances were promised."""

    max_instances: int = 4096
    keep_free_memory_mb: int = 1024  # host memory never promised to VMs
    keep_free_disk_mb: int = 4096  # space on the data dir's file system never promised to VMs
    vcpu_overcommit: float = 4.0  # vCPUs promised per host CPU
    memory_overcommit: float = 1.0
    disk_overcommit: float = 1.0


@attrs.frozen
class Defaults:
    """Resources of a START that does not name them."""

    vcpus: int = 1
    mem_mb: int = 256
    disk_mb: int = 0


@attrs.frozen
class Timeouts:
    """Bounds on each virtualizer call; a call that overruns fails with its phase's ciao code."""

    ensure_image_s: float = 1800.0  # a download can be long
    create_image_s: float = 120.0
    start_vm_s: float = 120.0
    boot_s: float = 300.0  # from start_vm returning to the VM counting as running
    stop_grace_s: float = 30.0  # STOP: ACPI shutdown, then forced off after this
    delete_grace_s: float = 0.0  # DELETE without stop:true: its disk goes anyway, so power off at once
    stop_margin_s: float = 30.0  # stop_vm may take grace + this before it counts as failed
    delete_image_s: float = 60.0
    volume_s: float = 60.0  # attach_volume / detach_volume: a hot-unplug waits for the guest to let go
    stats_s: float = 10.0
    wait_s: float = 600.0  # longest ?wait=1 a client may ask for


@attrs.frozen
class Intervals:
    """How often statistics are taken (the `intervals:` section)."""

    stats_snapshot_s: float = 6.0  # the STATS snapshot served at /v1/stats
    instance_stats_s: float = 30.0  # vm.stats() poll of a running instance


@attrs.frozen
class EventsConfig:
    """The event journal's files and in-memory ring (the `events:` section)."""

    rotate_bytes: int = 64 << 20
    keep_files: int = 4
    memory_events: int = 20000
    memory_bytes: int = 16 << 20  # and at most this much (as JSON)


RESTART_POLICIES = ("never", "requested", "always")


@attrs.frozen
class Recovery:
    """What a launcher does at start-up with instances whose VM is gone (docs/operations.md "After a restart")."""

    # After a host reboot, instances that were running: never restarted, restarted if their START said
    # `restart: true` (requested), or always.
    restart_running: str = attrs.field(default="always", validator=one_of(*RESTART_POLICIES))
    max_parallel: int = attrs.field(default=4, validator=at_least(1))  # VMs booted by recovery at once


SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]+")  # one token of a NATS subject: no dots, spaces or wildcards


def default_node() -> str:
    """The host name, its dots made dashes (a node id is one subject token)."""
    return socket.gethostname().replace(".", "-") or "node"


@attrs.frozen
class FleetTls:
    """TLS to the NATS servers: the CA file that signs them ("": none, plain NATS) and, for servers that ask for
    one, this node's certificate and key."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def __attrs_post_init__(self) -> None:
        """ValueError unless the certificate and key come together, with a CA."""
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file, key_file: give both or neither")
        if self.cert_file and not self.ca_file:
            raise ValueError("ca_file: required with a certificate")


@attrs.frozen
class FleetConfig:
    """The `fleet:` section: join a fleet of launchers on NATS JetStream (docs/fleet.md); with no `servers`, the
    launcher is on its own."""

    servers: tuple[str, ...] = ()
    cluster: str = ""
    node: str = ""  # "": the host name (`node_id`)
    labels: dict[str, str] = attrs.field(factory=dict)
    user: str = ""  # user and password, or neither (a server without authorization)
    password: str = ""
    creds_file: str = ""  # or a NATS credentials file (a user JWT and its nkey seed; a server in operator mode)
    tls: FleetTls = FleetTls()
    # The node's key in the nodes bucket expires this long after its last refresh (whole seconds, as NATS keeps
    # them); it is refreshed every `refresh_s`, and must outlive a JetStream leader election (up to ~8 s measured).
    liveness_ttl_s: int = attrs.field(default=15, validator=at_least(2))
    refresh_s: float = attrs.field(default=5.0, validator=at_least(0.1))
    bid_ttl_s: float = attrs.field(default=1.0, validator=at_least(0.05))  # an auction bid's reservation
    request_timeout_s: float = attrs.field(default=5.0, validator=at_least(0.1))  # a call to NATS (a publish's ack)
    replicas: int = attrs.field(default=1, validator=[at_least(1), at_most(5)])  # of the stream and bucket it makes

    def __attrs_post_init__(self) -> None:
        """ValueError for a bad server URL, cluster or node name, labels that are not strings, half-given or
        doubled credentials, a creds file that is missing or that others may read, or a refresh as long as the
        TTL."""
        for url in self.servers:
            if not url.startswith(("nats://", "tls://")):
                raise ValueError(f"servers: {url!r} is not a nats:// or tls:// URL")
        if self.servers and not SUBJECT_TOKEN.fullmatch(self.cluster):
            raise ValueError(f"cluster: {self.cluster!r} must be letters, digits, '-' or '_' (one token of the NATS "
                             "subjects)")
        if self.node and not SUBJECT_TOKEN.fullmatch(self.node):
            raise ValueError(f"node: {self.node!r} must be letters, digits, '-' or '_' (one token of the NATS "
                             "subjects)")
        if not isinstance(self.labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in self.labels.items()):
            raise ValueError("labels: must be a mapping of strings to strings")
        if bool(self.user) != bool(self.password):
            raise ValueError("user, password: give both or neither")
        if self.creds_file:
            if self.user:
                raise ValueError("creds_file, user: give one or the other")
            _check_private_file(self.creds_file)
        if self.refresh_s >= self.liveness_ttl_s:
            raise ValueError(f"refresh_s: {self.refresh_s:g} must be shorter than liveness_ttl_s "
                             f"({self.liveness_ttl_s})")

    @property
    def enabled(self) -> bool:
        """Whether the launcher joins a fleet (servers are given)."""
        return bool(self.servers)

    @property
    def node_id(self) -> str:
        """This node's id in the fleet: `node`, or the host name."""
        return self.node or default_node()


def _check_private_file(path: str) -> None:
    """ValueError unless `path` is a regular file that only its owner may read (it holds a secret)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ValueError(f"creds_file: {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"creds_file: {path} is not a file")
    if mode & 0o077:
        raise ValueError(f"creds_file: {path} may be read by other users (mode {stat.S_IMODE(mode):04o}); "
                         "make it 0600")


def _virtualizer_list(instance: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError("virtualizers: name at least one")
    doubled = sorted({name for name in value if value.count(name) > 1})
    if doubled:
        raise ValueError(f"virtualizers: {', '.join(doubled)} named twice")
    unknown = [name for name in value if name not in available_backends()]
    if unknown:
        raise ValueError(f"virtualizers: unknown virtualizer {unknown[0]!r}; available: "
                         f"{', '.join(available_backends()) or 'none'}")


@attrs.frozen
class Config:
    """The launcher's configuration: one YAML file (`load`), every key optional (`configs/launcher.yaml` lists
    them all, docs/configuration.md explains them); a virtualizer's own section is kept raw for it."""

    data_dir: Path = Path("/var/lib/launcher")
    listen: str = "127.0.0.1:7361"  # HOST:PORT; port 0 picks a free port (written to <data_dir>/api-url)
    listen_unix: str = ""  # a unix socket path (mode 0600) served beside `listen`; "" for none
    # The virtualizers this node runs, by entry-point name; the first one serves a START with an empty vm_type.
    # (The single `virtualizer: NAME` key, and --virtualizer, mean `virtualizers: [NAME]`.)
    virtualizers: tuple[str, ...] = attrs.field(default=("qemu",), validator=_virtualizer_list)
    max_payload_bytes: int = 1 << 20
    inbox_size: int = 16  # commands queued per instance before `instance_busy`
    log_max_bytes: int = 1 << 20  # per-instance launcher.log, one rotated copy kept
    worker_threads: int = 8  # shared limit for blocking work (fsync, /proc reads); libvirt has its own
    admission: Admission = Admission()
    defaults: Defaults = Defaults()
    timeouts: Timeouts = Timeouts()
    intervals: Intervals = Intervals()
    events: EventsConfig = EventsConfig()
    recovery: Recovery = Recovery()
    http: HttpLimits = HttpLimits()
    fleet: FleetConfig = FleetConfig()
    # Each virtualizer's own section, checked by that virtualizer: `simulation: {mode: memory, ...}`.
    sections: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    @property
    def virtualizer(self) -> str:
        """The default virtualizer: the first of `virtualizers`, which runs STARTs with an empty vm_type."""
        return self.virtualizers[0]

    def section(self, virtualizer: str) -> dict[str, Any]:
        """The virtualizer's own section, raw (its backend checks it with `parse_section`); {} if absent."""
        return self.sections.get(virtualizer, {})

    @property
    def instances_dir(self) -> Path:
        """`<data_dir>/instances`, where each instance has its dir."""
        return self.data_dir / "instances"


def load(path: Path | None = None, **overrides: Any) -> Config:
    """Read `path` (if given), apply non-None `overrides` (command-line options), and check everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the configuration must be a mapping")
        raw = dict(loaded or {})
    if "virtualizer" in raw:  # the single-virtualizer key of older files: a list of one
        if "virtualizers" in raw:
            raise ConfigError("virtualizer: give either virtualizer or virtualizers, not both")
        raw["virtualizers"] = [raw.pop("virtualizer")]
    if overrides.get("virtualizer") is not None:  # --virtualizer NAME replaces the file's list
        raw["virtualizers"] = [overrides.pop("virtualizer")]
    overrides.pop("virtualizer", None)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    # A top-level key naming a registered virtualizer is that virtualizer's own section.
    registered = set(available_backends())
    sections = {k: raw.pop(k) for k in list(raw) if k in registered}
    for name, section in sections.items():
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{name}: must be a mapping")
    if "sections" in raw:
        raise ConfigError("sections: unknown setting")
    raw["sections"] = {k: v or {} for k, v in sections.items()}
    config: Config = parse_section(Config, raw, "")
    # Paths handed to libvirt, QEMU and virtlogd (other processes, other working dirs) must be absolute.
    config = attrs.evolve(config, data_dir=config.data_dir.absolute())
    host, _, port = config.listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"listen: expected HOST:PORT, got {config.listen!r}")
    return config
