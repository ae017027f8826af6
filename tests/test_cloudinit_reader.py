"""The launcher's seeds as cloud-init itself reads them: Debian's `cloud-init` package (its NoCloud and
ConfigDrive datasources, `network_state` and its ENI, netplan and networkd renderers), run by
tests/cloudinit_read.py under the system Python.

For every payload below, each format gives the guest the identity (instance-id, hostname, FQDN, SSH keys), the
user-data and the network configuration (addresses, routes, DNS, MTU and the NIC's name) written out beside the
payload, and the two formats render that configuration (ENI, netplan, networkd) the same.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.plugin.spec import Networking
from virtualizers.qemu.cloudinit import SEED_FORMATS, GuestNetwork, make_seed

SYSTEM_PYTHON = Path("/usr/bin/python3")
READER = Path(__file__).resolve().parent / "cloudinit_read.py"
UUID = "d7d86208-b46c-4465-9018-fe14087d415f"
MAC = "52:54:00:12:34:56"
KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA0Aa0 a@launcher"
KEY_B = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC0b b@launcher"
STATIC = Networking(vnic_mac=MAC, private_ip="192.168.122.77", subnet="192.168.122.0/24")
DHCP = Networking(vnic_mac=MAC)
FULL = GuestNetwork(dns_servers=("192.168.122.1", "9.9.9.9"), dns_search=("launcher.test", "example.org"), mtu=1400)


def static(address: str, gateway: str | None, dns: tuple[str, ...] = (),
           search: tuple[str, ...] = ()) -> dict[str, Any]:
    """cloud-init's subnet for a static /24 address (DNS settings only where there are some)."""
    subnet: dict[str, Any] = {"type": "static", "address": address, "prefix": 24, "netmask": "255.255.255.0",
                              "routes": []}
    if gateway is not None:
        subnet["gateway"] = gateway
    return subnet | nameservers(dns, search)


def nameservers(dns: tuple[str, ...], search: tuple[str, ...]) -> dict[str, Any]:
    return ({"dns_nameservers": list(dns)} if dns else {}) | ({"dns_search": list(search)} if search else {})


def eth0(subnet: dict[str, Any], mtu: int | None = None) -> dict[str, Any]:
    """cloud-init's network state: one NIC, eth0 with the payload's MAC, and `subnet`; the subnet's nameservers
    are the global ones too (its search domains are not)."""
    return {"interfaces": [{"name": "eth0", "mac_address": MAC, "mtu": mtu, "subnets": [subnet]}], "routes": [],
            "dns": {"nameservers": subnet.get("dns_nameservers", []), "search": []}}


def guest(instance_id: str, hostname: str, fqdn: str | None = None, keys: tuple[str, ...] = (),
          network: dict[str, Any] | None = None) -> dict[str, Any]:
    """What cloud-init gives the guest, as `state_view` shows it; the user-data is every case's."""
    return {"instance_id": instance_id, "hostname": hostname, "fqdn": fqdn or hostname, "public_keys": list(keys),
            "user_data": "#cloud-config\n", "devices": None, "network": network}


DHCP_FULL = {"type": "dhcp4", "routes": [], "dns_nameservers": ["192.168.122.1", "9.9.9.9"],
             "dns_search": ["launcher.test", "example.org"]}

# (name, meta-data, networking, guest_network settings, what cloud-init reads from either format)
CASES: list[tuple[str, str, Networking, GuestNetwork, dict[str, Any]]] = [
    ("ciao meta-data, static, defaults", '{"uuid": "ciao", "hostname": "ciao"}', STATIC, GuestNetwork(),
     guest("ciao", "ciao", network=eth0(static("192.168.122.77", "192.168.122.1")))),
    ("nocloud keys, static, DNS and MTU",
     json.dumps({"instance-id": "i-7", "local-hostname": "web-1.launcher.test", "public-keys": [KEY_A, KEY_B]}),
     STATIC, FULL,
     guest("i-7", "web-1", "web-1.launcher.test", (KEY_A, KEY_B), eth0(
         static("192.168.122.77", "192.168.122.1", ("192.168.122.1", "9.9.9.9"), ("launcher.test", "example.org")),
         mtu=1400))),
    ("configdrive keys, static, no gateway",
     json.dumps({"uuid": "u-8", "hostname": "db", "public_keys": {"ops": KEY_A}, "zone": "z1"}),
     STATIC, GuestNetwork(gateway="none", dns_servers=("10.0.0.53",)),
     guest("u-8", "db", keys=(KEY_A,), network=eth0(static("192.168.122.77", None, ("10.0.0.53",))))),
    ("both key spellings, explicit gateway",
     json.dumps({"hostname": "gw", "public-keys": f"{KEY_A}\n{KEY_B}\n", "public_keys": [KEY_A, KEY_B]}),
     Networking(vnic_mac=MAC, private_ip="10.1.2.9", subnet="10.1.2.0/24"), GuestNetwork(gateway="10.1.2.254"),
     guest(UUID, "gw", keys=(KEY_A, KEY_B), network=eth0(static("10.1.2.9", "10.1.2.254")))),
    ("no meta-data, DHCP with DNS", "", DHCP, FULL, guest(UUID, UUID, network=eth0(DHCP_FULL, mtu=1400))),
    ("no MAC: no network config", '{"uuid": "plain"}', Networking(), FULL, guest("plain", UUID)),
]


