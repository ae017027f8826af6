"""A VM keeps its network, forwarding through the host included, while a Docker Engine runs on the host.

Docker's dockerd with its defaults may set the iptables FORWARD policy to DROP and add its own FORWARD rules; the
launcher's setup runs it with `DOCKERD_FLAGS` (no iptables, ip_forward or masquerading changes, no bridge) so that
libvirt's NAT for VMs stays as it is. With dockerd answering (`.ci/docker-up`, or started here with those flags),
a tiny test guest (tests/guest/, `test_guest_mode: net-probe <ipv4>`) boots through a real `launcher serve` on
libvirt's `default` network (192.168.122.0/24), gets an address by DHCP and pings 10.99.0.2, the far end of a veth
pair in a network namespace of its own. The probe is not for the host: it is routed from virbr0 to the veth, through
the host's FORWARD chain (libvirt masquerades it on the way out). The guest prints

    guest-net addr=192.168.122.77/24 gw=192.168.122.1 probe=10.99.0.2 reached=yes

A second VM, booted alongside, is the negative control: a DROP rule at the top of FORWARD for its MAC makes it print
`reached=no`, and the rule's counter shows that its probes were dropped there.

Note: libvirt's own FORWARD rules (LIBVIRT_FWO/FWI) accept its NAT network's traffic before the chain's policy
applies (checked: a DROP rule appended at the end of FORWARD, where the policy acts, does not stop the probe), so the
probe alone would not see a DROP policy; what that policy cuts off is forwarding no libvirt rule accepts (e.g. VMs on
a plain bridge). The policy is asserted directly (`iptables -S FORWARD`).

The namespace is `launcher-fwd-<pytest pid>` with the veth pair `lfwd<pid>h`/`lfwd<pid>n`; those of a killed run are
removed by the next one. 10.99.0.0/24 must not be routed on the host otherwise (two runs of this test at once: the
second fails, saying so).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import ROOT, LauncherProcess
from test_qemu import console, new_uuid, payload_for, start, wait_for, wait_guest_ready

DOCKER_SOCKET = Path("/run/docker.sock")
DOCKERD_FLAGS = ("--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none", "--live-restore")
DOCKERD_LOG = Path("/var/log/dockerd.log")  # when this test starts dockerd itself (as .ci/docker-up logs)
DOCKERD_TIMEOUT_S = 60.0

NETWORK = ipaddress.IPv4Network("192.168.122.0/24")  # libvirt's `default` network
GATEWAY = "192.168.122.1"
HOST_END, FAR_END = "10.99.0.1", "10.99.0.2"  # the veth pair: the host's end, the namespace's end
PROBE_NET = "10.99.0.0/24"
# The guest's `guest-net` line (tests/guest/init), whole.
GUEST_NET_LINE = re.compile(r"guest-net addr=(?P<addr>\S+) gw=(?P<gw>\S+) probe=(?P<probe>\S+) "
                            r"reached=(?P<reached>yes|no)\s*$")
PROBE_TIMEOUT_S = 240.0  # two tiny guests booting at once under TCG, then DHCP and up to 10 s of pings


# ----------------------------------------------------------------------------------------------------- host state

def sh(*argv: str, check: bool = True, timeout: float = 30) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc.stdout


def forward_rules() -> list[str]:
    """`iptables -S FORWARD`, one rule a line (the first is `-P FORWARD <policy>`)."""
    return sh("iptables", "-w", "10", "-S", "FORWARD").splitlines()


def forward_policy() -> str:
    (policy,) = [line.split()[2] for line in forward_rules() if line.startswith("-P FORWARD ")]
    return policy


def docker_ping() -> bool:
    """Whether the Docker Engine answers `GET /_ping` on its socket with 200 OK."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(DOCKER_SOCKET))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
    except OSError:
        return False
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.") and head.split()[1] == b"200" and body.strip() == b"OK"


def dockerd_cmdlines() -> list[str]:
    return sh("pgrep", "-a", "-x", "dockerd", check=False).splitlines()


