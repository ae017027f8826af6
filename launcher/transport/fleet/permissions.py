"""What a node of the fleet must be allowed on an authorizing nats-server, and nothing more (docs/fleet.md,
"Security"): its own subjects, the shared auction, its events into the stream, its own key in the bucket, its own
last event read back, and replies to the requests it gets. `launcher fleet permissions NODE` prints it."""

from __future__ import annotations

from typing import Any

from launcher.transport.fleet.subjects import Subjects


def node_permissions(subjects: Subjects) -> dict[str, Any]:
    """The nats-server `permissions` block of node `subjects.node` (its inbox prefix is ``_INBOX_<node>``)."""
    s = subjects
    return {
        "publish": {"allow": [
            s.events,  # its events, into the stream (the ack comes back to its inbox)
            s.stats,
            s.node_key,  # its own key, with a per-key TTL, and its purge
            f"$JS.API.STREAM.INFO.{s.stream}",  # whether the stream and bucket exist (made by an admin if not)
            f"$JS.API.STREAM.INFO.KV_{s.bucket}",
            f"$JS.API.DIRECT.GET.{s.stream}.{s.events}",  # its own last event, and no other node's
        ]},
        "subscribe": {"allow": [s.cmd, s.auction, s.release, f"_INBOX_{s.node}.>"]},
        "allow_responses": True,  # answers to the commands and auctions it received, and only those
    }
