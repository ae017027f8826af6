"""Tests for virtualizers.qemu.cloudinit: the seed's content (identity, user-data, network config), its errors, and the
ISO image read back with pycdlib and with an OS tool."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pycdlib
import pytest
import yaml

from launcher.durable import datadir
from launcher.plugin.spec import Networking
from launcher.transport.payloads import parse_start
from virtualizers.qemu.cloudinit import SEED_FORMATS, GuestNetwork, Seed, SeedError, make_seed, write_seed

UUID = "d7d86208-b46c-4465-9018-fe14087d415f"
CIAO_META = '{\n  "uuid": "ciao",\n  "hostname": "ciao"\n}\n'
USER_DATA = "#cloud-config\nruncmd:\n  - [ touch, /etc/bootdone ]\n"
STATIC = Networking(
    vnic_mac="02:00:E6:F5:AF:F9",
    vnic_uuid="67d86208-b46c-0000-9018-fe14087d415f",
    concentrator_ip="192.168.42.21",
    subnet="192.168.8.0/21",
    private_ip="192.168.8.2",
)
DHCP = Networking(vnic_mac="02:00:e6:f5:af:f9")
EXAMPLE_START = Path(__file__).resolve().parent.parent / "configs" / "examples" / "start.json"
NETWORK_DATA = "openstack/latest/network_data.json"


def nocloud(meta_data: str = CIAO_META, networking: Networking = STATIC, user_data: str = USER_DATA) -> Seed:
    return make_seed("nocloud", UUID, user_data, meta_data, networking)


def configdrive(meta_data: str = CIAO_META, networking: Networking = STATIC, user_data: str = USER_DATA) -> Seed:
    return make_seed("configdrive", UUID, user_data, meta_data, networking)


def read_iso(path: Path) -> pycdlib.PyCdlib:
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    return iso


def iso_file(iso: pycdlib.PyCdlib, **name: str) -> bytes:
    """The content of one file, named by joliet_path=, rr_path= or iso_path=."""
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **name)
    return out.getvalue()


# --------------------------------------------------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta_data", "instance_id", "hostname"),
    [
        ("", UUID, UUID),
        (" \n", UUID, UUID),
        ("# nothing but a comment\n", UUID, UUID),
        ("{}", UUID, UUID),
        (CIAO_META, "ciao", "ciao"),
        ('{"uuid": "u1", "hostname": "h1", "instance-id": "i1", "local-hostname": "l1"}', "i1", "l1"),
        ("uuid: u1\nhostname: h1\n", "u1", "h1"),
        ("instance-id: i1\n", "i1", UUID),
        ("local-hostname: l1\n", UUID, "l1"),
        ("instance-id: ''\nuuid: u1\nlocal-hostname: null\nhostname: h1\n", "u1", "h1"),
    ],
)
@pytest.mark.parametrize("fmt", SEED_FORMATS)
def test_identity_precedence(fmt: str, meta_data: str, instance_id: str, hostname: str) -> None:
    seed = make_seed(fmt, UUID, USER_DATA, meta_data, STATIC)
    assert (seed.instance_id, seed.hostname) == (instance_id, hostname)


def test_nocloud_meta_data_puts_identity_first_and_keeps_other_keys() -> None:
    meta = '{"uuid": "u1", "hostname": "h1", "public-keys": ["ssh-ed25519 AAAA"], "zone": "z1"}'
    text = nocloud(meta).files["meta-data"].decode()
    assert text.splitlines()[:2] == ["instance-id: u1", "local-hostname: h1"]
    assert yaml.safe_load(text) == {
        "instance-id": "u1",
        "local-hostname": "h1",
        "public-keys": ["ssh-ed25519 AAAA"],
        "zone": "z1",
    }


def test_nocloud_meta_data_quotes_only_where_yaml_requires() -> None:
    text = nocloud('{"uuid": "52:54:00:12", "hostname": "true"}').files["meta-data"].decode()
    assert text == "instance-id: '52:54:00:12'\nlocal-hostname: 'true'\n"
    assert yaml.safe_load(text) == {"instance-id": "52:54:00:12", "local-hostname": "true"}


def test_nocloud_meta_data_of_empty_payload_meta_data() -> None:
    assert nocloud("").files["meta-data"] == f"instance-id: {UUID}\nlocal-hostname: {UUID}\n".encode()


def test_configdrive_meta_data_keeps_keys_and_sets_identity() -> None:
    meta = '{"uuid": "u1", "local-hostname": "l1", "hostname": "h1", "zone": "z1"}'
    text = configdrive(meta).files["openstack/latest/meta_data.json"].decode()
    expected = {"zone": "z1", "uuid": "u1", "hostname": "l1", "name": "l1"}  # identity keys in this format's form
    assert json.loads(text) == expected
    assert text == json.dumps(expected, indent=2) + "\n"


def test_configdrive_keeps_the_payloads_name() -> None:
    meta = json.loads(configdrive('{"name": "vm-7"}').files["openstack/latest/meta_data.json"])
    assert meta == {"name": "vm-7", "uuid": UUID, "hostname": UUID}


DEVICES = [{"type": "disk", "bus": "virtio", "serial": "0a1b-0001", "tags": ["db"]}]


def test_tagged_devices_are_in_both_meta_data_and_replace_the_payloads() -> None:
    meta = '{"uuid": "u1", "hostname": "h1", "devices": [], "zone": "z1"}'
    seed = make_seed("nocloud", UUID, "", meta, Networking(), devices=DEVICES)
    nocloud_meta = yaml.safe_load(seed.files["meta-data"])
    assert nocloud_meta == {"instance-id": "u1", "local-hostname": "h1", "devices": DEVICES, "zone": "z1"}
    drive = make_seed("configdrive", UUID, "", meta, Networking(), devices=DEVICES).files
    assert json.loads(drive["openstack/latest/meta_data.json"]) == \
        {"devices": DEVICES, "zone": "z1", "uuid": "u1", "hostname": "h1", "name": "h1"}
    assert yaml.safe_load(nocloud(meta).files["meta-data"])["devices"] == []  # none given: the payload's stays


# --------------------------------------------------------------------------------------------------------------------
# User-data
# --------------------------------------------------------------------------------------------------------------------

USER_DATAS = [USER_DATA, "#cloud-config\nusers:\n  - gecos: Zoë Łukasz 日本語 ✓\n", "", "no final newline\r\n\tx"]


@pytest.mark.parametrize("user_data", USER_DATAS)
def test_user_data_is_passed_byte_for_byte(user_data: str) -> None:
    assert nocloud(user_data=user_data).files["user-data"] == user_data.encode("utf-8")
    assert configdrive(user_data=user_data).files["openstack/latest/user_data"] == user_data.encode("utf-8")


def test_user_data_that_is_not_utf8_encodable_is_refused() -> None:
    with pytest.raises(SeedError, match="^user-data: not encodable as UTF-8"):
        nocloud(user_data="#cloud-config\n\ud800")


# --------------------------------------------------------------------------------------------------------------------
# Networking
# --------------------------------------------------------------------------------------------------------------------


def network_config(seed: Seed) -> Any:
    return yaml.safe_load(seed.files["network-config"])


def physical(seed: Seed) -> Any:
    """The one interface of a nocloud seed's network config (version 1)."""
    config = network_config(seed)
    assert config["version"] == 1
    return config["config"][0]


