"""virtualizers.qemu.templates without a VM: the template key, the template domain's XML (checked by libvirt's
in-process test driver too), the qcow2 backing-file read and the startup cleanup of template dirs and domains."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import attrs
import libvirt
import pytest

from virtualizers.qemu import clone_restore, domain, templates
from virtualizers.qemu.domain import Firmware
from virtualizers.qemu.images import ImageInfo


def spec(tmp_path: Path, **changes: object) -> templates.TemplateSpec:
    image = ImageInfo(id="img", path=tmp_path / "img.img", format="qcow2", virtual_size=1 << 30, size=123,
                      sha256="ab" * 32, source="x", imported_at="", sha256_verified=False, last_used=0.0)
    base = templates.TemplateSpec(image=image, vcpus=1, mem_mb=256, firmware=Firmware(efi=False), machine="q35",
                                  hotplug_slots=8, kvm=False)
    return attrs.evolve(base, **changes)


def test_the_key_changes_with_every_input(tmp_path: Path) -> None:
    base = spec(tmp_path)
    key = templates.template_key(base.key_inputs(7002000, 9000000))
    assert key == templates.template_key(spec(tmp_path).key_inputs(7002000, 9000000))  # stable
    others = [
        spec(tmp_path, image=attrs.evolve(base.image, sha256="cd" * 32)),  # the image re-imported with other content
        spec(tmp_path, image=attrs.evolve(base.image, size=124)),
        spec(tmp_path, image=attrs.evolve(base.image, id="other")),
        spec(tmp_path, vcpus=2), spec(tmp_path, mem_mb=512), spec(tmp_path, firmware=Firmware(efi=True)),
        spec(tmp_path, machine="pc"), spec(tmp_path, hotplug_slots=4), spec(tmp_path, kvm=True),
    ]
    keys = {templates.template_key(other.key_inputs(7002000, 9000000)) for other in others}
    keys |= {templates.template_key(base.key_inputs(8000000, 9000000)),
             templates.template_key(base.key_inputs(7002000, 10000000))}
    assert key not in keys and len(keys) == len(others) + 2
    assert base.key_inputs(1, 2)["template_version"] == templates.TEMPLATE_VERSION


def test_the_template_domain_has_a_genid_no_nic_no_shared_pages_and_template_metadata(tmp_path: Path) -> None:
    key = "0123456789abcdef" * 4
    xml = templates.template_xml(spec(tmp_path), key, tmp_path, tmp_path / "tpl")
    root = ET.fromstring(xml)
    assert root.findtext("name") == "launcher-template-0123456789ab"
    assert root.find("genid") is not None and root.find("memoryBacking/nosharepages") is not None
    assert root.find("devices/interface") is None
    assert domain.read_metadata(xml) is None  # never taken for an instance by recovery
    assert templates.read_template_metadata(xml) == {"key": key, "data-dir": str(tmp_path)}
    validate = subprocess.run(["virt-xml-validate", "-", "domain"], input=xml, capture_output=True, text=True)
    assert validate.returncode == 0, validate.stderr + validate.stdout

    conn = libvirt.open("test:///default")
    try:
        conn.defineXML(xml)
        assert templates._remove_template_domains(conn, tmp_path / "elsewhere") == []
        assert templates._remove_template_domains(conn, tmp_path) == [root.findtext("name")]
        assert root.findtext("name") not in [d.name() for d in conn.listAllDomains()]
    finally:
        conn.close()


def make_qcow2(path: Path, backing: Path | None = None) -> None:
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run([*argv, str(path), "1M"], check=True)


def test_cleanup_keeps_wanted_and_backed_templates_only(tmp_path: Path) -> None:
    root = tmp_path / "templates"
    for name in ("wanted", "backed", "orphan", "half" + templates.PARTIAL_SUFFIX):
        (root / name).mkdir(parents=True)
        make_qcow2(root / name / templates.DISK)
    overlay = tmp_path / "overlay.qcow2"
    make_qcow2(overlay, root / "backed" / templates.DISK)
    assert templates.qcow2_backing(overlay) == str(root / "backed" / templates.DISK)
    assert templates.qcow2_backing(root / "orphan" / templates.DISK) is None
    (tmp_path / "not-qcow2").write_bytes(b"x" * 100)
    assert templates.qcow2_backing(tmp_path / "not-qcow2") is None

    removed = templates._remove_dirs(root, {"wanted"}, [overlay, tmp_path / "missing.qcow2"])
    assert sorted(removed) == ["half.partial", "orphan"]
    assert sorted(p.name for p in root.iterdir()) == ["backed", "wanted"]


@pytest.mark.parametrize("line, expected", [
    ("guest-identity instance-id=i-1 rng=ab reidentified=1", True),
    ("guest-identity instance-id=i-1 rng=ab reidentified=0", False),  # the template's boot line
    ("guest-identity instance-id=i-2 rng=ab reidentified=1", False),
    ("guest-ready instance-id=i-1 reidentified=1", False),
])
def test_a_clone_is_reidentified_by_its_own_identity_line_only(line: str, expected: bool) -> None:
    assert clone_restore._reidentified(line, "i-1") is expected


def test_the_template_namespace_is_the_clones_too() -> None:
    assert domain.TEMPLATE_NS.startswith("http://launcher.invalid/")
