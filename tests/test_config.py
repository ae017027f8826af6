"""Configuration loading: the shipped file, defaults, strictness."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml
from config_reference import reference_table, rows

from launcher.core import config
from launcher.core.config import Config
from launcher.plugin.settings import ConfigError, parse_section
from virtualizers.docker.settings import DockerSettings
from virtualizers.qemu.settings import QemuSettings
from virtualizers.simulation.settings import SimulationSettings

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "configs" / "launcher.yaml"


# The documented defaults (configs/launcher.yaml, docs/configuration.md), written out: a default that changes
# fails here, whether or not the shipped file changed with it.
DEFAULTS: dict[str, Any] = {
    "data_dir": Path("/var/lib/launcher"), "listen": "127.0.0.1:7361", "listen_unix": "", "virtualizers": ("qemu",),
    "max_payload_bytes": 1048576, "inbox_size": 16, "log_max_bytes": 1048576, "worker_threads": 8,
    "admission": {"max_instances": 4096, "keep_free_memory_mb": 1024, "keep_free_disk_mb": 4096,
                  "vcpu_overcommit": 4.0, "memory_overcommit": 1.0, "disk_overcommit": 1.0},
    "defaults": {"vcpus": 1, "mem_mb": 256, "disk_mb": 0},
    "timeouts": {"ensure_image_s": 1800.0, "create_image_s": 120.0, "start_vm_s": 120.0, "boot_s": 300.0,
                 "stop_grace_s": 30.0, "delete_grace_s": 0.0, "stop_margin_s": 30.0, "delete_image_s": 60.0,
                 "volume_s": 60.0, "stats_s": 10.0, "wait_s": 600.0},
    "intervals": {"stats_snapshot_s": 6.0, "instance_stats_s": 30.0},
    "http": {"idle_timeout_s": 75.0, "body_timeout_s": 60.0, "send_timeout_s": 60.0, "max_connections": 4096},
    "events": {"rotate_bytes": 67108864, "keep_files": 4, "memory_events": 20000, "memory_bytes": 16777216},
    "recovery": {"restart_running": "always", "max_parallel": 4},
    "fleet": {"servers": (), "cluster": "", "node": "", "labels": {}, "user": "", "password": "", "creds_file": "",
              "tls": {"ca_file": "", "cert_file": "", "key_file": ""}, "liveness_ttl_s": 15, "refresh_s": 5.0,
              "bid_ttl_s": 1.0, "request_timeout_s": 5.0, "replicas": 1},
}
QEMU_DEFAULTS: dict[str, Any] = {
    "uri": "qemu:///system", "accel": "auto", "machine": "q35", "hotplug_slots": 8, "seed_format": "nocloud",
    "network": {"kind": "network", "source": "default"},
    "guest_network": {"gateway": "first_host", "dns_servers": (), "dns_search": (), "mtu": 0},
    "volumes": {"pool": "", "copy_timeout_s": 3600.0, "detach_timeout_s": 30.0},
    "image_dirs": (), "image_url": "", "import_sources": (), "image_max_bytes": 68719476736,
    "image_gc_age_s": 604800.0, "ovmf_code": Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
    "ovmf_vars": Path("/usr/share/OVMF/OVMF_VARS_4M.fd"), "destroy_orphans": False, "libvirt_threads": 8,
    "libvirt_timeout_s": 60.0, "state_poll_s": 5.0, "pools": (), "slot_make_timeout_s": 120.0,
    "templates": (), "template_boot_timeout_s": 300.0, "clone_ready_timeout_s": 60.0,
}
DOCKER_DEFAULTS: dict[str, Any] = {
    "socket": "unix:///run/docker.sock", "api_version": "1.41", "image_dir": Path(""), "pull": False, "network": "",
    "disk_quota": False, "name_prefix": "launcher-", "call_timeout_s": 30.0, "image_timeout_s": 600.0, "poll_s": 5.0,
    "console_max_bytes": 2097152, "console_backups": 3, "destroy_orphans": False, "allow_privileged": False,
}
SIMULATION_DEFAULTS: dict[str, Any] = {"mode": "memory", "boot_delay_s": 0.05, "stop_delay_s": 0.0, "pools": (),
                                       "slot_delay_s": 0.01, "failures": ()}


def settings_of(loaded: Config) -> tuple[dict[str, Any], ...]:
    """The launcher's own settings, and the qemu, simulation and docker sections as their backends parse them, as
    plain values."""
    def plain(settings: attrs.AttrsInstance) -> dict[str, Any]:
        return attrs.asdict(settings)

    sections = loaded.sections
    return ({key: value for key, value in plain(loaded).items() if key != "sections"},
            plain(parse_section(QemuSettings, sections.get("qemu", {}), "qemu.")),
            plain(parse_section(SimulationSettings, sections.get("simulation", {}), "simulation.")),
            plain(parse_section(DockerSettings, sections.get("docker", {}), "docker.")))


def test_the_defaults_are_the_documented_ones() -> None:
    assert settings_of(config.load(None)) == (DEFAULTS, QEMU_DEFAULTS, SIMULATION_DEFAULTS, DOCKER_DEFAULTS)


def test_shipped_file_states_the_defaults() -> None:
    shipped = config.load(SHIPPED)
    assert sorted(shipped.sections) == ["docker", "qemu", "simulation"]  # each virtualizer's section is there
    assert settings_of(shipped) == (DEFAULTS, QEMU_DEFAULTS, SIMULATION_DEFAULTS, DOCKER_DEFAULTS)


def test_the_configuration_page_holds_the_reference() -> None:
    """docs/configuration.md's "Reference" is the table generated from the shipped file."""
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert reference_table() in page, "run `.venv/bin/python tests/config_reference.py`, paste it into the page"