def test_network_config_static() -> None:
    """The default `guest_network`: the subnet's first host is the gateway, no DNS, no MTU."""
    assert network_config(nocloud()) == {
        "version": 1,
        "config": [{
            "type": "physical", "name": "eth0", "mac_address": "02:00:e6:f5:af:f9",
            "subnets": [{"type": "static", "address": "192.168.8.2", "netmask": "255.255.248.0",
                         "gateway": "192.168.8.1"}],
        }],
    }


def test_network_config_with_dns_and_mtu() -> None:
    settings = GuestNetwork(gateway="192.168.9.254", dns_servers=("192.168.8.1", "9.9.9.9"),
                            dns_search=("launcher.test",), mtu=1400)
    seed = make_seed("nocloud", UUID, "", "", STATIC, settings)
    assert network_config(seed)["config"] == [
        {"type": "physical", "name": "eth0", "mac_address": "02:00:e6:f5:af:f9", "mtu": 1400,
         "subnets": [{"type": "static", "address": "192.168.8.2", "netmask": "255.255.248.0",
                      "gateway": "192.168.9.254",
                      "dns_nameservers": ["192.168.8.1", "9.9.9.9"], "dns_search": ["launcher.test"]}]},
        {"type": "nameserver", "address": ["192.168.8.1", "9.9.9.9"]},
    ]
    data = json.loads(make_seed("configdrive", UUID, "", "", STATIC, settings).files[NETWORK_DATA])
    assert data == {
        "links": [{"id": "link0", "name": "eth0", "type": "phy", "ethernet_mac_address": "02:00:e6:f5:af:f9",
                   "mtu": 1400}],
        "networks": [{"id": "network0", "link": "link0", "type": "ipv4", "ip_address": "192.168.8.2",
                      "netmask": "255.255.248.0",
                      "gateway": "192.168.9.254",
                      "dns_nameservers": ["192.168.8.1", "9.9.9.9"], "dns_search": ["launcher.test"]}],
        "services": [{"type": "dns", "address": "192.168.8.1"}, {"type": "dns", "address": "9.9.9.9"}],
    }


