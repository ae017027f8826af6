"""The fleet's JetStream stream and key-value bucket, made by the first launcher that needs them (an operator may
make them beforehand, with other limits: an existing one is used as it is)."""

from __future__ import annotations

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig

from launcher.transport.fleet.subjects import Subjects

NATS_ERRORS = (nats.errors.Error, TimeoutError, OSError)  # what a NATS call raises when NATS is away or refuses
DUPLICATE_WINDOW_S = 120.0  # a re-published event id within this long is dropped by JetStream
MARKER_TTL_S = 300  # how long the marker of an expired node key stays for watchers (a controller away longer
#                     sees the key missing, not its expiry)


def events_stream(subjects: Subjects, replicas: int) -> StreamConfig:
    """The events stream's config: every node's events subject, on disk, JetStream's duplicate window, direct
    gets (a node reads back its own last event by its subject alone), atomic batches (a node's events go in
    batches, each stored whole or not at all)."""
    return StreamConfig(name=subjects.stream, subjects=[subjects.for_node("*").events], storage=StorageType.FILE,
                        duplicate_window=DUPLICATE_WINDOW_S, allow_direct=True, allow_atomic=True,
                        num_replicas=replicas)


def nodes_bucket(subjects: Subjects, replicas: int) -> KeyValueConfig:
    """The nodes bucket's config: one key per node, with per-key TTLs and a marker when one expires."""
    return KeyValueConfig(bucket=subjects.bucket, history=1, direct=True, limit_marker_ttl=MARKER_TTL_S,
                          replicas=replicas)


class StreamUnfit(nats.errors.Error):
    """The events stream exists, made by someone else, without what the launcher needs of it."""


async def ensure_events_stream(js: JetStreamContext, subjects: Subjects, replicas: int) -> None:
    """The events stream (`events_stream`), made if it does not exist; StreamUnfit if it exists without atomic
    batches (the launcher publishes in them: `publisher`). On nats-py's loop (a launcher runs it through
    `AsyncioThread.call`)."""
    try:
        info = await js.stream_info(subjects.stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(events_stream(subjects, replicas))
        return
    if not info.config.allow_atomic:
        raise StreamUnfit(f"the stream {subjects.stream} does not allow atomic batches (allow_atomic, nats-server "
                          ">= 2.12): the launcher publishes its events in them")


async def ensure_nodes_bucket(js: JetStreamContext, subjects: Subjects, replicas: int) -> None:
    """The nodes bucket (`nodes_bucket`), made if it does not exist. On nats-py's loop."""
    try:
        await js.key_value(subjects.bucket)
    except nats.js.errors.BucketNotFoundError:
        await js.create_key_value(nodes_bucket(subjects, replicas))