def test_the_shipped_file_names_every_setting_and_what_it_does() -> None:
    """The shipped file, hence the reference table, has one row per setting the code knows (no more, no fewer,
    not only those whose default differs), each with what it does."""
    settings = [(path, comment) for path, value, comment in rows(SHIPPED.read_text()) if value]
    paths = (_setting_paths(config.Config, "") + _setting_paths(QemuSettings, "qemu.")
             + _setting_paths(SimulationSettings, "simulation.") + _setting_paths(DockerSettings, "docker."))
    assert "qemu.volumes.detach_timeout_s" in paths and "timeouts.volume_s" in paths  # the walk reaches leaves
    assert sorted(path for path, _ in settings) == sorted(p for p in paths if p != "sections")
    assert [path for path, comment in settings if not comment] == []


def test_the_reference_reads_sections_and_continued_comments() -> None:
    text = "a: 1  # one\nb:  # group\n  c: x | y  # two\n       # lines\n  d:\n    e: []\n"
    assert rows(text) == [("a", "1", "one"), ("b", "", "group"), ("b.c", "x | y", "two lines"), ("b.d", "", ""),
                          ("b.d.e", "[]", "")]
    assert "| `b.c` | `x \\| y` | two lines |" in reference_table(text)


def _setting_paths(cls: type, prefix: str) -> list[str]:
    """Every leaf setting of an attrs settings class, as dotted paths."""
    paths = []
    for name, kind in typing.get_type_hints(cls).items():
        if attrs.has(kind):
            paths += _setting_paths(kind, f"{prefix}{name}.")
        else:
            paths.append(prefix + name)
    return paths


def test_overrides_win() -> None:
    cfg = config.load(SHIPPED, data_dir=Path("/tmp/x"), listen="0.0.0.0:1", virtualizer="simulation")
    assert (cfg.data_dir, cfg.listen, cfg.virtualizers) == (Path("/tmp/x"), "0.0.0.0:1", ("simulation",))


