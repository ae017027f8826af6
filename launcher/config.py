"""Typed launcher configuration, loaded from YAML (configs/launcher.yaml) and checked strictly.

Every key is optional; a missing key takes the default shown here. An unknown key or a value of the wrong
type is a `ConfigError` that names the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import attrs
import yaml

from launcher.errors import SetupError
from launcher.http import Limits as HttpLimits
from virtualizers.base import available_backends


class ConfigError(SetupError):
    """A setting that is unknown, of the wrong type or out of range; the message names its key."""


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
    stats_s: float = 10.0
    wait_s: float = 600.0  # longest ?wait=1 a client may ask for


@attrs.frozen
class Intervals:
    stats_snapshot_s: float = 6.0  # node STATS snapshot and `stats` event
    instance_stats_s: float = 30.0  # vm.stats() poll of a running instance


@attrs.frozen
class EventsConfig:
    rotate_bytes: int = 64 << 20
    keep_files: int = 4
    memory_events: int = 20000
    memory_bytes: int = 16 << 20  # and at most this much (as JSON): `stats` events are large


RESTART_POLICIES = ("never", "requested", "always")


def _restart_policy(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in RESTART_POLICIES:
        raise ValueError(f"{attribute.name}: must be one of {', '.join(RESTART_POLICIES)}, got {value!r}")


def _at_least_one(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name}: must be at least 1, got {value!r}")


@attrs.frozen
class Recovery:
    """What a launcher does at start-up with instances whose VM is gone (README "After a restart")."""

    # After a host reboot, instances that were running: never restarted, restarted if their START said
    # `restart: true` (requested), or always.
    restart_running: str = attrs.field(default="always", validator=_restart_policy)
    max_parallel: int = attrs.field(default=4, validator=_at_least_one)  # VMs booted by recovery at once


@attrs.frozen
class Config:
    data_dir: Path = Path("/var/lib/launcher")
    listen: str = "127.0.0.1:7361"  # HOST:PORT; port 0 picks a free port (written to <data_dir>/api-url)
    listen_unix: str = ""  # a unix socket path (mode 0600) served beside `listen`; "" for none
    virtualizer: str = "qemu"
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
    # Each virtualizer's own section, checked by that virtualizer: `simulation: {mode: memory, ...}`.
    virtualizers: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    def virtualizer_settings(self) -> dict[str, Any]:
        return self.virtualizers.get(self.virtualizer, {})

    @property
    def instances_dir(self) -> Path:
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
    raw.update({k: v for k, v in overrides.items() if v is not None})
    # A top-level key naming a registered virtualizer is that virtualizer's own section.
    registered = set(available_backends())
    sections = {k: raw.pop(k) for k in list(raw) if k in registered}
    for name, section in sections.items():
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"{name}: must be a mapping")
    raw["virtualizers"] = {k: v or {} for k, v in sections.items()}
    config: Config = parse_section(Config, raw, "")
    # Paths handed to libvirt, QEMU and virtlogd (other processes, other working dirs) must be absolute.
    config = attrs.evolve(config, data_dir=config.data_dir.absolute())
    host, _, port = config.listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"listen: expected HOST:PORT, got {config.listen!r}")
    return config


def parse_section(cls: type, raw: Any, where: str) -> Any:
    """An instance of the attrs class `cls` from the mapping `raw`, checked strictly.

    `where` prefixes the keys in error messages (e.g. "qemu."). Virtualizers use it for their own sections.
    Field validators of `cls` may raise ValueError; it is reported as a ConfigError naming `where`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in attrs.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}{key}: unknown setting (known: {', '.join(sorted(known))})")
    values = {k: _convert(hints[k], v, f"{where}{k}") for k, v in raw.items()}
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(f"{where}{exc}") from exc


def _convert(kind: Any, value: Any, where: str) -> Any:
    if attrs.has(kind):
        return parse_section(kind, value, where + ".")
    if kind is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path")
        return Path(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{where}: expected a non-negative number, got {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}: expected a non-negative integer, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if typing.get_origin(kind) is tuple and typing.get_args(kind)[1:] == (Ellipsis,):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = typing.get_args(kind)[0]
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if typing.get_origin(kind) in (dict, types.GenericAlias):
        return value
    raise ConfigError(f"{where}: unsupported setting type {kind}")  # a bug in this module, not in the file