@pytest.fixture(scope="module")
def dockerd() -> dict[str, Any]:
    """A Docker Engine answering on /run/docker.sock, left running afterwards (other tests use it): `.ci/docker-up`
    if the repository has it, else dockerd started here with `DOCKERD_FLAGS` unless one answers already (or is
    starting: then it is waited for). Returns the FORWARD policy before and after, and how it came up."""
    before = forward_policy()
    docker_up = ROOT / ".ci" / "docker-up"
    if docker_up.exists():
        how = ".ci/docker-up"
        sh(str(docker_up), timeout=DOCKERD_TIMEOUT_S + 30)
    elif docker_ping():
        how = "already running"
    else:
        if dockerd_cmdlines():  # one is starting (or restarting): no second one
            how = "already starting"
        else:
            how = "started by the test"
            with DOCKERD_LOG.open("ab") as log:
                subprocess.Popen(["dockerd", "--pidfile", "/run/docker.pid", "-H", f"unix://{DOCKER_SOCKET}",
                                  *DOCKERD_FLAGS], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        wait_for(f"dockerd ({how}) to answer on {DOCKER_SOCKET} (log: {DOCKERD_LOG})", docker_ping,
                 timeout=DOCKERD_TIMEOUT_S, every=0.2)
    assert docker_ping(), f"dockerd ({how}) does not answer GET /_ping on {DOCKER_SOCKET}"
    return {"how": how, "policy_before": before, "policy_after": forward_policy(), "cmdlines": dockerd_cmdlines()}


@contextlib.contextmanager
def far_end() -> Iterator[str]:
    """A network namespace holding FAR_END/24 on one end of a veth pair whose host end is HOST_END/24 (its
    default route back via HOST_END); both removed afterwards. Yields the namespace's name."""
    for stale in sh("ip", "netns", "list").split():
        pid = stale.removeprefix("launcher-fwd-")
        if stale.startswith("launcher-fwd-") and pid.isdigit() and not psutil.pid_exists(int(pid)):
            sh("ip", "link", "del", f"lfwd{pid}h", check=False)
            sh("ip", "netns", "del", stale, check=False)
    tag = str(os.getpid())  # at most 7 digits: interface names have 15 characters at most
    netns, host_if, ns_if = f"launcher-fwd-{tag}", f"lfwd{tag}h", f"lfwd{tag}n"
    routed = [line for line in sh("ip", "-4", "route", "show", PROBE_NET).splitlines() if line.strip()]
    assert not routed, f"{PROBE_NET} is already routed on this host ({routed}): the probe would be ambiguous"
    try:
        sh("ip", "netns", "add", netns)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", netns)
        sh("ip", "addr", "add", f"{HOST_END}/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        for argv in (("ip", "link", "set", "lo", "up"), ("ip", "addr", "add", f"{FAR_END}/24", "dev", ns_if),
                     ("ip", "link", "set", ns_if, "up"), ("ip", "route", "add", "default", "via", HOST_END)):
            sh("ip", "netns", "exec", netns, *argv)
        yield netns
    finally:
        sh("ip", "link", "del", host_if, check=False)  # the pair goes with either end
        sh("ip", "netns", "del", netns, check=False)


@contextlib.contextmanager
def forward_drop(mac: str) -> Iterator[list[str]]:
    """A DROP rule at the top of FORWARD for what the VM of `mac` sends to PROBE_NET; removed afterwards. Yields the
    rule's spec."""
    rule = ["FORWARD", "-m", "mac", "--mac-source", mac, "-d", PROBE_NET, "-j", "DROP"]
    sh("iptables", "-w", "10", "-I", rule[0], "1", *rule[1:])
    try:
        yield rule
    finally:
        sh("iptables", "-w", "10", "-D", *rule, check=False)


def rule_packets(rule: list[str]) -> int:
    """The packet counter of `rule` (as `iptables -S -v` prints it: `... -c <packets> <bytes>`)."""
    words = [" ".join(rule[i:i + 2]).lower() for i in range(1, len(rule), 2)]  # iptables may reorder them
    lines = sh("iptables", "-w", "10", "-v", "-S", rule[0]).splitlines()
    for line in lines:
        counters = re.search(r" -c (\d+) \d+( |$)", line)
        if counters and all(word in line.lower() for word in words):
            return int(counters.group(1))
    raise AssertionError(f"rule {rule} not found in {lines}")


# ----------------------------------------------------------------------------------------------------- the guests

def probe_payload(uuid: str, target: str) -> tuple[bytes, str]:
    """start_legacy.yaml for `uuid` with one vCPU, 256 MiB and `test_guest_mode: net-probe <target>` at the top of
    its cloud-config; and its NIC's MAC."""
    text = payload_for("start_legacy.yaml", uuid).decode()
    text = text.replace("       value: 2\n", "       value: 1\n").replace("value: 370", "value: 256")
    text = text.replace("#cloud-config\n", f"#cloud-config\ntest_guest_mode: net-probe {target}\n")
    mac = re.search(r"vnic_mac: (\S+)", text)
    assert mac is not None and "test_guest_mode: net-probe" in text
    return text.encode(), mac.group(1)


def guest_net(launcher: LauncherProcess, uuid: str) -> dict[str, str]:
    """The guest's `guest-net ...` line as a dict, once it is on the console."""
    def line() -> dict[str, str] | None:
        # The first whole line: a kernel message on the serial console may cut one in two (the guest prints it thrice).
        whole = [GUEST_NET_LINE.search(text) for text in console(launcher, uuid).splitlines()]
        return next((match.groupdict() for match in whole if match is not None), None)

    found: dict[str, str] = wait_for(f"the guest-net line on {uuid}'s console", line, timeout=PROBE_TIMEOUT_S,
                                     every=0.5)
    return found


def test_a_vm_forwards_through_the_host_while_dockerd_runs(dockerd: dict[str, Any], qemu_factory: Any) -> None:
    """dockerd answers and has left the FORWARD policy alone; a VM on libvirt's NAT network gets an address and
    reaches a host beyond the FORWARD chain; a VM whose probes a FORWARD rule drops does not (the control)."""
    assert dockerd["policy_after"] != "DROP" or dockerd["policy_before"] == "DROP", \
        f"starting dockerd set the FORWARD policy to DROP: {dockerd}"
    rules = forward_rules()
    assert rules[0] == "-P FORWARD ACCEPT", f"FORWARD policy is not ACCEPT with dockerd running: {rules} {dockerd}"
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1", \
        "net.ipv4.ip_forward is 0: is libvirt's default network active (.ci/libvirt-up)?"

    with far_end():
        launcher = qemu_factory()
        client = launcher.client()
        free_uuid, blocked_uuid = new_uuid(), new_uuid()
        free_payload, _ = probe_payload(free_uuid, FAR_END)
        blocked_payload, blocked_mac = probe_payload(blocked_uuid, FAR_END)
        with forward_drop(blocked_mac) as rule:
            assert start(client, free_payload)["state"] in ("pending", "running")
            assert start(client, blocked_payload)["state"] in ("pending", "running")
            free, blocked = guest_net(launcher, free_uuid), guest_net(launcher, blocked_uuid)
            dropped = rule_packets(rule)

        for name, found in (("free", free), ("blocked", blocked)):
            assert found["addr"] != "none" and ipaddress.IPv4Interface(found["addr"]).network == NETWORK, \
                f"the {name} VM got no address in {NETWORK} by DHCP: {found}"
            assert found["gw"] == GATEWAY and found["probe"] == FAR_END, found
        assert free["reached"] == "yes", f"the VM did not reach {FAR_END} through the host: {free}"
        assert blocked["reached"] == "no", f"the control VM reached {FAR_END} past a FORWARD DROP rule: {blocked}"
        assert dropped > 0, "the control VM's probes did not cross the FORWARD chain"
        # The guest-ready line is still there and unchanged in shape (the probe runs after it).
        assert wait_guest_ready(launcher, free_uuid)["datasource"] in ("nocloud", "configdrive")

    # Still there (waited for: another test, e.g. of live-restore, may be restarting it right now).
    wait_for("dockerd to answer after the test", docker_ping, timeout=DOCKERD_TIMEOUT_S, every=0.2)
    assert forward_rules()[0] == "-P FORWARD ACCEPT"
