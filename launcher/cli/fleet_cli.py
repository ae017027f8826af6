"""`launcher fleet ...`: the reference controller's verbs over `fleet_client.FleetClient` (docs/fleet.md).

    launcher fleet nodes                 the nodes that are up (their keys in the nodes bucket)
    launcher fleet place FILE [--wait]   place a START (YAML or JSON; - for stdin) through an auction
    launcher fleet events [-f] [--node N] [--from SEQ]
                                         the events stream, as JSON lines with "node" and "stream_seq" added
    launcher fleet ls                    every instance of the fleet and its state, folded from the events stream
    launcher fleet permissions NODE --cluster C
                                         the nats-server permissions that node needs (JSON)

The fleet comes from `--config` (its `fleet:` section: servers, cluster, user and password or creds file, TLS), or
from `--servers` and `--cluster`, which win.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from launcher.cli.fleet_client import FleetClient, NoBid
from launcher.core import config as config_module
from launcher.plugin.errors import SetupError
from launcher.transport.fleet.permissions import node_permissions
from launcher.transport.fleet.subjects import Subjects

EXIT_FAILED, EXIT_USAGE = 1, 2


def add_parser(verbs: Any) -> None:
    """The `fleet` verb and its own verbs, under the `launcher` command's `verbs`."""
    fleet = verbs.add_parser("fleet", help="a controller of a fleet on NATS: nodes | place FILE | events | ls")
    fleet_verbs = fleet.add_subparsers(dest="fleet_verb", required=True, metavar="FLEET_VERB")

    def verb(name: str, run: Callable[[FleetClient, argparse.Namespace], Awaitable[int]],
             help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = fleet_verbs.add_parser(name, help=help_text)
        p.set_defaults(fleet_run=run)
        p.add_argument("--config", type=Path, help="a launcher config whose fleet: section names the fleet")
        p.add_argument("--servers", help="NATS URLs, comma-separated (instead of the config's)")
        p.add_argument("--cluster", help="the fleet's cluster name (instead of the config's)")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        return p

    verb("nodes", _nodes, "the nodes that are up")
    p = verb("place", _place, "place a START through an auction")
    p.add_argument("file", metavar="FILE", help="a ciao START payload (YAML, or JSON); - for stdin")
    p.add_argument("--wait", action="store_true", help="answer once the instance runs (or failed)")
    p.add_argument("--timeout", type=float, default=300.0, help="longest wait, seconds")
    p = verb("events", _events, "the fleet's events")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--node", default="*", help="one node's events only")
    p.add_argument("--from", dest="from_seq", type=int, default=1, help="from this stream seq")
    verb("ls", _ls, "every instance of the fleet, from the events stream")
    p = fleet_verbs.add_parser("permissions", help="the nats-server permissions a node needs (JSON), to paste into "
                                                   "the server's authorization block")
    p.add_argument("node")
    p.add_argument("--cluster", required=True)


def run(args: argparse.Namespace) -> int:
    """Run the fleet verb of `args`; the exit status."""
    if args.fleet_verb == "permissions":
        print(json.dumps(node_permissions(Subjects(args.cluster, args.node)), indent=2))
        return 0
    try:
        fleet = config_module.load(args.config).fleet
    except SetupError as exc:
        print(f"launcher: {exc}", file=sys.stderr)
        return EXIT_USAGE
    servers = args.servers.split(",") if args.servers else list(fleet.servers)
    cluster = args.cluster or fleet.cluster
    if not servers or not cluster:
        print("launcher: name the fleet: --servers and --cluster, or --config with a fleet: section",
              file=sys.stderr)
        return EXIT_USAGE

    async def session() -> int:
        client = await FleetClient.connect(servers, cluster, user=fleet.user, password=fleet.password,
                                           creds_file=fleet.creds_file,
                                           ca_file=fleet.tls.ca_file, cert_file=fleet.tls.cert_file,
                                           key_file=fleet.tls.key_file)
        try:
            status: int = await args.fleet_run(client, args)
            return status
        finally:
            await client.close()

    try:
        return asyncio.run(session())
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - any failure of NATS or of the document: one line, not a traceback
        print(f"launcher: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


async def _nodes(client: FleetClient, args: argparse.Namespace) -> int:
    nodes = await client.nodes()
    if args.json:
        print(json.dumps(nodes, indent=2))
        return 0
    print(f"{'NODE':<20} {'STATUS':<12} {'FREE VCPUS':>10} {'FREE MIB':>10}  LABELS")
    for name, node in sorted(nodes.items()):
        free = node.get("free", {})
        labels = ",".join(f"{k}={v}" for k, v in sorted(node.get("labels", {}).items()))
        print(f"{name:<20} {node.get('status', '?'):<12} {free.get('vcpus', 0):>10g} {free.get('mem_mb', 0):>10g}  "
              f"{labels}")
    return 0


async def _place(client: FleetClient, args: argparse.Namespace) -> int:
    body = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    expected = len(await client.nodes())
    try:
        placed = await client.place(body, expected=expected, wait_s=args.timeout if args.wait else None)
    except NoBid as exc:
        print(f"launcher: full_cn: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps({"node": placed.node, "bids": placed.bids, **placed.answer}))
    else:
        answer = placed.answer
        state = answer.get("state") or f"{answer.get('error')}: {answer.get('reason')}"
        print(f"{answer.get('instance_uuid', '')} on {placed.node} ({placed.bids} bids): {state}")
    return 0 if "error" not in placed.answer else EXIT_FAILED


async def _events(client: FleetClient, args: argparse.Namespace) -> int:
    async for node, seq, event in client.events(args.node, from_seq=args.from_seq, follow=args.follow):
        print(json.dumps({"node": node, "stream_seq": seq, **event}), flush=True)
    return 0


async def _ls(client: FleetClient, args: argparse.Namespace) -> int:
    instances: dict[str, tuple[str, str]] = {}  # uuid → (node, state)
    async for node, _, event in client.events():
        if event.get("type") != "instance_state":
            continue
        if event.get("state") == "deleted":
            instances.pop(event["instance_uuid"], None)
        else:
            instances[event["instance_uuid"]] = (node, event.get("state", "?"))
    if args.json:
        print(json.dumps([{"instance_uuid": uuid, "node": node, "state": state}
                          for uuid, (node, state) in sorted(instances.items())], indent=2))
        return 0
    print(f"{'INSTANCE':<38} {'NODE':<20} STATE")
    for uuid, (node, state) in sorted(instances.items()):
        print(f"{uuid:<38} {node:<20} {state}")
    return 0
