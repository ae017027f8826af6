"""Configuration loading: the shipped file, defaults, strictness."""

from __future__ import annotations

import typing
from pathlib import Path

import attrs
import pytest
import yaml
from config_reference import reference_table, rows

from launcher.core import config
from launcher.plugin.settings import ConfigError, parse_section
from virtualizers.qemu.settings import QemuSettings
from virtualizers.simulation.settings import SimulationSettings

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "configs" / "launcher.yaml"


def test_shipped_file_states_the_defaults() -> None:
    shipped = config.load(SHIPPED)
    qemu = parse_section(QemuSettings, shipped.virtualizers["qemu"], "qemu.")
    assert qemu == QemuSettings()
    assert shipped == config.load(None, qemu=shipped.virtualizers["qemu"],
                                  simulation={"mode": "memory", "boot_delay_s": 0.05, "stop_delay_s": 0.0,
                                              "failures": []})
    assert shipped.virtualizer == "qemu"


def test_the_configuration_page_holds_the_reference() -> None:
    """docs/configuration.md's "Reference" is the table generated from the shipped file."""
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert reference_table() in page, "run `.venv/bin/python tests/config_reference.py`, paste it into the page"


def test_the_shipped_file_names_every_setting_and_what_it_does() -> None:
    """The shipped file, hence the reference table, has one row per setting the code knows (no more, no fewer,
    not only those whose default differs), each with what it does."""
    settings = [(path, comment) for path, value, comment in rows(SHIPPED.read_text()) if value]
    paths = (_setting_paths(config.Config, "") + _setting_paths(QemuSettings, "qemu.")
             + _setting_paths(SimulationSettings, "simulation."))
    assert "qemu.volumes.detach_timeout_s" in paths and "timeouts.volume_s" in paths  # the walk reaches leaves
    assert sorted(path for path, _ in settings) == sorted(p for p in paths if p != "virtualizers")
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
    assert (cfg.data_dir, cfg.listen, cfg.virtualizer) == (Path("/tmp/x"), "0.0.0.0:1", "simulation")


@pytest.mark.parametrize("raw, message", [
    ({"admission": {"max_instancs": 3}}, "admission.max_instancs: unknown setting"),
    ({"timeouts": {"boot_s": "soon"}}, "timeouts.boot_s: expected a finite non-negative number"),
    ({"timeouts": {"boot_s": float("inf")}}, "timeouts.boot_s: expected a finite non-negative number"),
    ({"inbox_size": -1}, "inbox_size: expected a non-negative integer"),
    ({"listen": "7361"}, "listen: expected HOST:PORT"),
    ({"simulation": [1]}, "simulation: must be a mapping"),
    ({"recovery": {"restart_running": "sometimes"}}, "recovery.restart_running: must be one of never, requested"),
    ({"recovery": {"max_parallel": 0}}, "recovery.max_parallel: must be at least 1"),
])
def test_bad_settings_name_the_key(tmp_path: Path, raw: dict, message: str) -> None:

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        config.load(path)