def read_with_cloud_init(tmp_path: Path, seeds: dict[str, dict[str, bytes]]) -> dict[str, Any]:
    """What cloud-init's code reads from each seed (by format)."""
    if not SYSTEM_PYTHON.exists() or subprocess.run([str(SYSTEM_PYTHON), "-c", "import cloudinit"],
                                                    capture_output=True).returncode != 0:
        pytest.fail("Debian's cloud-init is not installed (bash .ci/install installs it)")
    argv = []
    for fmt, files in seeds.items():
        for name, data in files.items():
            path = tmp_path / fmt / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        argv += [fmt, str(tmp_path / fmt)]
    done = subprocess.run([str(SYSTEM_PYTHON), str(READER), *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return dict(zip(seeds, json.loads(done.stdout), strict=True))


def state_view(result: dict[str, Any]) -> dict[str, Any]:
    """What the guest gets, as data: `guest_view` without the renderers' texts."""
    view = guest_view(result)
    if view["network"] is not None:
        view["network"] = {key: view["network"][key] for key in ("interfaces", "routes", "dns")}
    return view


def guest_view(result: dict[str, Any]) -> dict[str, Any]:
    """What the guest gets, without what only names the datasource. ConfigDrive's converter marks a static
    subnet `ipv4: true`, which nothing renders; the netplan text is compared as data (its key order differs)."""
    view = {key: value for key, value in result.items() if key != "datasource"}
    network = view["network"]
    if network is not None:
        view["network"] = {**network, "netplan": yaml.safe_load(network["netplan"]), "interfaces": [
            {**iface, "subnets": [{k: v for k, v in subnet.items() if k != "ipv4"} for subnet in iface["subnets"]]}
            for iface in network["interfaces"]]}
    return view


@pytest.mark.parametrize(("meta_data", "networking", "settings", "expected"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_both_formats_give_the_guest_the_identity_and_network_asked_for(
        tmp_path: Path, meta_data: str, networking: Networking, settings: GuestNetwork,
        expected: dict[str, Any]) -> None:
    seeds = {fmt: dict(make_seed(fmt, UUID, "#cloud-config\n", meta_data, networking, settings).files)
             for fmt in SEED_FORMATS}
    read = read_with_cloud_init(tmp_path, seeds)
    assert [read[fmt]["datasource"] for fmt in SEED_FORMATS] == ["DataSourceNoCloud", "DataSourceConfigDrive"]
    for fmt in SEED_FORMATS:
        assert state_view(read[fmt]) == expected, fmt
    assert guest_view(read["nocloud"]) == guest_view(read["configdrive"])  # and the ENI, netplan, networkd texts


def test_what_cloud_init_reads_is_what_was_asked(tmp_path: Path) -> None:
    meta = json.dumps({"instance-id": "i-7", "local-hostname": "web-1.launcher.test", "public_keys": [KEY_A]})
    seeds = {fmt: dict(make_seed(fmt, UUID, "#cloud-config\n", meta, STATIC, FULL).files) for fmt in SEED_FORMATS}
    for fmt, result in read_with_cloud_init(tmp_path, seeds).items():
        assert (result["instance_id"], result["hostname"], result["fqdn"]) == ("i-7", "web-1", "web-1.launcher.test")
        assert result["public_keys"] == [KEY_A]
        network = result["network"]
        [iface] = network["interfaces"]
        assert (iface["name"], iface["mac_address"], iface["mtu"]) == ("eth0", MAC, 1400), fmt
        [subnet] = iface["subnets"]
        assert (subnet["address"], subnet["prefix"]) == ("192.168.122.77", 24)
        assert (subnet["gateway"], subnet["routes"]) == ("192.168.122.1", [])
        assert (subnet["dns_nameservers"], subnet["dns_search"]) == \
            (["192.168.122.1", "9.9.9.9"], ["launcher.test", "example.org"])
        eni = network["eni"]
        # ifupdown's own `gateway` line (iproute2), never a `route add` command (net-tools, absent on minimal Debian)
        assert "iface eth0 inet static" in eni and "    gateway 192.168.122.1\n" in eni and "route add" not in eni, eni
        assert "dns-nameservers 192.168.122.1 9.9.9.9" in eni and "dns-search launcher.test example.org" in eni
        networkd = network["networkd"]["eth0"]
        assert "Gateway=192.168.122.1" in networkd and "MACAddress=52:54:00:12:34:56" in networkd
        assert "Name=eth0" in networkd and "MTUBytes=1400" in networkd


def test_the_default_hostname_is_a_valid_label(tmp_path: Path) -> None:
    """Without a hostname in the meta-data the guest is named after its uuid, cut to a 63-character label."""
    uuid = "a" * 60 + "-bcd"  # 64 characters: one more than a label may have
    seeds = {fmt: dict(make_seed(fmt, uuid, "", "", DHCP).files) for fmt in SEED_FORMATS}
    for result in read_with_cloud_init(tmp_path, seeds).values():
        assert (result["instance_id"], result["hostname"]) == (uuid, "a" * 60 + "-bc")


def test_both_formats_carry_the_tagged_devices(tmp_path: Path) -> None:
    """OpenStack's device role tagging (launcher.plugin.volumes.devices_metadata) reaches cloud-init's metadata in
    both formats, replacing a `devices` key of the payload's meta-data; identity and network are unchanged."""
    devices = [{"type": "disk", "bus": "virtio", "serial": "0a1b-0001", "tags": ["db"]},
               {"type": "disk", "bus": "virtio", "serial": "0a1b-0002", "tags": ["swap"]}]
    meta = json.dumps({"uuid": "u-9", "hostname": "tagged", "devices": "the payload's"})
    seeds = {fmt: dict(make_seed(fmt, UUID, "#cloud-config\n", meta, STATIC, GuestNetwork(), devices).files)
             for fmt in SEED_FORMATS}
    read = read_with_cloud_init(tmp_path, seeds)
    for result in read.values():
        assert state_view(result) == guest("u-9", "tagged", network=eth0(static("192.168.122.77", "192.168.122.1"))) \
            | {"devices": devices}
    assert guest_view(read["nocloud"]) == guest_view(read["configdrive"])
