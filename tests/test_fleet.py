"""A launcher in a fleet on NATS JetStream (issue 20; launcher/transport/fleet/, docs/fleet.md), with real
nats-server processes and real `launcher serve` processes (simulation): it joins (its key in the nodes bucket),
answers commands on its cmd subject exactly as its HTTP API does, publishes every journal event to the stream once
and in order, leaves (its key purged) on SIGTERM; a kill -9 lets its key expire, and neither that nor a NATS
restart loses or duplicates an event; a launcher cut off from NATS keeps its instances and catches up; a launcher
started before NATS joins once NATS is there. Each launcher runs in a network namespace of its own
(`fleet_support.FleetNetwork`), its API on that namespace's address, NATS on the bridge's."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid as uuid_module
from pathlib import Path
from typing import Any

import nats.js.errors
import pytest
from conftest import ROOT
from fleet_support import FleetNetwork, NatsServer, command, controller, free_port, node_key, stream_events
from nats.aio.client import Client as NatsClient
from nats.js.api import StreamConfig
from test_qemu import wait_for

from launcher.cli.client import Client, ClientError
from launcher.cli.fleet_client import FleetClient, NoBid, Placement

CLUSTER = "t1"


def fleet(server: NatsServer, node: str = "n1", **settings: Any) -> dict[str, Any]:
    return {"fleet": {"servers": [server.url], "cluster": CLUSTER, "node": node, "refresh_s": 0.5,
                      "liveness_ttl_s": 2, **settings}}


def start_json(uuid: str) -> bytes:
    return json.dumps({"start": {"instance_uuid": uuid, "image_uuid": "img",
                                 "requirements": {"vcpus": 1, "mem_mb": 64}}}).encode()


def journal(client: Client) -> list[dict[str, Any]]:
    lines = b"".join(client.stream("/v1/events", read_timeout=10)).splitlines()
    return [json.loads(line) for line in lines if line]


def http_answer(client: Client, body: bytes) -> dict[str, Any]:
    """POST /v1/commands' answer to `body`, with its HTTP status as "status"."""
    try:
        answer: dict[str, Any] = client.request("POST", "/v1/commands", body, "application/json")
    except ClientError as exc:
        return {"error": exc.code, "reason": exc.reason, "instance_uuid": exc.instance_uuid, "status": exc.status}
    return {**answer, "status": 200}


def stream_matches_journal(url: str, client: Client, node: str = "n1", **options: Any) -> bool:
    """Whether the stream (NATS at `url`; `options` as for `controller`) holds exactly the node's journal events:
    each once, in order, ids `<node>:<seq>`."""
    try:
        stored = stream_events(url, f"launcher-{CLUSTER}-events", f"launcher.{CLUSTER}.node.{node}.events",
                               **options)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return False  # the stream has no leader yet (a cluster that lost a server elects one)
    events = journal(client)
    return [mid for mid, _ in stored] == [f"{node}:{e['seq']}" for e in events] and [e for _, e in stored] == events


@pytest.fixture
def server(tmp_path: Path, fleet_net: FleetNetwork) -> Any:
    started = NatsServer(tmp_path / "nats", host=fleet_net.address)
    started.start()
    yield started
    started.kill()


def node_launcher(fleet_net: FleetNetwork, launcher_factory: Any, settings: dict[str, Any],
                  name: str = "data") -> Any:
    """A launcher (`launcher_factory`) in a new namespace of `fleet_net`, its API on the namespace's address."""
    namespace, address = fleet_net.namespace()
    return launcher_factory({"listen": f"{address}:0", **settings}, name=name, netns=namespace)