@pytest.mark.parametrize(("gateway", "private_ip", "subnet", "expected"), [
    ("none", "192.168.8.2", "192.168.8.0/21", None),
    ("first_host", "192.168.8.1", "192.168.8.0/21", None),  # the instance is the first host: no route via itself
    ("first_host", "10.0.0.0", "10.0.0.0/31", None),  # a point-to-point /31 has no first host to route through
    ("first_host", "10.1.2.9", "10.1.2.3/24", "10.1.2.1"),
    ("10.1.2.254", "10.1.2.9", "10.1.2.0/24", "10.1.2.254"),
])
def test_the_gateway_of_a_static_address(gateway: str, private_ip: str, subnet: str, expected: str | None) -> None:
    networking = Networking(vnic_mac="52:54:00:12:34:56", subnet=subnet, private_ip=private_ip)
    seed = make_seed("nocloud", UUID, "", "", networking, GuestNetwork(gateway=gateway))
    assert physical(seed)["subnets"][0].get("gateway") == expected


def test_a_gateway_outside_the_subnet_is_refused() -> None:
    with pytest.raises(SeedError, match=r"^the gateway 10\.9\.9\.1 \(qemu\.guest_network\.gateway\) is not in "
                                        r"networking\.subnet 192\.168\.8\.0/21"):
        make_seed("configdrive", UUID, "", "", STATIC, GuestNetwork(gateway="10.9.9.1"))


def test_network_config_prefix_comes_from_a_subnet_with_host_bits() -> None:
    seed = nocloud(
        networking=Networking(vnic_mac="52:54:00:12:34:56", subnet="10.1.2.3/24", private_ip="10.1.2.9")
    )
    subnet = physical(seed)["subnets"][0]
    assert physical(seed)["mac_address"] == "52:54:00:12:34:56"  # a string, though YAML 1.1 could read a number
    assert (subnet["address"], subnet["netmask"]) == ("10.1.2.9", "255.255.255.0")


