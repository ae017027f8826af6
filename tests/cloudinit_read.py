"""Read a seed with cloud-init's own code (Debian's `cloud-init` package), as a guest would.

Run with the system Python that has cloud-init (``/usr/bin/python3 tests/cloudinit_read.py FORMAT SEED_DIR
[FORMAT SEED_DIR ...]``; the test suite's virtualenv does not have it). Each SEED_DIR holds a seed's files
(``meta-data``, ``user-data``, ``network-config`` for nocloud; ``openstack/latest/...`` for configdrive), as the
ISO carries them. Prints a JSON list with one object per seed: what cloud-init's datasource for FORMAT says
(instance-id, hostname, FQDN, SSH keys, user-data, the meta-data's `devices`) and the network configuration, as
cloud-init's `network_state` and as its ENI, netplan and networkd renderers write it (null without one).
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

from cloudinit import distros, helpers, settings
from cloudinit.net import eni, netplan, network_state, networkd
from cloudinit.sources import DataSourceConfigDrive, DataSourceNoCloud

SEED_DIRS = {"nocloud": "nocloud", "configdrive": "config_drive"}
DATASOURCES = {"nocloud": DataSourceNoCloud.DataSourceNoCloud,
               "configdrive": DataSourceConfigDrive.DataSourceConfigDrive}


def read(fmt, seed, root):
    paths = helpers.Paths({"cloud_dir": str(root / "cloud"), "run_dir": str(root / "run")})
    shutil.copytree(seed, Path(paths.seed_dir) / SEED_DIRS[fmt])
    sys_cfg = settings.CFG_BUILTIN
    distro = distros.fetch("debian")("debian", {}, paths)
    source = DATASOURCES[fmt](sys_cfg, distro, paths)
    if not source.get_data():
        raise SystemExit(f"cloud-init's {fmt} datasource found no seed in {seed}")
    hostname = source.get_hostname(metadata_only=True)
    fqdn = source.get_hostname(fqdn=True, metadata_only=True)
    result = {
        "datasource": type(source).__name__,
        "instance_id": source.get_instance_id(),
        "hostname": hostname.hostname,
        "fqdn": fqdn.hostname,
        "public_keys": source.get_public_ssh_keys(),
        "user_data": source.get_userdata_raw().decode() if source.get_userdata_raw() else "",
        "network": None,
        "devices": source.metadata.get("devices"),  # OpenStack's device role tagging, as the guest reads it
    }
    config = source.network_config
    if config:
        state = network_state.parse_net_config_data(config)
        result["network"] = {
            "interfaces": _interfaces(state),
            "routes": [dict(r) for r in state.iter_routes()],
            "dns": {"nameservers": state.dns_nameservers, "search": state.dns_searchdomains},
            "eni": eni.Renderer({})._render_interfaces(state),
            "netplan": netplan.Renderer({})._render_content(state),
            "networkd": networkd.Renderer({})._render_content(state),
        }
    return result


def _interfaces(state):
    return [{key: iface.get(key) for key in ("name", "mac_address", "mtu", "subnets")}
            for iface in state.iter_interfaces()]


def main():
    results = []
    for fmt, seed in zip(sys.argv[1::2], sys.argv[2::2], strict=True):
        with tempfile.TemporaryDirectory() as root:
            results.append(read(fmt, Path(seed), Path(root)))
    print(json.dumps(results, indent=1, sort_keys=True, default=str))


if __name__ == "__main__":
    main()
