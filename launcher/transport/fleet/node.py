"""This launcher as a member of a fleet on NATS JetStream (the `fleet:` section; docs/fleet.md has the protocol).

`FleetNode.run` runs beside the HTTP API, in `launcher serve`'s nursery. It connects (again and again until NATS
answers: the launcher serves its instances meanwhile, and nats-py reconnects by itself afterwards), makes sure the
events stream and the nodes bucket exist, then runs five tasks, each of which survives NATS going away:

- commands: each request on `launcher.<c>.node.<n>.cmd` is answered in a task of its own by the HTTP API's own
  code (`Api.command_answer`), its JSON plus ``"status"``; a START with ``Launcher-Bid`` consumes that bid;
- auctions: a START on `launcher.<c>.auction` that this node would admit now gets a bid, which reserves what the
  START needs for `bid_ttl_s` (`Supervisor.bid`, `launcher.core.bids`), or until a controller releases it on
  `launcher.<c>.node.<n>.release` (it picked another node);
- events: every journal event is published to the stream, in order, with ``Nats-Msg-Id: <n>:<seq>`` and the stream
  seq of the node's previous event as ``Nats-Expected-Last-Subject-Sequence`` (`EventPublisher`);
- liveness: the node's key in the nodes bucket, rewritten every `refresh_s` with a per-key TTL of `liveness_ttl_s`;
- stats: the STATS snapshot on `launcher.<c>.node.<n>.stats` each time one is taken.

On leaving (SIGTERM), the node's key is purged (a controller sees the node leave at once, not a TTL later) and
the connection drained, each bounded.
"""

from __future__ import annotations

import json
import logging
import ssl
from typing import Any

import attrs
import nats
import trio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from launcher.core.config import FleetConfig
from launcher.core.stats import StatsReporter
from launcher.core.supervisor import Supervisor
from launcher.durable.events import EventJournal
from launcher.plugin.errors import LauncherError
from launcher.transport import payloads
from launcher.transport.api import Api
from launcher.transport.fleet.bridge import AsyncioThread, Inbox, Link, open_asyncio_thread
from launcher.transport.fleet.publisher import EventPublisher
from launcher.transport.fleet.streams import NATS_ERRORS, ensure_nodes_bucket
from launcher.transport.fleet.subjects import BID_HEADER, CONTENT_TYPE_HEADER, WAIT_HEADER, Subjects

log = logging.getLogger(__name__)

CONNECT_RETRY_FIRST_S = 0.5  # the first connect is tried again after this, doubling up to CONNECT_RETRY_MAX_S
CONNECT_RETRY_MAX_S = 10.0
PING_INTERVAL_S = 2  # a dead link is noticed after about 2 missed pings (nats-py's default: 2 minutes)
COMMAND_INBOX = 1024  # commands received and not yet being answered; beyond, they are dropped (the caller times out)
MAX_COMMANDS_AT_ONCE = 256
AUCTION_INBOX = 4096  # auctions received and not yet bid on; beyond, they are dropped (this node does not bid)
REJOIN_S = 5.0
LEAVE_TIMEOUT_S = 2.0  # purging the key and draining the connection on the way out, each


