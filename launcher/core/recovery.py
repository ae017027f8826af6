"""What recovering actors share at launcher start-up: the host-reboot policy, the boot slots, the settle count.

The supervisor makes one `RecoveryPlan` per start-up and hands it to every actor (through ActorContext). Each
recovered actor reconciles its record's goal with what the virtualizer finds (InstanceActor._recover) and
calls `settled()` once it reports its first settled state (running, exited or deleted). Once every recovered
instance has settled, `all_settled` is set and the supervisor records this boot's id (launcher/core/bootid.py).
"""

from __future__ import annotations

import trio

from launcher.core.config import Recovery
from launcher.plugin.spec import InstanceSpec


class RecoveryPlan:
    """What this start-up's recovered instances share: the host-reboot policy, the boot slots that bound how many
    VMs recovery boots at once, and the count of instances still to settle."""

    def __init__(self, settings: Recovery, *, host_rebooted: bool) -> None:
        """The plan for this start-up; `host_rebooted` as `bootid.detect` found it."""
        self.host_rebooted = host_rebooted
        self.policy = settings.restart_running
        # Held by an actor from the moment recovery boots its VM until it runs or the boot fails.
        self.boot_slots = trio.CapacityLimiter(settings.max_parallel)
        self.all_settled = trio.Event()
        self._unsettled = 0

    def restarts(self, spec: InstanceSpec) -> bool:
        """Whether the policy restarts an instance that was running when the host went down."""
        return self.policy == "always" or (self.policy == "requested" and spec.restart)

    def expect(self, count: int) -> None:
        """`count` recovered instances will each call settled() once; with none, all have settled."""
        self._unsettled += count
        if self._unsettled == 0:
            self.all_settled.set()

    def settled(self) -> None:
        """One recovered instance has settled (running, exited or deleted); the last one sets `all_settled`."""
        self._unsettled -= 1
        if self._unsettled == 0:
            self.all_settled.set()
