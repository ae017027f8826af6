"""End to end with real cloud-init: the Debian 12 guest of tests/guest/debian.py boots from the launcher's seed, in
both seed formats, and reports on its serial console what cloud-init made of it:

    guest-net nic=eth0/02:… addrs=192.168.122.77/24 routes=default_via_192.168.122.1_dev_eth0;… dns=192.168.122.1
      search=launcher.test mtu=1400 hostname=net-test fqdn=… instance-id=… datasource=nocloud keys=<sha256> …

(the format is in tests/guest/debian.py). Each test starts one VM per seed format at once, each on its own
launcher, on libvirt's `default` network (192.168.122.0/24, gateway and DNS 192.168.122.1). A full Debian boots
in about two minutes under TCG."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import random
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest
import yaml
from conftest import DEBIAN_IMAGE_ID, LauncherProcess
from test_qemu import console, domain_of, new_uuid, start

SEED_FORMATS = ("nocloud", "configdrive")
NETWORK = ipaddress.IPv4Network("192.168.122.0/24")  # libvirt's `default` network
GATEWAY = "192.168.122.1"  # its dnsmasq: router and DNS server
NET_TIMEOUT_S = 480.0  # two Debian guests booting at once under TCG on a busy 2-core machine
GUEST_NETWORK = {"gateway": "first_host", "dns_servers": [GATEWAY], "dns_search": ["launcher.test"], "mtu": 1400}


def fresh_mac() -> str:
    """A random locally administered unicast MAC."""
    return "02:" + ":".join(f"{random.randrange(256):02x}" for _ in range(5))


def free_address() -> str:
    """A random address of 192.168.122.50-250 that libvirt's DHCP server has not leased."""
    connection = libvirt.open("qemu:///system")
    try:
        leased = {lease["ipaddr"] for lease in connection.networkLookupByName("default").DHCPLeases()}
    finally:
        connection.close()
    return random.choice([a for a in (f"192.168.122.{n}" for n in range(50, 251)) if a not in leased])


def ssh_key(tmp_path: Path) -> str:
    """A real public key line, "ssh-ed25519 AAAA… test@launcher"."""
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test@launcher", "-f", str(key)],
                   check=True, capture_output=True, timeout=30)
    return key.with_suffix(".pub").read_text().strip()


def keys_digest(*keys: str) -> str:
    """The guest's `keys=` value for these authorized keys."""
    return hashlib.sha256("".join(f"{k.strip()}\n" for k in sorted(keys)).encode()).hexdigest()


def payload(uuid: str, mac: str, meta_data: dict[str, Any], private_ip: str | None = None) -> bytes:
    """A ciao START (YAML framing: start, user-data, meta-data) of the Debian guest on the default network."""
    networking = {"vnic_mac": mac, "vnic_uuid": new_uuid()}
    if private_ip is not None:
        networking.update(private_ip=private_ip, subnet=str(NETWORK))
    start_doc = {"start": {
        "requested_resources": [{"type": "vcpus", "value": 1}, {"type": "mem_mb", "value": 768}],
        "instance_uuid": uuid, "tenant_uuid": new_uuid(), "image_uuid": DEBIAN_IMAGE_ID, "fw_type": "legacy",
        "networking": networking,
    }}
    return (f"---\n{yaml.safe_dump(start_doc, sort_keys=False)}...\n---\n#cloud-config\n{{}}\n...\n"
            f"---\n{json.dumps(meta_data, indent=2)}\n...\n").encode()


def guest_net(launcher: LauncherProcess, uuid: str) -> dict[str, str] | None:
    """The last guest-net line of the console so far, as a dict."""
    lines = [line.split("guest-net ", 1)[1] for line in console(launcher, uuid).splitlines() if "guest-net " in line]
    return dict(re.findall(r"(\S+?)=(\S*)", lines[-1])) if lines else None


def wait_guest_net(vms: dict[str, tuple[LauncherProcess, str]]) -> dict[str, dict[str, str]]:
    """Each VM's guest-net line ({name: (launcher, uuid)}), waiting for all of them up to NET_TIMEOUT_S."""
    began = time.monotonic()
    deadline = began + NET_TIMEOUT_S
    found: dict[str, dict[str, str]] = {}
    while len(found) < len(vms):
        for name, (launcher, uuid) in vms.items():
            line = guest_net(launcher, uuid) if name not in found else None
            if line is not None:
                found[name] = line
                print(f"{name}: the guest-net line came {time.monotonic() - began:.0f} s after the STARTs")
        if len(found) < len(vms):
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {name} ({uuid}):\n" + "\n".join(console(launcher, uuid).splitlines()[-40:])
                                  for name, (launcher, uuid) in vms.items() if name not in found)
                raise AssertionError(f"no guest-net line after {NET_TIMEOUT_S:g} s from {sorted(set(vms) - set(found))}"
                                     f"; console tails:\n{tails}")
            time.sleep(2)
    for name, line in found.items():
        print(f"{name}: guest-net " + " ".join(f"{k}={v}" for k, v in line.items()))  # shown if the test fails
    return found


def start_both(qemu_factory: Any, debian_image_dir: Path, qemu: dict[str, Any], make_payload: Any
               ) -> dict[str, tuple[LauncherProcess, str]]:
    """One launcher per seed format with `qemu` settings, each STARTing `make_payload(format, uuid)`."""
    vms = {}
    for fmt in SEED_FORMATS:
        launcher = qemu_factory({"seed_format": fmt, "image_dirs": [str(debian_image_dir)], **qemu}, name=fmt)
        uuid = new_uuid()
        answer = start(launcher.client(), make_payload(fmt, uuid), wait=1, timeout=300)
        assert answer["state"] == "running", (fmt, answer)
        vms[fmt] = (launcher, uuid)
    return vms