@pytest.mark.parametrize(
    "networking",
    [
        DHCP,
        Networking(vnic_mac="02:00:e6:f5:af:f9", private_ip="192.168.8.2"),
        Networking(vnic_mac="02:00:e6:f5:af:f9", subnet="192.168.8.0/21"),
    ],
)
def test_network_config_dhcp(networking: Networking) -> None:
    assert network_config(nocloud(networking=networking)) == {
        "version": 1,
        "config": [{"type": "physical", "name": "eth0", "mac_address": "02:00:e6:f5:af:f9",
                    "subnets": [{"type": "dhcp4"}]}],
    }


def test_no_network_config_without_a_mac() -> None:
    networking = Networking(subnet="192.168.8.0/21", private_ip="192.168.8.2", concentrator_ip="192.168.42.21")
    assert list(nocloud(networking=networking).files) == ["meta-data", "user-data"]
    assert list(configdrive(networking=networking).files) == [
        "openstack/latest/meta_data.json",
        "openstack/latest/user_data",
    ]


def test_configdrive_network_data_static() -> None:
    assert json.loads(configdrive().files[NETWORK_DATA]) == {
        "links": [{"id": "link0", "name": "eth0", "type": "phy", "ethernet_mac_address": "02:00:e6:f5:af:f9"}],
        "networks": [
            {
                "id": "network0",
                "link": "link0",
                "type": "ipv4",
                "ip_address": "192.168.8.2",
                "netmask": "255.255.248.0",
                "gateway": "192.168.8.1",
            }
        ],
        "services": [],
    }


def test_configdrive_network_data_dhcp() -> None:
    data = json.loads(configdrive(networking=DHCP).files[NETWORK_DATA])
    assert data["networks"] == [{"id": "network0", "link": "link0", "type": "ipv4_dhcp"}]


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("networking", "reason"),
    [
        (Networking(vnic_mac="02:00:e6:f5:af"), "networking.vnic_mac '02:00:e6:f5:af' is not a MAC address"),
        (Networking(vnic_mac="02:00:e6:f5:af:fg"), "networking.vnic_mac '02:00:e6:f5:af:fg' is not a MAC address"),
        (Networking(vnic_mac="0200e6f5aff9"), "networking.vnic_mac '0200e6f5aff9' is not a MAC address"),
        (
            Networking(vnic_mac="02:00:e6:f5:af:f9", subnet="192.168.8.0/21", private_ip="10.0.0.5"),
            "networking.private_ip 10.0.0.5 is not in subnet 192.168.8.0/21",
        ),
        (
            Networking(vnic_mac="02:00:e6:f5:af:f9", subnet="192.168.8.0/21", private_ip="192.168.8.300"),
            "networking.private_ip '192.168.8.300' is not an IPv4 address",
        ),
        (
            Networking(vnic_mac="02:00:e6:f5:af:f9", subnet="192.168.8.0/21", private_ip="192.168.15.255"),
            "networking.private_ip 192.168.15.255 is not a host address of subnet 192.168.8.0/21",
        ),
        (
            Networking(vnic_mac="02:00:e6:f5:af:f9", subnet="192.168.8.0", private_ip="192.168.8.2"),
            "networking.subnet '192.168.8.0' is not an IPv4 CIDR",
        ),
        (
            Networking(vnic_mac="02:00:e6:f5:af:f9", subnet="192.168.8.0/33", private_ip="192.168.8.2"),
            "networking.subnet '192.168.8.0/33' is not an IPv4 CIDR",
        ),
    ],
)
def test_invalid_networking_is_refused_naming_the_field(networking: Networking, reason: str) -> None:
    for fmt in SEED_FORMATS:
        with pytest.raises(SeedError, match="^" + re.escape(reason)):
            make_seed(fmt, UUID, USER_DATA, CIAO_META, networking)


