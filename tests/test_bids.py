"""Auction bids (launcher/core/bids.py, `Supervisor.bid`): a bid holds what its START needs until that START
consumes it or it expires, so that concurrent auctions never promise the same room twice; against the in-process
supervisor (the fleet's auctions over NATS are in test_fleet.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from harness import running_node, start_command

from launcher.core.bids import Bids
from launcher.core.resources import Resources
from launcher.plugin import errors
from launcher.plugin.errors import LauncherError


async def test_bids_hold_until_taken_or_expired() -> None:
    bids = Bids()
    first = bids.add(Resources(1, 64, 10), ttl_s=10)
    second = bids.add(Resources(2, 128, 0), ttl_s=0.05)
    assert bids.held() == Resources(3, 192, 10) and len(bids) == 2
    assert bids.take(first.bid_id) == first
    assert bids.take(first.bid_id) is None  # consumed once
    assert bids.held() == Resources(2, 128, 0)
    await trio.sleep(0.1)
    assert bids.held() == Resources() and len(bids) == 0
    assert bids.take(second.bid_id) is None  # expired: nothing to consume


async def test_a_bid_reserves_its_room_its_start_consumes_it_and_an_expired_one_frees_it(tmp_path: Path) -> None:
    async with running_node(tmp_path, admission={"max_instances": 2}) as node:
        s = node.supervisor
        first = s.bid(start_command("bid-1"), ttl_s=30)
        s.bid(start_command("bid-2"), ttl_s=0.3)
        with pytest.raises(LauncherError) as refused:
            s.bid(start_command("bid-3"), ttl_s=30)
        assert refused.value.code == errors.FULL_CN and "2 bids" in refused.value.reason
        with pytest.raises(LauncherError) as refused:
            node.start("no-bid")  # a START without a bid finds the room reserved
        assert refused.value.code == errors.FULL_CN
        await node.done(s.dispatch(start_command("bid-1"), bid=first.bid_id))  # consumes its own reservation
        assert node.state("bid-1") == "running" and len(s.admission.bids) == 1
        with pytest.raises(LauncherError) as refused:
            s.bid(start_command("bid-1"), ttl_s=30)
        assert refused.value.code == errors.INSTANCE_EXISTS
        await trio.sleep(0.4)  # the second bid expires unused: its room is free again
        assert len(s.admission.bids) == 0
        await node.done(node.start("late"))
        # A START whose bid expired is admitted as any other: here the node is full, so full_cn.
        with pytest.raises(LauncherError) as refused:
            s.dispatch(start_command("bid-2"), bid="expired-or-unknown")
        assert refused.value.code == errors.FULL_CN


async def test_no_bid_from_a_node_in_maintenance(tmp_path: Path) -> None:
    async with running_node(tmp_path) as node:
        node.supervisor.maintenance = True
        with pytest.raises(LauncherError) as refused:
            node.supervisor.bid(start_command("m-1"), ttl_s=1)
        assert refused.value.code == errors.NODE_MAINTENANCE
