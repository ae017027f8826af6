"""The node's journal events into the fleet's JetStream stream: every event once, in order, none missing.

Events go to ``launcher.<c>.node.<n>.events``, each with ``Nats-Msg-Id: <n>:<seq>`` (`seq` the journal's), in
the order of the journal, each publish after the previous one's ack. The events durable at a time go to nats-py's
thread together (up to BATCH_EVENTS: one round trip between Trio and that thread), and are published there:

- fewer than ATOMIC_FROM: one at a time, each with ``Nats-Expected-Last-Subject-Sequence``, the stream seq of
  this node's previous event there. JetStream acks a single publish without syncing its disk (no fsync under
  strace; about 1 ms a publish from nats-py on an idle machine here);
- more (a backlog: the launcher is busy, or NATS was away): as one JetStream atomic batch (``Nats-Batch-Id``;
  all of it stored, or none), its first event with the expected seq. The server fsyncs at each batch's commit
  (3 fsync calls per batch under strace; 3.7 ms a batch of 1 to 10 events on an idle machine, 4.4 ms for 50), so
  a backlog costs one commit and one round trip, not one round trip per event; a short one would pay the sync for
  little. ATOMIC_FROM was not tuned: 8 is the only value measured.

The stream's own last event of this node is the truth about what is stored, so `EventPublisher.run` reads it back
(a direct get, one subject) before it publishes, and again after any failure, and resumes after it:

- an event or batch whose ack was lost (NATS went away, the launcher was killed) is found stored and not sent
  again;
- one that was sent, timed out, and got stored later (nats-py sends what it buffered once it reconnects) makes
  the next publish fail (its expected seq is stale): read back, resume after it;
- a batch cut short (the connection dropped in its middle) is not stored at all: JetStream refuses a batch with a
  missing part, so the stream never has a gap;
- an event stored twice cannot happen: the expected seq refuses a second copy, whatever the time since (the
  message id only guards JetStream's duplicate window).

While NATS is away the journal keeps the events (its files, `events.keep_files`); a tail rotated away before NATS
came back is logged as lost, and publishing goes on from the oldest event kept.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

import nats.errors
import nats.js.errors
import trio
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from launcher.durable.events import EventJournal, EventsExpired
from launcher.transport.fleet.bridge import AsyncioThread, Link
from launcher.transport.fleet.streams import NATS_ERRORS, ensure_events_stream
from launcher.transport.fleet.subjects import (
    BATCH_COMMIT_HEADER,
    BATCH_ID_HEADER,
    BATCH_SEQUENCE_HEADER,
    EXPECTED_LAST_HEADER,
    MSG_ID_HEADER,
    Subjects,
)

log = logging.getLogger(__name__)

RETRY_FIRST_S = 0.2  # after a failure, read back and resume after this long, doubling up to RETRY_MAX_S
RETRY_MAX_S = 5.0
BATCH_EVENTS = 256  # events handed to the loop's thread at once (an atomic batch takes up to 1 000)
ATOMIC_FROM = 8  # a batch this long or longer is published as one atomic batch, a shorter one event by event


class ConnectionLost(nats.errors.Error):
    """The connection dropped while events were being published."""


class EventPublisher:
    """Publishes the journal's events to the stream (module doc)."""

    def __init__(self, journal: EventJournal, bridge: AsyncioThread, client: NatsClient, subjects: Subjects,
                 replicas: int, timeout_s: float, link: Link) -> None:
        """For node `subjects.node`; a publish waits `timeout_s` for its ack, and no longer once the connection
        drops (`link`); `replicas`: the stream's, if this node makes it."""
        self.journal = journal
        self.bridge = bridge
        self.client = client
        self.js: JetStreamContext = client.jetstream(timeout=timeout_s)
        self.subjects = subjects
        self.replicas = replicas
        self.timeout_s = timeout_s
        self.acked_seq = 0  # the journal seq of the last event known stored
        self.link = link

    async def run(self) -> None:
        """Publish until cancelled; every failure (the connection dropping is one) is logged, once per outage, and
        followed by a pause (doubling from RETRY_FIRST_S to RETRY_MAX_S; it ends early, back to the first, when
        the connection comes back) and a read-back."""
        wait = RETRY_FIRST_S
        failing = False
        while True:
            try:
                await self.bridge.call(ensure_events_stream, self.js, self.subjects, self.replicas)
                stored, stream_seq = await self.last_stored()
                if failing:
                    log.info("fleet: publishing events again, after journal seq %d", stored)
                failing, wait = False, RETRY_FIRST_S
                await self._publish_while_connected(stored, stream_seq)
            except (*NATS_ERRORS, EventsExpired) as exc:
                if not failing:
                    log.warning("fleet: events not published: %s; the journal keeps them (tried again)",
                                exc or type(exc).__name__)
                failing = True
            reconnected = False
            with trio.move_on_after(wait):
                await self.link.wait_back()
                reconnected = True
            wait = RETRY_FIRST_S if reconnected else min(wait * 2, RETRY_MAX_S)

    async def _publish_while_connected(self, stored: int, stream_seq: int) -> None:
        """`_publish_after`, given up (ConnectionLost) when the connection drops: what was in flight gets no
        ack, and the read-back after the pause tells what was stored."""
        with self.link.cancelled_on_drop() as publishing:
            await self._publish_after(stored, stream_seq)
        if publishing.cancelled_caught:
            raise ConnectionLost("the connection to NATS dropped")

    async def last_stored(self) -> tuple[int, int]:
        """(journal seq, stream seq) of this node's last event in the stream; (0, 0) if it has none."""
        try:
            msg = await self.bridge.call(self.js.get_last_msg, self.subjects.stream, self.subjects.events, direct=True)
        except nats.js.errors.NotFoundError:
            return 0, 0
        msg_id = (msg.headers or {}).get(MSG_ID_HEADER, "")
        node, _, seq = msg_id.rpartition(":")
        if node != self.subjects.node or not seq.isdigit():
            raise nats.js.errors.Error(f"the last event of node {self.subjects.node} in {self.subjects.stream} has "
                                       f"message id {msg_id!r}, not <node>:<seq>")
        return int(seq), msg.seq or 0

    async def _publish_after(self, stored: int, stream_seq: int) -> None:
        """Publish the journal's events after seq `stored`, following it, the first expecting the node's last
        stream seq to be `stream_seq`. Returns only if the journal stops; raises on any failure."""
        since = stored
        if since > self.journal.last_seq:
            log.warning("fleet: the stream has this node's events up to seq %d, the journal only to %d (a new data "
                        "dir?): publishing the journal's from its start", since, self.journal.last_seq)
            since = 0
        if since < self.journal.oldest_seq - 1:
            log.warning("fleet: events %d to %d were rotated out of the journal before NATS had them: lost",
                        since + 1, self.journal.oldest_seq - 1)
            since = self.journal.oldest_seq - 1
        self.acked_seq = since
        events = self.journal.events_since(since, follow=True).__aiter__()
        async for first in events:
            batch = [first]  # and every other event durable now: they come at once, from memory
            while len(batch) < BATCH_EVENTS and batch[-1]["seq"] < self.journal.durable_seq:
                batch.append(await events.__anext__())
            stream_seq, self.acked_seq, error = await self.bridge.call(self._publish_batch, batch, stream_seq)
            if error is not None:
                raise error

    async def _publish_batch(self, batch: list[dict[str, Any]],
                             stream_seq: int) -> tuple[int, int, BaseException | None]:
        """On the loop's thread: publish `batch`, the first event expecting the node's last stream seq to be
        `stream_seq`: one event at a time if it is shorter than ATOMIC_FROM, else as one atomic batch; (the
        stream seq of the node's last event stored, its journal seq, the error that stopped it or None)."""
        if len(batch) < ATOMIC_FROM:
            return await self._publish_one_by_one(batch, stream_seq)
        return await self._publish_atomic(batch, stream_seq)

    async def _publish_one_by_one(self, batch: list[dict[str, Any]],
                                  stream_seq: int) -> tuple[int, int, BaseException | None]:
        acked = self.acked_seq
        for event in batch:
            headers = {MSG_ID_HEADER: self._msg_id(event), EXPECTED_LAST_HEADER: str(stream_seq)}
            try:
                ack = await self.js.publish(self.subjects.events, _body(event), timeout=self.timeout_s,
                                            headers=headers)
            except NATS_ERRORS as exc:
                return stream_seq, acked, exc
            stream_seq, acked = ack.seq, event["seq"]
        return stream_seq, acked, None

    async def _publish_atomic(self, batch: list[dict[str, Any]],
                              stream_seq: int) -> tuple[int, int, BaseException | None]:
        batch_id = secrets.token_hex(16)
        try:
            for number, event in enumerate(batch, 1):
                headers = {MSG_ID_HEADER: self._msg_id(event), BATCH_ID_HEADER: batch_id,
                           BATCH_SEQUENCE_HEADER: str(number)}
                if number == 1:
                    headers[EXPECTED_LAST_HEADER] = str(stream_seq)
                if number < len(batch):
                    await self.client.publish(self.subjects.events, _body(event), headers=headers)
                else:
                    headers[BATCH_COMMIT_HEADER] = "1"
                    ack = await self.js.publish(self.subjects.events, _body(event), timeout=self.timeout_s,
                                                headers=headers)
        except NATS_ERRORS as exc:
            return stream_seq, self.acked_seq, exc
        return ack.seq, batch[-1]["seq"], None

    def _msg_id(self, event: dict[str, Any]) -> str:
        return f"{self.subjects.node}:{event['seq']}"


def _body(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()
