"""What a START's ``networking`` means for the guest's address, whatever runs it (part of the plugin API,
`launcher.plugin`): the VMs' seed (qemu's cloud-init network config) and the containers' engine network take the
same MAC and address from it.

- `mac`: ``vnic_mac`` must be six hex octets joined by ``:``; it is used lower-case ("" when none is given).
- `static_address`: the address is static when both ``private_ip`` and ``subnet`` are given: ``private_ip``
  must be a host address of the IPv4 CIDR ``subnet`` (host bits may be set in it), and its prefix length is the
  subnet's. Otherwise there is none (a VM asks DHCP, a container gets one from its engine network).
- `default_gateway`: the default route of a static address, from a node setting (`GATEWAYS`, or an IPv4
  address): none, the subnet's first host (as ciao's networks used), or the given address, which must be in the
  subnet; never the instance's own address.

Every problem raises `NetworkError`, whose message names the field (``networking.private_ip ...``); the caller
reports it with its phase's code. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re

from launcher.plugin.spec import Networking

GATEWAYS = ("first_host", "none")  # or an IPv4 address
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")


class NetworkError(ValueError):
    """The START's networking cannot be used as given; the message names the field at fault."""


def mac(networking: Networking) -> str:
    """The lower-case MAC of `networking`, "" when it names none; NetworkError if it is not a MAC."""
    if not networking.vnic_mac:
        return ""
    if _MAC_RE.fullmatch(networking.vnic_mac) is None:
        raise NetworkError(
            f"networking.vnic_mac {networking.vnic_mac!r:.60} is not a MAC address (xx:xx:xx:xx:xx:xx)"
        )
    return networking.vnic_mac.lower()


def static_address(networking: Networking) -> ipaddress.IPv4Interface | None:
    """The static address of `networking`, None without one (no private_ip or no subnet)."""
    if not (networking.private_ip and networking.subnet):
        return None
    network = subnet(networking.subnet)
    try:
        ip = ipaddress.IPv4Address(networking.private_ip)
    except ValueError:
        raise NetworkError(f"networking.private_ip {networking.private_ip!r:.60} is not an IPv4 address") from None
    if ip not in network:
        raise NetworkError(f"networking.private_ip {ip} is not in subnet {network}")
    if network.prefixlen < 31 and ip in (network.network_address, network.broadcast_address):
        raise NetworkError(f"networking.private_ip {ip} is not a host address of subnet {network}")
    return ipaddress.IPv4Interface((ip, network.prefixlen))


def default_gateway(interface: ipaddress.IPv4Interface, setting: str, setting_key: str) -> ipaddress.IPv4Address | None:
    """The default gateway of the static address `interface` per `setting` (one of `GATEWAYS` or an IPv4
    address, the node setting `setting_key`, which an error names): None for "none", for "first_host" on a /31 or
    /32, or when the gateway would be the instance's own address."""
    network = interface.network
    if setting == "none" or (setting == "first_host" and network.prefixlen >= 31):
        return None
    gateway = network.network_address + 1 if setting == "first_host" else ipaddress.IPv4Address(setting)
    if gateway not in network:
        raise NetworkError(f"the gateway {gateway} ({setting_key}) is not in networking.subnet {network}")
    return None if gateway == interface.ip else gateway


def subnet(cidr: str) -> ipaddress.IPv4Network:
    """The IPv4 network of `cidr` ("a.b.c.d/n"; host bits may be set); NetworkError otherwise."""
    try:
        if "/" not in cidr:
            raise ValueError(cidr)
        return ipaddress.IPv4Network(cidr, strict=False)
    except ValueError:
        raise NetworkError(f"networking.subnet {cidr!r:.60} is not an IPv4 CIDR (a.b.c.d/n)") from None