def test_a_launcher_joins_answers_commands_as_its_http_api_publishes_its_events_and_leaves(
        fleet_net: FleetNetwork, server: NatsServer, launcher_factory: Any) -> None:
    launcher = node_launcher(fleet_net, launcher_factory, fleet(server, labels={"zone": "a"}))
    client = launcher.client()
    key = wait_for("the node's key", lambda: node_key(server.url, CLUSTER, "n1"))
    assert key["status"] == "READY" and key["labels"] == {"zone": "a"} and key["virtualizers"] == ["simulation"]
    assert key["url"] == (launcher.data_dir / "api-url").read_text().strip()
    assert key["url"].startswith(f"http://{fleet_net.subnet}.")  # its namespace's address, reached from here
    assert set(key["capacity"]) == {"instances", "vcpus", "mem_mb", "disk_mb"}
    assert key["free"]["vcpus"] == key["capacity"]["vcpus"]

    uuid = str(uuid_module.uuid4())
    answer = command(server.url, CLUSTER, "n1", start_json(uuid), headers={"Launcher-Wait": "30"})
    assert answer == {"instance_uuid": uuid, "state": "running", "done": True, "status": 200}
    # The same START again, one with a bad field, and a document that is not JSON: the answers the HTTP API
    # gives, with their status.
    bad_field = json.loads(start_json(str(uuid_module.uuid4())))
    bad_field["start"]["requirements"]["mem_mb"] = "lots"
    for body, status in ((start_json(uuid), 200), (json.dumps(bad_field).encode(), 400), (b"{not json", 400)):
        answer = command(server.url, CLUSTER, "n1", body, headers={"Content-Type": "application/json"})
        assert answer == http_answer(client, body) and answer["status"] == status
    free = wait_for("the key to count the instance", lambda: (k := node_key(server.url, CLUSTER, "n1"))
                      and k["free"]["vcpus"] == k["capacity"]["vcpus"] - 1 and k)
    assert free["free"]["mem_mb"] == free["capacity"]["mem_mb"] - 64

    wait_for("the journal's events in the stream", lambda: stream_matches_journal(server.url, client))
    launcher.kill(signal.SIGTERM)
    assert node_key(server.url, CLUSTER, "n1") is None  # purged on leaving, not left to expire


def test_kill_9_lets_the_key_expire_and_neither_it_nor_a_nats_restart_loses_or_doubles_an_event(
        fleet_net: FleetNetwork, server: NatsServer, launcher_factory: Any) -> None:
    launcher = node_launcher(fleet_net, launcher_factory, fleet(server))
    client = launcher.client()
    for _ in range(10):
        client.request("POST", "/v1/instances", start_json(str(uuid_module.uuid4())), "application/json")
    wait_for("the node's key", lambda: node_key(server.url, CLUSTER, "n1"))

    async def expiry_seen(nc: NatsClient) -> tuple[str, float]:
        """Kill the launcher while watching its key: the operation that ends it, and how long after the kill."""
        kv = await nc.jetstream().key_value(f"launcher-{CLUSTER}-nodes")
        watcher = await kv.watch("n1")
        killed = time.monotonic()
        await asyncio.to_thread(launcher.kill, signal.SIGKILL)
        while time.monotonic() - killed < 20:
            try:
                entry = await watcher.updates(timeout=1)
            except nats.errors.TimeoutError:
                continue
            if entry is not None and entry.operation in ("PURGE", "DEL"):
                return entry.operation, time.monotonic() - killed
        raise AssertionError("the watcher saw no end of the key")

    operation, after = controller(server.url, expiry_seen)
    assert operation == "PURGE" and after < 2 + 0.5 + 3  # the TTL after the last refresh, plus slack
    assert node_key(server.url, CLUSTER, "n1") is None

    client = launcher.start()
    wait_for("the node's key again", lambda: node_key(server.url, CLUSTER, "n1"))
    # NATS killed and started again (same store) while STARTs go on: the events of the outage follow.
    server.kill()
    for _ in range(10):
        client.request("POST", "/v1/instances", start_json(str(uuid_module.uuid4())), "application/json")
    server.start()
    for _ in range(10):
        client.request("POST", "/v1/instances", start_json(str(uuid_module.uuid4())), "application/json")
    wait_for("every event in the stream once", lambda: stream_matches_journal(server.url, client), timeout=30,
               every=0.5)
    assert len(journal(client)) > 30


