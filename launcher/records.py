"""`instance.json`: what the launcher keeps about an instance across restarts.

The record holds the START spec and two facts:

- `created`: whether the per-instance disk and seed were made *and the VM was started on them* (start_vm
  returned, or failed with launch_failure). A record with created=false means the launcher stopped in the
  middle of a START (before or during start_vm), which is then carried on.
- `goal`: the state the launcher keeps the instance in, written before the command that sets it is
  acknowledged: `running` (START; a RESTART once start_vm has returned), `starting` (a RESTART until then),
  `exited` (a STOP, or the VM went down on its own or never came up: the launcher does not restart it unasked)
  or `deleted` (a DELETE under way). Records written before this field existed have none: `running`.

Whether the VM runs is never stored; at start-up the virtualizer tells, and recovery reconciles that with the
goal (see InstanceActor._recover).
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from launcher.payloads import InstanceSpec, Networking, StorageEntry

VERSION = 1
GOALS = ("running", "starting", "exited", "deleted")


@attrs.frozen
class InstanceRecord:
    spec: InstanceSpec
    created: bool = False
    goal: str = "running"

    def to_json(self) -> bytes:
        return record_json(spec_json(self.spec), self.created, self.goal)

    @classmethod
    def from_json(cls, data: bytes) -> InstanceRecord:
        """Raises ValueError (or a subclass) if the file is not a record this launcher wrote."""
        body = json.loads(data)
        if not isinstance(body, dict) or body.get("version") != VERSION:
            raise ValueError(f"not an instance record of version {VERSION}")
        goal = body.get("goal", "running")  # absent in records of older launchers
        if goal not in GOALS:
            raise ValueError(f"bad goal {goal!r} in instance record")
        return cls(spec=_spec_from_dict(body["spec"]), created=bool(body["created"]), goal=goal)


_SPEC_FIELDS = sorted(attrs.fields_dict(InstanceSpec))
_NETWORKING_FIELDS = sorted(attrs.fields_dict(Networking))
_STORAGE_FIELDS = sorted(attrs.fields_dict(StorageEntry))
_encode = json.JSONEncoder(separators=(",", ":")).encode


def spec_json(spec: InstanceSpec) -> bytes:
    """The spec as the record stores it; encoded once per START, used for both writes of the record.

    The same text as json.dumps(attrs.asdict(spec), sort_keys=True), built with the keys already in order:
    half the cost, on the path of every START."""
    body = {name: getattr(spec, name) for name in _SPEC_FIELDS}
    body["networking"] = {name: getattr(spec.networking, name) for name in _NETWORKING_FIELDS}
    body["storage"] = [{name: getattr(entry, name) for name in _STORAGE_FIELDS} for entry in spec.storage]
    return _encode(body).encode()


def record_json(encoded_spec: bytes, created: bool, goal: str = "running") -> bytes:
    """instance.json from an already encoded spec."""
    return b'{"created":%s,"goal":"%s","spec":%s,"version":%d}' % (
        b"true" if created else b"false", goal.encode(), encoded_spec, VERSION)


def _spec_from_dict(raw: dict[str, Any]) -> InstanceSpec:
    fields = dict(raw)
    try:
        fields["networking"] = Networking(**fields["networking"])
        fields["storage"] = tuple(StorageEntry(**entry) for entry in fields["storage"])
        return InstanceSpec(**fields)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"bad spec in instance record: {exc}") from exc