@pytest.mark.parametrize(
    ("meta_data", "reason"),
    [
        ("[1, 2]", "meta-data: must be a mapping, got list"),
        ('"ciao"', "meta-data: must be a mapping, got str"),
        ("42", "meta-data: must be a mapping, got int"),
        ('{"uuid": "ciao"', "meta-data: not valid YAML or JSON"),
        ("1: one\n", "meta-data: keys must be strings, got 1"),
        ('{"uuid": 42}', "meta-data.uuid: must be a string"),
        ('{"instance-id": ["a"]}', "meta-data.instance-id: must be a string"),
        ('{"hostname": "a\\nb"}', "meta-data.hostname: must be a string without control characters"),
    ],
)
def test_invalid_meta_data_is_refused_naming_the_field(meta_data: str, reason: str) -> None:
    for fmt in SEED_FORMATS:
        with pytest.raises(SeedError, match="^" + re.escape(reason)):
            make_seed(fmt, UUID, USER_DATA, meta_data, STATIC)


def test_meta_data_that_is_not_utf8_encodable_is_refused() -> None:
    with pytest.raises(SeedError, match="^meta-data: not encodable as UTF-8"):
        nocloud('{"uuid": "\ud800"}')


@pytest.mark.parametrize("meta_data", ["built: 2024-01-02\n", "ratio: .nan\n"])
def test_meta_data_that_json_cannot_hold_is_refused_for_configdrive(meta_data: str) -> None:
    assert nocloud(meta_data).files["meta-data"].endswith(meta_data.encode())
    with pytest.raises(SeedError, match="^meta-data: cannot be written as JSON"):
        configdrive(meta_data)


def test_unknown_format_is_refused() -> None:
    with pytest.raises(SeedError, match="unknown seed format 'iso'"):
        make_seed("iso", UUID, USER_DATA, CIAO_META, STATIC)


def test_seed_files_are_read_only() -> None:
    with pytest.raises(TypeError):
        nocloud().files["meta-data"] = b""  # type: ignore[index]


# --------------------------------------------------------------------------------------------------------------------
# The ISO image
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("user_data", USER_DATAS)
def test_nocloud_iso_reads_back(tmp_path: Path, user_data: str) -> None:
    seed = nocloud(user_data=user_data)
    write_seed(seed, tmp_path / "seed.iso")
    assert os.listdir(tmp_path) == ["seed.iso"]
    iso = read_iso(tmp_path / "seed.iso")
    try:
        assert iso.pvd.volume_identifier.rstrip(b" ") == b"cidata"
        assert iso.rock_ridge == "1.09"
        assert iso.has_joliet()
        assert iso.interchange_level == 3
        assert sorted(
            child.rock_ridge.name()
            for child in iso.list_children(rr_path="/")
            if child.rock_ridge and not (child.is_dot() or child.is_dotdot())
        ) == [b"meta-data", b"network-config", b"user-data"]
        for name, content in seed.files.items():
            assert iso_file(iso, joliet_path=f"/{name}") == content
            assert iso_file(iso, rr_path=f"/{name}") == content
        assert iso_file(iso, iso_path="/USER_DATA.;1") == user_data.encode()
    finally:
        iso.close()


def test_configdrive_iso_reads_back(tmp_path: Path) -> None:
    seed = configdrive(user_data="")
    write_seed(seed, tmp_path / "seed.iso")
    iso = read_iso(tmp_path / "seed.iso")
    try:
        assert iso.pvd.volume_identifier.rstrip(b" ") == b"config-2"
        assert iso.get_record(rr_path="/openstack/latest").is_dir()
        assert iso.get_record(joliet_path="/openstack/latest").is_dir()
        for name in ("meta_data.json", "user_data", "network_data.json"):
            content = seed.files[f"openstack/latest/{name}"]
            assert iso_file(iso, joliet_path=f"/openstack/latest/{name}") == content
            assert iso_file(iso, rr_path=f"/openstack/latest/{name}") == content
        assert iso_file(iso, rr_path="/openstack/latest/user_data") == b""
        assert json.loads(iso_file(iso, iso_path="/OPENSTACK/LATEST/META_DATA.JSON;1"))["uuid"] == "ciao"
    finally:
        iso.close()