def test_a_launcher_cut_off_from_nats_keeps_its_instances_and_catches_up_when_its_link_is_back(
        tmp_path: Path, fleet_net: FleetNetwork, server: NatsServer, launcher_factory: Any) -> None:
    """The launcher's link taken down (its namespace's veth): its key expires, so the controller sees the node
    down; meanwhile it keeps its instances and takes commands (over its unix socket), and once the link is back
    its key returns and the stream gets the events of the cut, each once."""
    unix_socket = tmp_path / "n1.sock"
    launcher = node_launcher(fleet_net, launcher_factory, {**fleet(server), "listen_unix": str(unix_socket)})
    client = launcher.client()
    before = [str(uuid_module.uuid4()) for _ in range(5)]
    for uuid in before:
        client.request("POST", "/v1/instances", start_json(uuid), "application/json", wait=1)
    wait_for("the node's key", lambda: node_key(server.url, CLUSTER, "n1"))
    wait_for("the events in the stream", lambda: stream_matches_journal(server.url, client))

    fleet_net.cut(launcher.netns)
    wait_for("the key to expire", lambda: node_key(server.url, CLUSTER, "n1") is None, timeout=15)
    local = Client.discover(f"unix://{unix_socket}", launcher.data_dir)
    assert {i["instance_uuid"]: i["state"] for i in local.request("GET", "/v1/instances")["instances"]} == \
        dict.fromkeys(before, "running")
    during = [str(uuid_module.uuid4()) for _ in range(5)]
    for uuid in during:
        assert local.request("POST", "/v1/instances", start_json(uuid), "application/json", wait=1)["state"] == \
            "running"

    fleet_net.mend(launcher.netns)
    wait_for("the node's key again", lambda: node_key(server.url, CLUSTER, "n1"), timeout=30)
    wait_for("the events of the cut in the stream, each once", lambda: stream_matches_journal(server.url, client),
             timeout=30, every=0.5)
    assert {e["instance_uuid"] for e in journal(client) if e.get("instance_uuid")} >= set(before + during)


def test_a_launcher_started_before_nats_serves_and_joins_when_nats_comes(tmp_path: Path, fleet_net: FleetNetwork,
                                                                         launcher_factory: Any) -> None:
    server = NatsServer(tmp_path / "late-nats", host=fleet_net.address)
    launcher = node_launcher(fleet_net, launcher_factory, fleet(server))
    client = launcher.client()
    uuid = str(uuid_module.uuid4())
    assert client.request("POST", "/v1/instances", start_json(uuid), "application/json", wait=1)["state"] == "running"
    try:
        server.start()
        wait_for("the node's key", lambda: node_key(server.url, CLUSTER, "n1"), timeout=30)
        wait_for("the events from before NATS came", lambda: stream_matches_journal(server.url, client), timeout=30)
    finally:
        server.kill()


def test_an_events_stream_made_without_atomic_batches_is_refused_with_the_reason(
        fleet_net: FleetNetwork, server: NatsServer, launcher_factory: Any) -> None:
    """An operator made the stream beforehand without `allow_atomic`: the launcher says why it does not publish
    (it would rather not publish than risk a gap), and keeps serving."""

    async def make(nc: NatsClient) -> None:  # all the launcher needs but atomic batches
        await nc.jetstream().add_stream(StreamConfig(name=f"launcher-{CLUSTER}-events", allow_direct=True,
                                                     subjects=[f"launcher.{CLUSTER}.node.*.events"]))
    controller(server.url, make)
    launcher = node_launcher(fleet_net, launcher_factory, fleet(server))
    wait_for("the reason in the log", lambda: "does not allow atomic batches (allow_atomic" in launcher.output())
    uuid = str(uuid_module.uuid4())
    client = launcher.client()
    assert client.request("POST", "/v1/instances", start_json(uuid), "application/json", wait=1)["state"] == "running"
    time.sleep(2 * (0.2 + 0.4 + 0.8))  # the publisher's next three tries (its pauses double from 0.2 s), twice
    assert len(journal(client)) >= 3  # events it would have published ...
    assert stream_events(server.url, f"launcher-{CLUSTER}-events", f"launcher.{CLUSTER}.node.n1.events") == []


def test_auctions_place_starts_across_nodes_and_never_overcommit_one(fleet_net: FleetNetwork, server: NatsServer,
                                                                      launcher_factory: Any) -> None:
    """Three launchers that each admit 5 instances; 20 STARTs placed at once through auctions (the reference
    controller, `FleetClient.place`): 15 run, 5 on each node, and the other 5 find no bidder."""
    launchers = [node_launcher(fleet_net, launcher_factory, {**fleet(server, node=f"n{i}"),
                                                       "admission": {"max_instances": 5, "vcpu_overcommit": 64.0}},
                               name=f"data{i}") for i in range(3)]
    wait_for("three nodes", lambda: all(node_key(server.url, CLUSTER, f"n{i}") for i in range(3)))

    async def place_all(nc: NatsClient) -> tuple[list[Placement], int]:
        fleet_client = FleetClient(nc, CLUSTER)
        placed: list[Placement] = []
        refused = 0

        async def one() -> None:
            nonlocal refused
            try:
                placed.append(await fleet_client.place(start_json(str(uuid_module.uuid4())), expected=3,
                                                       window_s=0.5))
            except NoBid:
                refused += 1
        await asyncio.gather(*(one() for _ in range(20)))
        return placed, refused

    placed, refused = controller(server.url, place_all)
    assert refused == 5 and len(placed) == 15
    assert all(p.answer["status"] in (200, 202) and "error" not in p.answer for p in placed)
    assert sorted(p.node for p in placed) == sorted(["n0", "n1", "n2"] * 5)
    for launcher in launchers:
        assert len(launcher.client().request("GET", "/v1/instances")["instances"]) == 5

    # A START sent with a bid that outlived its node's room: refused full_cn, never admitted over capacity.
    answer = command(server.url, CLUSTER, "n0", start_json(str(uuid_module.uuid4())), headers={"Launcher-Bid": "x"})
    assert answer["status"] == 503 and answer["error"] == "full_cn"


