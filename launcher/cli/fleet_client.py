"""A controller's side of the fleet protocol (docs/fleet.md), in plain asyncio with nats-py: the proof that the
protocol is enough, used by `launcher fleet ...` and by bench/fleet.py. Not a scheduler: it places a START on the
bidder with the most free memory, and that is all.

- `nodes`: the nodes bucket's keys (a node whose key expired is not there);
- `auction`: a START document to `launcher.<c>.auction`, the bids collected for `window_s` (or until every node
  with a key has bid);
- `place`: an auction, then the START sent to the best bidder's cmd subject with ``Launcher-Bid`` and the other
  bids released at once (their nodes' room is free again); if that node refuses it after all (its bid expired and
  it filled up meanwhile: `full_cn`), the next bidder; with no bid, the auction again, a few times (bids held for
  other auctions are released or expire meanwhile);
- `command`: any command document to one node;
- `events`: the events stream, of one node or of all, from a stream seq on, following it if asked.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import attrs
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from launcher.transport.fleet.streams import ensure_events_stream, ensure_nodes_bucket
from launcher.transport.fleet.subjects import BID_HEADER, CONTENT_TYPE_HEADER, WAIT_HEADER, Subjects

AUCTION_WINDOW_S = 0.1  # how long an auction collects bids (the nodes' bids hold for their bid_ttl_s, 1 s)
COMMAND_TIMEOUT_S = 10.0  # for the answer to a command (a START is answered once accepted: milliseconds)
PLACE_ATTEMPTS = 5  # auctions of one START while no node bids
FOLLOW_HEARTBEAT_S = 1.0  # a followed events consumer's heartbeat (nats-py's default, 5 s, notices a loss in 10)


@attrs.frozen
class Placement:
    """Where a START went: the node, its answer (the HTTP API's JSON plus "status"), and the bids it had."""

    node: str
    answer: dict[str, Any]
    bids: int


class NoBid(Exception):
    """No node bid for a START (every node is full, in maintenance, refused it, or none is up)."""


class LinkLost(nats.errors.Error):
    """The connection dropped while a command waited for its answer: the answer can no longer come. The command
    may or may not have been carried out; sending it again is safe for a START (the same one is idempotent)."""


class _Link:
    """Ends the requests in flight when the connection drops (nats-py would let them wait for their timeout)."""

    def __init__(self) -> None:
        self._lost = asyncio.Event()

    async def lost(self) -> None:
        """nats-py's disconnected callback."""
        self._lost.set()
        self._lost = asyncio.Event()

    async def answer(self, request: Awaitable[Msg]) -> Msg:
        """`request`'s answer; LinkLost if the connection drops first."""
        lost = self._lost
        asked, dropped = asyncio.ensure_future(request), asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({asked, dropped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            dropped.cancel()
            if not asked.done():
                asked.cancel()
        if asked.done() and not asked.cancelled():
            return asked.result()
        raise LinkLost("the connection to NATS dropped before the answer came")


class FleetClient:
    """One controller connection to a cluster's fleet (module doc)."""

    def __init__(self, client: NatsClient, cluster: str, link: _Link | None = None) -> None:
        """Over the connection `client` (see `connect`, which also ends the commands in flight when it drops), for
        cluster `cluster`."""
        self.nc = client
        self._link = link or _Link()
        self.js = client.jetstream()
        self.subjects = Subjects(cluster)
        self._auctions: dict[str, list[dict[str, Any]]] = {}
        self._bid_arrived: dict[str, asyncio.Event] = {}
        self._inbox = f"_INBOX.auction.{secrets.token_hex(8)}"
        self._subscribed = False

    @classmethod
    async def connect(cls, servers: list[str], cluster: str, *, user: str = "", password: str = "",
                      creds_file: str = "", ca_file: str = "", cert_file: str = "", key_file: str = "",
                      reconnect_attempts: int = 2) -> FleetClient:
        """A connection to `servers` (nats:// or tls:// URLs) as a controller of `cluster` (with a user and
        password, or a NATS creds file); once connected, it tries `reconnect_attempts` times (-1: forever), 0.5 s
        apart, to get back a lost connection."""
        async def quiet(exc: Exception) -> None:
            """nats-py prints a traceback for each error without this; the caller sees the exception it gets."""

        link = _Link()
        options: dict[str, Any] = {"connect_timeout": 5, "max_reconnect_attempts": reconnect_attempts,
                                   "reconnect_time_wait": 0.5, "error_cb": quiet, "disconnected_cb": link.lost}
        if user:
            options.update(user=user, password=password)
        if creds_file:
            options["user_credentials"] = creds_file
        if ca_file:
            context = ssl.create_default_context(cafile=ca_file)
            if cert_file:
                context.load_cert_chain(cert_file, key_file)
            options["tls"] = context
        return cls(await nats.connect(servers, **options), cluster, link)

    async def close(self) -> None:
        """Drain and close the connection (if it is not closed already)."""
        if not self.nc.is_closed:
            await self.nc.drain()

    async def prepare(self, replicas: int = 1) -> None:
        """Make the events stream and the nodes bucket, as a launcher would (for a server where launchers may
        not make them); an existing one is left as it is."""
        await ensure_events_stream(self.js, self.subjects, replicas)
        await ensure_nodes_bucket(self.js, self.subjects, replicas)

    async def nodes(self) -> dict[str, dict[str, Any]]:
        """Every node that is up: its id → its key's value (status, capacity, free, labels, virtualizers, url)."""
        try:
            kv = await self.js.key_value(self.subjects.bucket)
            keys = await kv.keys()
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.NoKeysError):
            return {}
        found = {}
        for key in keys:
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue  # expired meanwhile
            if entry.value:
                found[key] = json.loads(entry.value)
        return found

    async def auction(self, start: bytes, window_s: float = AUCTION_WINDOW_S, expected: int = 0,
                      content_type: str = "") -> list[dict[str, Any]]:
        """The bids for the START document `start`, collected for `window_s` or until `expected` (when not 0)
        nodes have bid."""
        if not self._subscribed:
            await self.nc.subscribe(self._inbox + ".*", cb=self._on_bid)
            self._subscribed = True
        auction_id = secrets.token_hex(8)
        self._auctions[auction_id] = []
        arrived = self._bid_arrived[auction_id] = asyncio.Event()
        headers = {CONTENT_TYPE_HEADER: content_type} if content_type else None
        try:
            await self.nc.publish(self.subjects.auction, start, reply=f"{self._inbox}.{auction_id}", headers=headers)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + window_s
            while not (expected and len(self._auctions[auction_id]) >= expected):
                left = deadline - loop.time()
                if left <= 0:
                    break
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), left)
                except TimeoutError:
                    break
            return self._auctions[auction_id]
        finally:
            del self._auctions[auction_id], self._bid_arrived[auction_id]

    async def _on_bid(self, msg: Msg) -> None:
        auction_id = msg.subject.rpartition(".")[2]
        bids = self._auctions.get(auction_id)
        if bids is None or not msg.data:  # too late, or the server's "no responders" status
            return
        try:
            bids.append(json.loads(msg.data))
        except ValueError:
            return
        self._bid_arrived[auction_id].set()

    async def place(self, start: bytes, *, window_s: float = AUCTION_WINDOW_S, expected: int = 0,
                    wait_s: float | None = None, content_type: str = "", attempts: int = PLACE_ATTEMPTS) -> Placement:
        """Auction `start` (up to `attempts` times while no node bids), then send it to the bidder with the most
        free memory with its bid, releasing the others; the next bidder if that one answers full_cn. NoBid if
        nobody bid, or every bidder refused it."""
        bids: list[dict[str, Any]] = []
        for attempt in range(attempts):
            bids = await self.auction(start, window_s, expected, content_type)
            if bids:
                break
            await asyncio.sleep(window_s * (attempt + 1))
        ranked = sorted(bids, key=lambda bid: bid.get("free", {}).get("mem_mb", 0), reverse=True)
        answer: dict[str, Any] = {}
        for index, bid in enumerate(ranked):
            if index == 0:
                await self._release(ranked[1:])
            answer = await self.command(bid["node"], start, wait_s=wait_s, bid=bid["bid_id"],
                                        content_type=content_type)
            if answer.get("error") != "full_cn":
                return Placement(bid["node"], answer, len(bids))
        raise NoBid(f"no node bid for the START ({len(bids)} bids{', all refused it: ' + str(answer) if bids else ''})")

    async def _release(self, bids: list[dict[str, Any]]) -> None:
        """Tell each bid's node that its bid was not picked."""
        for bid in bids:
            await self.nc.publish(self.subjects.for_node(bid["node"]).release, bid["bid_id"].encode())

    async def command(self, node: str, body: bytes, *, wait_s: float | None = None, bid: str = "",
                      content_type: str = "", timeout_s: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
        """The command document `body` sent to `node`; its answer (the HTTP API's JSON plus "status"). With
        `wait_s`, the node answers once the command finished (or that long passed). nats.errors.TimeoutError if
        no answer comes within `timeout_s`, LinkLost if the connection drops first."""
        headers = {}
        if wait_s is not None:
            headers[WAIT_HEADER] = str(wait_s)
            timeout_s = max(timeout_s, wait_s + 5)
        if bid:
            headers[BID_HEADER] = bid
        if content_type:
            headers[CONTENT_TYPE_HEADER] = content_type
        reply = await self._link.answer(self.nc.request(self.subjects.for_node(node).cmd, body, timeout=timeout_s,
                                                        headers=headers or None))
        answer: dict[str, Any] = json.loads(reply.data)
        return answer

    async def events(self, node: str = "*", *, from_seq: int = 1, follow: bool = False,
                     idle_s: float = 1.0) -> AsyncIterator[tuple[str, int, dict[str, Any]]]:
        """(node, stream seq, event) of `node`'s events ("*": every node's), from stream seq `from_seq`; without
        `follow`, it ends once nothing new came for `idle_s`. An ordered consumer: one lost on the server (NATS
        restarted) is made again from where it was once two of its heartbeats (FOLLOW_HEARTBEAT_S) are missed."""
        subject = self.subjects.for_node(node).events
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=from_seq,
                                idle_heartbeat=FOLLOW_HEARTBEAT_S)
        sub = await self.js.subscribe(subject, ordered_consumer=True, config=config)
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=None if follow else idle_s)
                except nats.errors.TimeoutError:
                    return
                yield node_of(msg.subject), msg.metadata.sequence.stream, json.loads(msg.data)
        finally:
            await sub.unsubscribe()


def node_of(subject: str) -> str:
    """The node of an events subject ``launcher.<c>.node.<n>.events``."""
    return subject.split(".")[3]
