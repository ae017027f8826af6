"""The `simulation:` section of the launcher config, and the failure injection it sets up.

Settings (unknown keys or bad values are a SetupError naming the key, from `parse_section`):

``mode``: ``memory`` | ``process`` (the package docstring says what each is)
``boot_delay_s`` (0.05): time from start_vm until the VM is up (monitor_vm sends CONNECTED).
``stop_delay_s`` (0.0): how long a graceful shutdown takes in the guest.
``pools`` (none): prepared pools of simulated slots (`launcher.plugin.warm.PoolSettings`; slots.py).
``slot_delay_s`` (0.01): how long making one slot takes.
``failures``: a list of failure-injection rules (`FailureRule`), tried in order; the first whose ``phase`` is the
    current one, whose ``match`` regex (default: anything) is found in the instance uuid (the slot id for
    ``slot``) and whose random draw succeeds (``probability``, default 1.0) applies. For ``ensure`` / ``create``
    / ``start`` / ``attach`` / ``detach`` (attach_volume, detach_volume) and ``slot`` (making a prepared slot)
    its ``action`` is ``fail`` (the call raises VirtualizerError with the phase's code) or ``hang`` (the call
    never returns, so the launcher's timeouts and cancellation are exercised): `inject`. For ``crash`` the VM
    dies ``after_s`` seconds after it came up: `crash_after`.
"""

from __future__ import annotations

import random
import re
from typing import Any

import attrs
import trio

from launcher.plugin.errors import ATTACH_FAILURE, DETACH_FAILURE, IMAGE_FAILURE, LAUNCH_FAILURE, VirtualizerError
from launcher.plugin.settings import at_most, one_of
from launcher.plugin.warm import PoolSettings, check_pools

SECTION = "simulation"  # the config section these settings come from; error messages name keys under it
MODES = ("memory", "process")
PHASES = ("ensure", "create", "start", "crash", "attach", "detach", "slot")
_PHASE_CODES = {"ensure": IMAGE_FAILURE, "create": IMAGE_FAILURE, "start": LAUNCH_FAILURE, "attach": ATTACH_FAILURE,
                "detach": DETACH_FAILURE, "slot": LAUNCH_FAILURE}


def _regular_expression(instance: Any, attribute: attrs.Attribute[str], value: str) -> None:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"{attribute.name}: invalid regular expression {value!r}: {exc}") from None


@attrs.frozen
class FailureRule:
    """One entry of `simulation.failures`: make calls of `phase` fail (or hang) for matching instances."""

    phase: str = attrs.field(validator=one_of(*PHASES))
    match: str = attrs.field(default="", validator=_regular_expression)  # searched in the instance uuid
    probability: float = attrs.field(default=1.0, validator=at_most(1))
    action: str = attrs.field(default="fail", validator=one_of("fail", "hang"))  # "fail" only for phase crash
    after_s: float = 0.0  # crash only: how long after coming up the VM dies

    def __attrs_post_init__(self) -> None:
        if self.phase == "crash" and self.action != "fail":
            raise ValueError(f"action: must be fail for phase crash, got {self.action!r}")
        if self.after_s and self.phase != "crash":
            raise ValueError("after_s: only allowed for phase crash")

    def applies(self, phase: str, instance_uuid: str) -> bool:
        """Whether this rule fires now for `instance_uuid` in `phase` (draws a random number if it could)."""
        return (
            phase == self.phase and re.search(self.match, instance_uuid) is not None
            and random.random() < self.probability
        )


@attrs.frozen
class SimulationSettings:
    """The `simulation:` section of the launcher config, checked by `launcher.plugin.settings.parse_section`."""

    mode: str = attrs.field(default="memory", validator=one_of(*MODES))
    boot_delay_s: float = 0.05
    stop_delay_s: float = 0.0
    pools: tuple[PoolSettings, ...] = ()
    slot_delay_s: float = 0.01
    failures: tuple[FailureRule, ...] = ()

    def __attrs_post_init__(self) -> None:
        check_pools(self.pools)  # ValueError naming the pool

    def rule_for(self, phase: str, instance_uuid: str) -> tuple[int, FailureRule] | None:
        """The failure rule that applies to this call, if any, with its index in `failures`."""
        return next(((i, rule) for i, rule in enumerate(self.failures) if rule.applies(phase, instance_uuid)), None)



async def inject(settings: SimulationSettings, phase: str, instance_uuid: str) -> None:
    """Apply the failure rules of `phase`: raise or hang if one fires, else just checkpoint."""
    found = settings.rule_for(phase, instance_uuid)
    if found is None:
        await trio.lowlevel.checkpoint()
        return
    index, rule = found
    if rule.action == "hang":
        await trio.sleep_forever()
    reason = f"{phase} failure injected by simulation rule {index} ({SECTION}.failures[{index}])"
    raise VirtualizerError(_PHASE_CODES[phase], reason, instance_uuid)


def crash_after(settings: SimulationSettings, instance_uuid: str) -> float | None:
    """Seconds after coming up at which a VM being started now will crash, or None if it will not."""
    found = settings.rule_for("crash", instance_uuid)
    return None if found is None else found[1].after_s