def test_virtualizers_list_and_the_single_key(tmp_path: Path) -> None:
    """`virtualizers:` lists the node's virtualizers, the first being the default; the older single key and
    --virtualizer are a list of one (the option replaces the file's list)."""
    path = tmp_path / "c.yaml"
    path.write_text("virtualizers: [simulation, qemu]\n")
    cfg = config.load(path)
    assert (cfg.virtualizers, cfg.virtualizer) == (("simulation", "qemu"), "simulation")
    path.write_text("virtualizer: simulation\n")
    assert config.load(path).virtualizers == ("simulation",)
    path.write_text("virtualizers: [qemu, simulation]\n")
    assert config.load(path, virtualizer="simulation").virtualizers == ("simulation",)


def test_a_creds_file_others_may_read_is_refused(tmp_path: Path) -> None:
    creds = tmp_path / "n1.creds"
    creds.write_text("-----BEGIN NATS USER JWT-----\n")
    creds.chmod(0o640)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"fleet": {"creds_file": str(creds)}}))
    with pytest.raises(ConfigError, match=r"fleet.creds_file: .*n1.creds may be read by other users \(mode 0640\); "
                                          "make it 0600"):
        config.load(path)
    creds.chmod(0o600)
    assert config.load(path).fleet.creds_file == str(creds)


@pytest.mark.parametrize("raw, message", [
    ({"admission": {"max_instancs": 3}}, "admission.max_instancs: unknown setting"),
    ({"timeouts": {"boot_s": "soon"}}, "timeouts.boot_s: expected a finite non-negative number"),
    ({"timeouts": {"boot_s": float("inf")}}, "timeouts.boot_s: expected a finite non-negative number"),
    ({"inbox_size": -1}, "inbox_size: expected a non-negative integer"),
    ({"listen": "7361"}, "listen: expected HOST:PORT"),
    ({"simulation": [1]}, "simulation: must be a mapping"),
    ({"virtualizers": []}, "virtualizers: name at least one"),
    ({"virtualizers": "qemu"}, "virtualizers: expected a list"),
    ({"virtualizers": ["qemu", "qemu"]}, "virtualizers: qemu named twice"),
    ({"virtualizers": ["qemu", "vmware"]}, "virtualizers: unknown virtualizer 'vmware'; available: "),
    ({"virtualizer": "qemu", "virtualizers": ["qemu"]}, "give either virtualizer or virtualizers, not both"),
    ({"sections": {}}, "sections: unknown setting"),
    ({"fleet": {"servers": ["http://n:4222"], "cluster": "c"}}, "fleet.servers: 'http://n:4222' is not a nats://"),
    ({"fleet": {"servers": ["nats://n:4222"]}}, "fleet.cluster: '' must be letters, digits, '-' or '_'"),
    ({"fleet": {"servers": ["nats://n:4222"], "cluster": "a.b"}}, "fleet.cluster: 'a.b' must be letters"),
    ({"fleet": {"node": "n>"}}, "fleet.node: 'n>' must be letters"),
    ({"fleet": {"labels": {"zone": 1}}}, "fleet.labels: must be a mapping of strings to strings"),
    ({"fleet": {"user": "u"}}, "fleet.user, password: give both or neither"),
    ({"fleet": {"refresh_s": 20}}, "fleet.refresh_s: 20 must be shorter than liveness_ttl_s"),
    ({"fleet": {"tls": {"cert_file": "/c.pem"}}}, "fleet.tls.cert_file, key_file: give both or neither"),
    ({"fleet": {"creds_file": "/nowhere/n1.creds"}}, "fleet.creds_file: /nowhere/n1.creds: No such file"),
    ({"fleet": {"creds_file": "/etc"}}, "fleet.creds_file: /etc is not a file"),
    ({"fleet": {"creds_file": "/nowhere/n1.creds", "user": "u", "password": "p"}},
     "fleet.creds_file, user: give one or the other"),
    ({"recovery": {"restart_running": "sometimes"}}, "recovery.restart_running: must be one of never, requested"),
    ({"recovery": {"max_parallel": 0}}, "recovery.max_parallel: must be at least 1"),
])
def test_bad_settings_name_the_key(tmp_path: Path, raw: dict, message: str) -> None:

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        config.load(path)
