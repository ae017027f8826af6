"""Auction bids (the fleet's placement, docs/fleet.md): a node that would admit a START offers a bid, and the bid
holds a short reservation of what that START needs, so that concurrent auctions never promise the same room twice.

A reservation counts for admission (`Admission.no_room`) until the START sent with the bid's id consumes it
(`Bids.take`: the START's own need then takes its place, in the same check) or until it expires, `ttl_s` after the
bid. Expired bids are dropped lazily, oldest first, whenever what the bids hold is asked for: no task, and each bid
is dropped once. A START whose bid expired or was never made is admitted as any other START, and refused `full_cn`
if it no longer fits.
"""

from __future__ import annotations

import heapq
import itertools
import uuid

import attrs
import trio

from launcher.core.resources import Resources


@attrs.frozen
class Bid:
    """One bid: its id, what it reserves and when the reservation ends (`trio.current_time()`)."""

    bid_id: str
    need: Resources
    deadline: float


class Bids:
    """The node's live bids (module doc). Used from the Trio thread only."""

    def __init__(self) -> None:
        """No bid yet. Bid ids are this object's random prefix and a count: unique across restarts, and one
        random draw in all (a uuid4 per bid, a getrandom call each, was 4 % of a busy node's time)."""
        prefix = uuid.uuid4().hex[:16]
        self._ids = (f"{prefix}-{n}" for n in itertools.count(1))
        self._bids: dict[str, Bid] = {}
        self._deadlines: list[tuple[float, str]] = []  # a heap of (deadline, bid id), one entry per bid made
        self._held = Resources()

    def add(self, need: Resources, ttl_s: float) -> Bid:
        """A new bid reserving `need` for `ttl_s` seconds."""
        bid = Bid(next(self._ids), need, trio.current_time() + ttl_s)
        self._bids[bid.bid_id] = bid
        heapq.heappush(self._deadlines, (bid.deadline, bid.bid_id))
        self._held += need
        return bid

    def take(self, bid_id: str) -> Bid | None:
        """Consume bid `bid_id`: it is gone, and its reservation with it; None if there is no such live bid."""
        self._expire()
        bid = self._bids.pop(bid_id, None)
        if bid is not None:
            self._held -= bid.need
        return bid

    def held(self) -> Resources:
        """What the live bids reserve."""
        self._expire()
        return self._held

    def __len__(self) -> int:
        """How many bids are live."""
        self._expire()
        return len(self._bids)

    def _expire(self) -> None:
        now = trio.current_time()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, bid_id = heapq.heappop(self._deadlines)
            bid = self._bids.pop(bid_id, None)  # None: taken before it expired
            if bid is not None:
                self._held -= bid.need
