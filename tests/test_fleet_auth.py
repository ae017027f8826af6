"""A fleet on an authorizing nats-server (docs/fleet.md, "Security"): each launcher logs in as its own user with exactly
`node_permissions` (what `launcher fleet permissions` prints), and works: it joins, answers commands and publishes
its events. With a node's credentials, nobody can command another node, write its key or read its events; a wrong
password is refused at connect. The same with a creds file on a server in operator mode (JWTs). Real nats-server and
`launcher serve` processes, each launcher in a network namespace of its own."""

from __future__ import annotations

import json
import uuid as uuid_module
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from fleet_support import FleetNetwork, NatsServer, command, controller, node_key
from nats.aio.client import Client as NatsClient
from nats_jwt import Trust
from test_fleet import CLUSTER, node_launcher, start_json, stream_matches_journal
from test_qemu import wait_for

from launcher.cli.fleet_client import FleetClient
from launcher.transport.fleet.permissions import node_permissions
from launcher.transport.fleet.subjects import Subjects

NODES = ("na", "nb")


def as_user(server: NatsServer, user: str, password: str) -> str:
    return server.url.replace("nats://", f"nats://{user}:{password}@")


@pytest.fixture
def server(tmp_path: Path, fleet_net: FleetNetwork) -> Any:
    users: list[dict[str, Any]] = [{"user": "controller", "password": "pw-controller"}]  # no permissions: all
    users += [{"user": node, "password": f"pw-{node}", "permissions": node_permissions(Subjects(CLUSTER, node))}
              for node in NODES]
    started = NatsServer(tmp_path / "nats", config={"authorization": {"users": users}}, host=fleet_net.address)
    started.start()
    yield started
    started.kill()


def test_each_node_works_with_its_own_permissions_and_cannot_touch_another(fleet_net: FleetNetwork, server: NatsServer,
                                                                          launcher_factory: Any) -> None:
    admin = as_user(server, "controller", "pw-controller")
    controller(admin, lambda nc: FleetClient(nc, CLUSTER).prepare())  # launchers may not make the stream
    launchers = {node: node_launcher(fleet_net, launcher_factory, {"fleet": {
        "servers": [server.url], "cluster": CLUSTER, "node": node, "user": node, "password": f"pw-{node}",
        "refresh_s": 0.5, "liveness_ttl_s": 2}}, name=node) for node in NODES}
    for node, launcher in launchers.items():
        wait_for(f"{node}'s key", lambda n=node: node_key(admin, CLUSTER, n))
        uuid = str(uuid_module.uuid4())
        answer = command(admin, CLUSTER, node, start_json(uuid), headers={"Launcher-Wait": "30"})
        assert answer["state"] == "running" and answer["status"] == 200
        wait_for(f"{node}'s events in the stream",
                   lambda n=node, launcher=launcher: stream_matches_journal(admin, launcher.client(), n))

    # With node na's credentials: no command to nb, no write of nb's key, no read of nb's last event.
    violations: list[str] = []

    async def noted(exc: Exception) -> None:
        violations.append(str(exc))

    async def trespass(nc: NatsClient) -> None:
        nb = Subjects(CLUSTER, "nb")
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request(nb.cmd, start_json(str(uuid_module.uuid4())), timeout=1)
        await nc.publish(nb.node_key, json.dumps({"status": "MAINTENANCE"}).encode())
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request(f"$JS.API.DIRECT.GET.{nb.stream}.{nb.events}", b"", timeout=1)
        await nc.flush()

    controller(server.url, trespass, user="na", password="pw-na", inbox_prefix="_INBOX_na", error_cb=noted)
    denied = [v for v in violations if "permissions violation" in v.lower()]
    assert any("launcher.t1.node.nb.cmd" in v for v in denied), violations
    assert any("$kv.launcher-t1-nodes.nb" in v.lower() for v in denied), violations
    assert any("direct.get" in v.lower() for v in denied), violations
    assert len(launchers["nb"].client().request("GET", "/v1/instances")["instances"]) == 1  # only the controller's
    assert node_key(admin, CLUSTER, "nb")["status"] == "READY"

    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        controller(server.url, lambda nc: nc.flush(), user="na", password="wrong")



def test_a_launcher_logs_in_with_a_creds_file_and_gets_only_its_permissions(tmp_path: Path, fleet_net: FleetNetwork,
                                                                           launcher_factory: Any) -> None:
    """A server in operator mode (JWTs, `nats_jwt.Trust`): the launcher logs in with a creds file whose user has
    exactly `node_permissions`, joins and works; with that creds file, another node's commands are refused."""
    trust = Trust()
    admin = {"user_credentials": str(trust.user_creds(tmp_path / "admin.creds", "admin"))}
    creds = trust.user_creds(tmp_path / "na.creds", "na", node_permissions(Subjects(CLUSTER, "na")))
    server = NatsServer(tmp_path / "nats", config=trust.server_config(), host=fleet_net.address)
    server.start()
    try:
        controller(server.url, lambda nc: FleetClient(nc, CLUSTER).prepare(), **admin)
        launcher = node_launcher(fleet_net, launcher_factory, {"fleet": {
            "servers": [server.url], "cluster": CLUSTER, "node": "na", "creds_file": str(creds), "refresh_s": 0.5,
            "liveness_ttl_s": 2}}, name="na")
        wait_for("na's key", lambda: node_key(server.url, CLUSTER, "na", **admin))
        answer = command(server.url, CLUSTER, "na", start_json(str(uuid_module.uuid4())),
                         headers={"Launcher-Wait": "30"}, **admin)
        assert answer["state"] == "running" and answer["status"] == 200
        wait_for("na's events in the stream",
                 lambda: stream_matches_journal(server.url, launcher.client(), "na", **admin))

        violations: list[str] = []

        async def noted(exc: Exception) -> None:
            violations.append(str(exc))

        async def trespass(nc: NatsClient) -> None:
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request(Subjects(CLUSTER, "nb").cmd, start_json(str(uuid_module.uuid4())), timeout=1)
            await nc.flush()

        controller(server.url, trespass, user_credentials=str(creds), inbox_prefix="_INBOX_na", error_cb=noted)
        assert any("permissions violation" in v.lower() and "launcher.t1.node.nb.cmd" in v for v in violations), \
            violations
    finally:
        server.kill()
