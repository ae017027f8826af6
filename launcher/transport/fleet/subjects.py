"""The names of the fleet protocol (docs/fleet.md), for a cluster `<c>` and a node `<n>`: part of the contract, used
by the launcher's side and by the reference controller (`launcher fleet ...`) alike."""

from __future__ import annotations

import attrs

BID_HEADER = "Launcher-Bid"  # on a START sent to a node's cmd subject: the bid it consumes
WAIT_HEADER = "Launcher-Wait"  # on a command: answer once it finished, waiting up to this many seconds
CONTENT_TYPE_HEADER = "Content-Type"  # on a command: its document's type, as for POST /v1/commands
MSG_ID_HEADER = "Nats-Msg-Id"  # on an event: "<n>:<seq>", JetStream's key for dropping a duplicate
EXPECTED_LAST_HEADER = "Nats-Expected-Last-Subject-Sequence"  # on an event published alone, or an atomic batch's
#                                                                 first: the stream seq of the node's previous event
BATCH_ID_HEADER = "Nats-Batch-Id"  # on each event of an atomic batch (JetStream, nats-server >= 2.12): the batch
BATCH_SEQUENCE_HEADER = "Nats-Batch-Sequence"  # its place in the batch, from 1
BATCH_COMMIT_HEADER = "Nats-Batch-Commit"  # on the batch's last event: "1", store the batch (all of it or none)


@attrs.frozen
class Subjects:
    """Subjects, stream and bucket of one cluster, as seen from node `node` ("*" for a controller's wildcard)."""

    cluster: str
    node: str = "*"

    @property
    def cmd(self) -> str:
        """Commands to the node: request/reply, a ciao command document in, the HTTP API's answer out."""
        return f"launcher.{self.cluster}.node.{self.node}.cmd"

    @property
    def auction(self) -> str:
        """Placement: a START document in, a bid out from every node that would admit it."""
        return f"launcher.{self.cluster}.auction"

    @property
    def release(self) -> str:
        """Bids the node made that a controller did not pick: each message's body is one bid id, whose reservation
        the node drops at once (else it holds until it expires)."""
        return f"launcher.{self.cluster}.node.{self.node}.release"

    @property
    def events(self) -> str:
        """The node's journal events, in the events stream."""
        return f"launcher.{self.cluster}.node.{self.node}.events"

    @property
    def stats(self) -> str:
        """The node's STATS snapshots (plain NATS, never the stream)."""
        return f"launcher.{self.cluster}.node.{self.node}.stats"

    @property
    def stream(self) -> str:
        """The JetStream stream of every node's events."""
        return f"launcher-{self.cluster}-events"

    @property
    def bucket(self) -> str:
        """The key-value bucket of the nodes: key `<n>`, expiring unless refreshed."""
        return f"launcher-{self.cluster}-nodes"

    @property
    def node_key(self) -> str:
        """The subject a write of the node's key goes to (how a per-key TTL is given with nats-py)."""
        return f"$KV.{self.bucket}.{self.node}"

    def for_node(self, node: str) -> Subjects:
        """The same cluster's names for another node."""
        return Subjects(self.cluster, node)