def keep_consoles(vms: dict[str, tuple[LauncherProcess, str]], directory: Path) -> None:
    """Copy each VM's console log to `directory` (pytest's tmp_path outlives the qemu test root)."""
    for name, (launcher, uuid) in vms.items():
        (directory / f"console-{name}.log").write_text(console(launcher, uuid))


def delete_all(vms: dict[str, tuple[LauncherProcess, str]]) -> None:
    for launcher, uuid in vms.values():
        deleted = launcher.client().request("DELETE", f"/v1/instances/{uuid}", wait=1, timeout=120)
        assert deleted["state"] == "deleted"
        assert domain_of(uuid) is None


@pytest.mark.timeout(1200)
def test_static_address_gateway_dns_keys_in_both_formats(qemu_factory: Any, debian_image_dir: Path,
                                                           tmp_path: Path) -> None:
    """A static address with the node's guest_network settings: real cloud-init in both formats sets up the same
    NIC name, address, default route, DNS, search domain, MTU, hostname, instance-id and SSH keys."""
    key = ssh_key(tmp_path)
    macs = {fmt: fresh_mac() for fmt in SEED_FORMATS}
    addresses = {fmt: free_address() for fmt in SEED_FORMATS}
    while addresses["configdrive"] == addresses["nocloud"]:
        addresses["configdrive"] = free_address()
    meta = {"uuid": "net-test-id", "hostname": "net-test", "public-keys": [key]}
    vms = start_both(qemu_factory, debian_image_dir, {"guest_network": GUEST_NETWORK},
                     lambda fmt, uuid: payload(uuid, macs[fmt], meta, addresses[fmt]))
    try:
        lines = wait_guest_net(vms)
    finally:
        keep_consoles(vms, tmp_path)

    for fmt, line in lines.items():
        expected = {
            "nic": f"eth0/{macs[fmt]}", "addrs": f"{addresses[fmt]}/24", "mtu": "1400", "hostname": "net-test",
            "instance-id": "net-test-id", "keys": keys_digest(key), "datasource": fmt, "cloud-init": "done",
        }
        assert {k: line.get(k) for k in expected} == expected, (fmt, line)
        routes = line["routes"].split(";")
        # cloud-init's ENI renderer writes a subnet's routes as `post-up route add …`, which needs net-tools (not
        # on a minimal Debian), and a subnet's gateway as ifupdown's `gateway` line: the eni field shows which.
        assert any(r.startswith(f"default_via_{GATEWAY}_dev_eth0") for r in routes), \
            f"{fmt}: no default route via {GATEWAY}: routes={line['routes']} eni={line.get('eni')}"
        assert GATEWAY in line["dns"].split(","), (fmt, line)
        assert "launcher.test" in line["search"].split(","), (fmt, line)
    # Apart from what differs by construction, the two formats make the same guest.
    same = {fmt: {k: v for k, v in line.items() if k not in ("datasource", "nic", "addrs")}
            for fmt, line in lines.items()}
    same = {fmt: {key: value.replace(addresses[fmt], "<ip>") for key, value in rest.items()}
            for fmt, rest in same.items()}
    assert same["nocloud"] == same["configdrive"]
    delete_all(vms)


@pytest.mark.timeout(1200)
def test_dhcp_in_both_formats(qemu_factory: Any, debian_image_dir: Path, tmp_path: Path) -> None:
    """No address in the payload: the guest asks libvirt's DHCP server, which gives it an address of the
    default network, the default route and DNS through 192.168.122.1; identity from the meta-data."""
    key = ssh_key(tmp_path)
    macs = {fmt: fresh_mac() for fmt in SEED_FORMATS}
    meta = {"uuid": "dhcp-test-id", "hostname": "dhcp-test", "public-keys": [key], "public_keys": [key]}
    vms = start_both(qemu_factory, debian_image_dir, {}, lambda fmt, uuid: payload(uuid, macs[fmt], meta))
    try:
        lines = wait_guest_net(vms)
    finally:
        keep_consoles(vms, tmp_path)

    for fmt, line in lines.items():
        nic, mac = line["nic"].split("/")
        assert mac == macs[fmt], (fmt, line)
        (address,) = line["addrs"].split(",")
        assert ipaddress.IPv4Interface(address).network == NETWORK, (fmt, line)
        assert any(r.startswith(f"default_via_{GATEWAY}_dev_{nic}") for r in line["routes"].split(";")), (fmt, line)
        assert GATEWAY in line["dns"].split(","), (fmt, line)
        expected = {"hostname": "dhcp-test", "instance-id": "dhcp-test-id", "datasource": fmt,
                    "keys": keys_digest(key), "user": "debian", "cloud-init": "done"}
        assert {k: line.get(k) for k in expected} == expected, (fmt, line)
    # STOP presses the ACPI power button: systemd-logind powers the guest off, nothing is destroyed.
    for fmt, (launcher, uuid) in vms.items():
        client = launcher.client()
        assert client.request("POST", f"/v1/instances/{uuid}/stop", wait=1, timeout=120)["state"] == "exited"
        log = b"".join(client.stream(f"/v1/instances/{uuid}/log", read_timeout=10)).decode()
        assert "guest powered off" in log and "destroyed" not in log, (fmt, log)
    delete_all(vms)