class FleetNode:
    """This launcher in the fleet (module doc)."""

    def __init__(self, fleet: FleetConfig, supervisor: Supervisor, journal: EventJournal, api: Api,
                 stats: StatsReporter, url: str) -> None:
        """The member for node `fleet.node_id` of cluster `fleet.cluster`; `url` is this launcher's HTTP API."""
        self.fleet = fleet
        self.subjects = Subjects(fleet.cluster, fleet.node_id)
        self.supervisor = supervisor
        self.journal = journal
        self.api = api
        self.stats = stats
        self.url = url
        self._bucket_made = False
        self._link = Link()  # the connection dropping and coming back (the publisher stops waiting, and resumes)

    async def run(self) -> None:
        """Join the fleet and serve it until cancelled (module doc). A failure of the fleet's side (a bug: NATS
        being away is not one) is logged and the node joins again after REJOIN_S: it never stops the launcher."""
        while True:
            try:
                await self._member()
            except Exception:  # noqa: BLE001 - a bug of the fleet side: report it, keep the launcher serving
                log.exception("fleet: the fleet member failed; joining again in %g s", REJOIN_S)
            await trio.sleep(REJOIN_S)

    async def _member(self) -> None:
        async with open_asyncio_thread() as bridge:
            client = await self._connect(bridge)
            js = client.jetstream(timeout=self.fleet.request_timeout_s)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._serve_commands, bridge, client)
                    nursery.start_soon(self._serve_auctions, bridge, client)
                    nursery.start_soon(EventPublisher(self.journal, bridge, client, self.subjects, self.fleet.replicas,
                                                      self.fleet.request_timeout_s, self._link).run)
                    nursery.start_soon(self._refresh_liveness, bridge, js)
                    nursery.start_soon(self._publish_stats, bridge, client)
            finally:
                with trio.CancelScope(shield=True):
                    await self._leave(bridge, client, js)

    async def _connect(self, bridge: AsyncioThread) -> NatsClient:
        """A connection to one of the servers, tried until one answers."""
        wait = CONNECT_RETRY_FIRST_S
        while True:
            try:
                return await bridge.call(nats.connect, list(self.fleet.servers), **self._options(bridge))
            except NATS_ERRORS as exc:
                log.warning("fleet: cannot connect to %s: %s (next try in %g s)", ", ".join(self.fleet.servers),
                            exc or type(exc).__name__, wait)
            await trio.sleep(wait)
            wait = min(wait * 2, CONNECT_RETRY_MAX_S)

    def _options(self, bridge: AsyncioThread) -> dict[str, Any]:
        """nats.connect's options: reconnect forever (telling `_link` of each drop and return), ping every
        PING_INTERVAL_S, one logged error per outage, the node's inbox prefix (its permissions allow only that
        one), credentials and TLS."""
        f = self.fleet

        failing = False  # an error was logged and NATS has not come back since: the next ones are not

        async def error(exc: Exception) -> None:
            nonlocal failing
            if not failing:
                log.warning("fleet: NATS: %s (further errors are not logged until it reconnects)",
                            exc or type(exc).__name__)
            failing = True

        async def disconnected() -> None:
            log.warning("fleet: disconnected from NATS")
            bridge.to_trio(self._link.dropped)

        async def reconnected() -> None:
            nonlocal failing
            failing = False
            log.info("fleet: reconnected to NATS")
            bridge.to_trio(self._link.came_back)

        options: dict[str, Any] = {
            "name": f"launcher-{f.node_id}", "inbox_prefix": f"_INBOX_{f.node_id}", "error_cb": error,
            "disconnected_cb": disconnected, "reconnected_cb": reconnected, "allow_reconnect": True,
            "max_reconnect_attempts": -1, "reconnect_time_wait": 1, "connect_timeout": 2,
            "ping_interval": PING_INTERVAL_S, "max_outstanding_pings": 2,
        }
        if f.user:
            options.update(user=f.user, password=f.password)
        if f.creds_file:
            options["user_credentials"] = f.creds_file
        if f.tls.ca_file:
            context = ssl.create_default_context(cafile=f.tls.ca_file)
            if f.tls.cert_file:
                context.load_cert_chain(f.tls.cert_file, f.tls.key_file)
            options["tls"] = context
        return options

    # ----------------------------------------------------------------- commands

    async def _serve_commands(self, bridge: AsyncioThread, client: NatsClient) -> None:
        inbox: Inbox[Msg] = Inbox(bridge, COMMAND_INBOX)

        async def received(msg: Msg) -> None:
            inbox.put(msg)

        await bridge.call(client.subscribe, self.subjects.cmd, cb=received)
        limit = trio.Semaphore(MAX_COMMANDS_AT_ONCE)
        async with trio.open_nursery() as nursery:
            async for msg in inbox.receive:
                await limit.acquire()
                nursery.start_soon(self._answer, bridge, client, msg, limit)

    async def _answer(self, bridge: AsyncioThread, client: NatsClient, msg: Msg, limit: trio.Semaphore) -> None:
        """Answer one command as POST /v1/commands would, with its status in the JSON; never raises."""
        try:
            headers = msg.headers or {}
            query = {"wait": "1", "timeout": headers[WAIT_HEADER]} if WAIT_HEADER in headers else {}
            answer = await self.api.command_answer(msg.data, headers.get(CONTENT_TYPE_HEADER, ""), query,
                                                   bid=headers.get(BID_HEADER, ""))
            if not msg.reply:
                return  # a command published without a reply subject: done, nobody to tell
            body = {**json.loads(answer.body), "status": answer.status}
            bridge.submit(client.publish, msg.reply, json.dumps(body).encode())
        finally:
            limit.release()

    # ----------------------------------------------------------------- auctions

    async def _serve_auctions(self, bridge: AsyncioThread, client: NatsClient) -> None:
        """Bid on every auction whose START this node would admit now (`bid`), say nothing otherwise; drop the
        reservation of a bid a controller released."""
        inbox: Inbox[Msg] = Inbox(bridge, AUCTION_INBOX)

        async def received(msg: Msg) -> None:
            inbox.put(msg)

        async def released(msg: Msg) -> None:
            bridge.to_trio(self.supervisor.admission.bids.take, msg.data.decode(errors="replace"))

        await bridge.call(client.subscribe, self.subjects.auction, cb=received)
        await bridge.call(client.subscribe, self.subjects.release, cb=released)
        async for msg in inbox.receive:
            offer = self.bid(msg.data, (msg.headers or {}).get(CONTENT_TYPE_HEADER, ""))
            if offer is not None and msg.reply:
                bridge.submit(client.publish, msg.reply, json.dumps(offer).encode())

    def bid(self, body: bytes, content_type: str) -> dict[str, Any] | None:
        """This node's bid for the START document `body`: node, free room (after this bid's reservation),
        labels, bid_id and expires_in_ms (the reservation's `bid_ttl_s`); None if it is not a START this node
        would admit now (the reason is logged at debug level)."""
        try:
            start = payloads.parse_start(body, content_type, max_bytes=self.supervisor.config.max_payload_bytes)
            made = self.supervisor.bid(start, self.fleet.bid_ttl_s)
        except LauncherError as exc:
            log.debug("fleet: no bid: %s %s", exc.code, exc.reason)
            return None
        return {"node": self.subjects.node, "free": self.free(), "labels": dict(self.fleet.labels),
                "bid_id": made.bid_id, "expires_in_ms": round(self.fleet.bid_ttl_s * 1000)}

    # ----------------------------------------------------------------- liveness and stats

    def node_document(self) -> dict[str, Any]:
        """The value of this node's key: status, capacity, free (`free`), labels, virtualizers and the HTTP API's
        URL."""
        s = self.supervisor
        return {"status": s.status, "capacity": attrs.asdict(s.capacity), "free": self.free(),
                "labels": dict(self.fleet.labels), "virtualizers": list(s.config.virtualizers), "url": self.url}

    def free(self) -> dict[str, float]:
        """What the node may still promise: capacity less what instances were promised and what warm slots and
        live bids hold."""
        s = self.supervisor
        capacity = s.capacity
        used = s.allocated + s.admission.held_by_slots() + s.admission.bids.held()
        return {"vcpus": capacity.vcpus - used.vcpus, "mem_mb": capacity.mem_mb - used.mem_mb,
                "disk_mb": capacity.disk_mb - used.disk_mb}

    async def _refresh_liveness(self, bridge: AsyncioThread, js: JetStreamContext) -> None:
        failing = False
        while True:
            try:
                if failing or not self._bucket_made:
                    await bridge.call(ensure_nodes_bucket, js, self.subjects, self.fleet.replicas)
                    self._bucket_made = True
                await bridge.call(js.publish, self.subjects.node_key, json.dumps(self.node_document()).encode(),
                                  msg_ttl=self.fleet.liveness_ttl_s)
                if failing:
                    log.info("fleet: the node's key is written again")
                failing = False
            except NATS_ERRORS as exc:
                if not failing:
                    log.warning("fleet: cannot write the node's key: %s", exc or type(exc).__name__)
                failing = True
            await trio.sleep(self.fleet.refresh_s)

    async def _publish_stats(self, bridge: AsyncioThread, client: NatsClient) -> None:
        while True:
            await self.stats.taken()
            snapshot = self.stats.snapshot_json
            if len(snapshot) > client.max_payload:
                log.warning("fleet: a STATS snapshot of %d bytes is more than NATS takes (%d): not published",
                            len(snapshot), client.max_payload)
                continue
            try:
                await bridge.call(client.publish, self.subjects.stats, snapshot)
            except NATS_ERRORS as exc:
                log.debug("fleet: cannot publish STATS: %s", exc)

    async def _leave(self, bridge: AsyncioThread, client: NatsClient, js: JetStreamContext) -> None:
        """Purge the node's key and drain the connection, each within LEAVE_TIMEOUT_S."""
        with trio.move_on_after(LEAVE_TIMEOUT_S):
            try:
                await bridge.call(js.publish, self.subjects.node_key, b"",
                                  headers={"KV-Operation": "PURGE", "Nats-Rollup": "sub"})
            except NATS_ERRORS as exc:
                log.warning("fleet: cannot purge the node's key on leaving: %s", exc or type(exc).__name__)
        with trio.move_on_after(LEAVE_TIMEOUT_S):
            try:
                await bridge.call(client.drain)
            except NATS_ERRORS:
                pass
        if not client.is_closed:
            with trio.move_on_after(LEAVE_TIMEOUT_S):
                await bridge.call(client.close)