def test_example_payload_end_to_end(tmp_path: Path) -> None:
    spec = parse_start(EXAMPLE_START.read_bytes(), "application/json").spec
    seed = make_seed("nocloud", spec.instance_uuid, spec.user_data, spec.meta_data, spec.networking)
    write_seed(seed, tmp_path / "seed.iso")
    iso = read_iso(tmp_path / "seed.iso")
    try:
        assert iso_file(iso, rr_path="/user-data") == spec.user_data.encode()
        assert iso_file(iso, rr_path="/meta-data") == b"instance-id: ciao\nlocal-hostname: ciao\n"
        config = yaml.safe_load(iso_file(iso, rr_path="/network-config"))
        subnet = config["config"][0]["subnets"][0]
        assert (subnet["address"], subnet["netmask"]) == ("192.168.8.2", "255.255.248.0")
    finally:
        iso.close()


def test_write_replaces_an_earlier_seed(tmp_path: Path) -> None:
    path = tmp_path / "seed.iso"
    write_seed(nocloud(user_data="first"), path)
    write_seed(nocloud(user_data="second"), path)
    assert os.listdir(tmp_path) == ["seed.iso"]
    iso = read_iso(path)
    try:
        assert iso_file(iso, rr_path="/user-data") == b"second"
    finally:
        iso.close()


def test_failed_write_leaves_no_seed_and_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datadir.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        write_seed(nocloud(), tmp_path / "seed.iso")
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_earlier_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "seed.iso"
    write_seed(nocloud(), path)
    before = path.read_bytes()

    def fail_rename(src: Any, dst: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(datadir.os, "replace", fail_rename)
    with pytest.raises(OSError, match="Input/output error"):
        write_seed(nocloud(user_data="other"), path)
    assert os.listdir(tmp_path) == ["seed.iso"]
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("seed", "reason"),
    [
        (
            Seed(label="cidata", files={"a-b": b"1", "a_b": b"2"}, instance_id="i", hostname="h"),
            "seed paths 'a-b' and 'a_b' have the same ISO 9660 name /A_B.;1",
        ),
        (
            Seed(label="x" * 33, files={"meta-data": b""}, instance_id="i", hostname="h"),
            "the seed cannot be laid out as an ISO",
        ),
    ],
)
def test_seed_that_cannot_be_an_iso_is_refused(tmp_path: Path, seed: Seed, reason: str) -> None:
    with pytest.raises(SeedError, match="^" + re.escape(reason)):
        write_seed(seed, tmp_path / "seed.iso")
    assert os.listdir(tmp_path) == []


def os_tool_view(path: Path) -> tuple[str, str]:
    """(volume description, file listing) of the ISO at `path` as xorriso or isoinfo reports them."""

    def run(*argv: str) -> str:
        return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout

    if shutil.which("xorriso"):
        return run("xorriso", "-indev", str(path), "-pvd_info"), run("xorriso", "-indev", str(path), "-find")
    if shutil.which("isoinfo"):
        return run("isoinfo", "-d", "-i", str(path)), run("isoinfo", "-R", "-f", "-i", str(path))
    pytest.skip("neither xorriso nor isoinfo is installed")


@pytest.mark.parametrize("fmt", SEED_FORMATS)
def test_iso_is_readable_by_an_os_tool(tmp_path: Path, fmt: str) -> None:
    seed = make_seed(fmt, UUID, USER_DATA, CIAO_META, STATIC)
    write_seed(seed, tmp_path / "seed.iso")
    description, listing = os_tool_view(tmp_path / "seed.iso")
    assert re.search(rf"^Volume id\s*:\s*{seed.label}\s*$", description, re.IGNORECASE | re.MULTILINE)
    for name in seed.files:
        assert name in listing