def fleet_cli(server: NatsServer, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """`launcher fleet ARGS --servers URL --cluster t1` (the reference controller's verbs)."""
    return subprocess.run([sys.executable, "-m", "launcher.cli", "fleet", *args, "--servers", server.url,
                           "--cluster", CLUSTER], input=stdin.decode() if stdin else None, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_the_reference_controller_verbs(fleet_net: FleetNetwork, server: NatsServer, launcher_factory: Any) -> None:
    launcher = node_launcher(fleet_net, launcher_factory, fleet(server, labels={"zone": "b"}))
    wait_for("the node's key", lambda: node_key(server.url, CLUSTER, "n1"))
    nodes = fleet_cli(server, "nodes", "--json")
    assert nodes.returncode == 0, nodes.stderr
    assert json.loads(nodes.stdout)["n1"]["labels"] == {"zone": "b"}
    assert "n1" in fleet_cli(server, "nodes").stdout

    uuid = str(uuid_module.uuid4())
    placed = fleet_cli(server, "place", "-", "--wait", "--json", stdin=start_json(uuid))
    assert placed.returncode == 0, placed.stderr
    assert json.loads(placed.stdout) == {"node": "n1", "bids": 1, "instance_uuid": uuid, "state": "running",
                                         "done": True, "status": 200}
    assert launcher.client().request("GET", f"/v1/instances/{uuid}")["state"] == "running"
    listed = wait_for("the instance in fleet ls", lambda: json.loads(fleet_cli(server, "ls", "--json").stdout))
    assert listed == [{"instance_uuid": uuid, "node": "n1", "state": "running"}]
    events = [json.loads(line) for line in fleet_cli(server, "events", "--node", "n1").stdout.splitlines()]
    assert [e["seq"] for e in events] == [e["seq"] for e in journal(launcher.client())]
    assert all(e["node"] == "n1" for e in events)

    big = json.loads(start_json(str(uuid_module.uuid4())))
    big["start"]["requirements"]["mem_mb"] = 10**9
    refused = fleet_cli(server, "place", "-", stdin=json.dumps(big).encode())
    assert refused.returncode == 1 and "full_cn: no node bid" in refused.stderr
    away = subprocess.run([sys.executable, "-m", "launcher.cli", "fleet", "nodes", "--servers",
                           f"nats://127.0.0.1:{free_port()}", "--cluster", CLUSTER], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert away.returncode == 1 and away.stderr.count("\n") == 1 and "no servers available" in away.stderr


def test_a_three_server_cluster_loses_servers_under_load_and_no_command_or_event_is_lost(
        tmp_path: Path, fleet_net: FleetNetwork, launcher_factory: Any) -> None:
    """Three nats-servers in a cluster (the stream and bucket with 3 replicas). While commands go on, the server
    the launcher is connected to is killed; once it is back, the server that leads the events stream is killed.
    The launcher and the controller move to another server each time, every command is answered, and the stream
    holds every event once."""
    ports = [(free_port(), free_port()) for _ in range(3)]
    routes = [f"nats-route://127.0.0.1:{route}" for _, route in ports]
    servers = [NatsServer(tmp_path / f"s{i}", port=client_port, host=fleet_net.address,
                          config={"server_name": f"s{i}", "cluster": {"name": "fleet-test",
                                                                     "listen": f"127.0.0.1:{route}",
                                                                     "routes": routes}})
               for i, (client_port, route) in enumerate(ports)]
    for server in servers:
        server.start()
    try:
        urls = [server.url for server in servers]
        launcher = node_launcher(fleet_net, launcher_factory, {"fleet": {
            "servers": urls, "cluster": CLUSTER, "node": "n1", "replicas": 3, "refresh_s": 0.5, "liveness_ttl_s": 10}})
        client = launcher.client()
        wait_for("the node's key", lambda: node_key(urls[1], CLUSTER, "n1"), timeout=60, every=0.5)
        killed: list[str] = []

        async def kill(nc: NatsClient, which: str) -> None:
            """Kill the launcher's own server ("own"), or the events stream's leader ("leader")."""
            if which == "own":
                victim = next(s for s in servers if "launcher-n1" in s.client_names())
            else:
                victim = servers[int((await stream_leader(nc)).removeprefix("s"))]
            killed.append(f"{which}: {victim.url}")
            await asyncio.to_thread(victim.kill)
            if which == "own":
                await asyncio.sleep(3)
                await asyncio.to_thread(victim.start)  # back before the next kill: a quorum of 3 needs 2

        async def stream_leader(nc: NatsClient) -> str:
            """The name of the events stream's leader, once it has one (the cluster may still be electing)."""
            for _ in range(60):
                try:
                    info = await nc.jetstream(timeout=2).stream_info(f"launcher-{CLUSTER}-events")
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                        nats.js.errors.ServiceUnavailableError):
                    info = None
                if info is not None and info.cluster is not None and info.cluster.leader:
                    return info.cluster.leader
                await asyncio.sleep(0.5)
            raise AssertionError("the events stream has no leader")

        async def load(nc: NatsClient) -> list[dict[str, Any]]:
            fleet_client = FleetClient(nc, CLUSTER)
            answers = []
            for n in range(40):
                if n in (10, 25):
                    await kill(nc, "own" if n == 10 else "leader")
                for _ in range(60):  # a command that meets the failover is sent again (the same START: idempotent)
                    try:
                        answers.append(await fleet_client.command("n1", start_json(f"{n:08d}-0000-4000-8000-"
                                                                                   "000000000000"), timeout_s=2))
                        break
                    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                        await asyncio.sleep(0.5)
            return answers

        answers = controller(",".join(urls), load, allow_reconnect=True, max_reconnect_attempts=-1,
                             reconnect_time_wait=0.2)
        assert len(killed) == 2, killed
        assert len(answers) == 40 and all(a["status"] in (200, 202) for a in answers), answers
        assert len(client.request("GET", "/v1/instances")["instances"]) == 40
        left = next(server.url for server in servers if server.proc and server.proc.poll() is None)
        wait_for("every event in the stream once, read from a server left",
                 lambda: stream_matches_journal(left, client), timeout=60, every=0.5)
    finally:
        for server in servers:
            server.kill()


def test_ten_thousand_starts_placed_through_auctions_across_four_launchers_overcommit_no_node(
        fleet_net: FleetNetwork, server: NatsServer, launcher_factory: Any) -> None:
    """The issue's placement run: 4 launchers that admit 2 500 instances each, 10 000 STARTs placed through
    auctions, 64 at a time (the reference controller). The fleet is full at the end, so a node that took one
    more would be overcommitted: none holds more than 2 500 or is promised beyond its capacity, and every START
    is either running on one node or was refused for lack of a bid (a few of the last ones may find every
    remaining room held by other auctions' bids for longer than their five tries)."""
    per_node, nodes = 2500, [f"n{i}" for i in range(4)]
    admission = {"max_instances": per_node, "vcpu_overcommit": 100000.0, "memory_overcommit": 1000.0}
    launchers = [node_launcher(fleet_net, launcher_factory, {**fleet(server, node=node), "admission": admission},
                               name=node) for node in nodes]
    wait_for("four nodes", lambda: all(node_key(server.url, CLUSTER, node) for node in nodes))

    async def place_all(nc: NatsClient) -> tuple[int, int]:
        fleet_client = FleetClient(nc, CLUSTER)
        queue = list(range(10_000))
        placed = refused = 0

        async def worker() -> None:
            nonlocal placed, refused
            while queue:
                queue.pop()
                try:
                    answer = (await fleet_client.place(start_json(str(uuid_module.uuid4())), expected=4)).answer
                except NoBid:
                    refused += 1
                    continue
                assert "error" not in answer, answer
                placed += 1
        await asyncio.gather(*(worker() for _ in range(64)))
        return placed, refused

    placed, refused = controller(server.url, place_all)
    assert placed + refused == 10_000 and refused <= 100, (placed, refused)
    counts = []
    for launcher in launchers:
        node = launcher.client().request("GET", "/v1/node")
        assert node["instances"] <= per_node
        assert all(node["allocated"][k] <= node["capacity"][k] for k in ("vcpus", "mem_mb", "disk_mb"))
        counts.append(node["instances"])
    assert sum(counts) == placed
