"""`instance.json`: what the launcher keeps about an instance across restarts.

The record holds the START spec and two facts:

- `created`: whether the per-instance disk and seed were made *and the VM was started on them* (start_vm
  returned, or failed with launch_failure). A record with created=false means the launcher stopped in the
  middle of a START (before or during start_vm), which is then carried on.
- `goal`: the state the launcher keeps the instance in, written before the command that sets it is
  acknowledged: `running` (START; a RESTART once start_vm has returned), `starting` (a RESTART until then),
  `exited` (a STOP, or the VM went down on its own or never came up: the launcher does not restart it unasked)
  or `deleted` (a DELETE under way). Records written before this field existed have none: `running`.

and the instance's volumes:

- `volumes`: the ids of the volumes the instance has now, in disk order: its START's `storage` entries, less those
  detached since, then those attached since (ATTACH / DETACH). Written before an ATTACH is carried out and after a
  DETACH is, so that the record never lists fewer volumes than the VM may use. Records written before this
  field existed have none: the START's entries.

Whether the VM runs is never stored; at start-up the virtualizer tells, and recovery reconciles that with the
goal (see InstanceActor._recover).
"""

from __future__ import annotations

import json
import typing
from typing import Any, TypeVar

import attrs

from launcher.plugin.spec import InstanceSpec, Networking, StorageEntry

VERSION = 1
T = TypeVar("T", bound=attrs.AttrsInstance)
GOALS = ("running", "starting", "exited", "deleted")


@attrs.frozen
class InstanceRecord:
    """One decoded `instance.json`: the START's spec, `created`, `goal` and `volumes` (module doc). Immutable: a
    change is a new record, written with `record_json`; `from_json` reads one back."""

    spec: InstanceSpec
    created: bool = False
    goal: str = "running"
    volumes: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: bytes) -> InstanceRecord:
        """Raises ValueError (or a subclass) naming what is wrong if the file is not a record this launcher
        wrote: not JSON, another version, a missing or unknown key, or a value of the wrong type anywhere."""
        body = json.loads(data)
        if not isinstance(body, dict) or body.get("version") != VERSION:
            raise ValueError(f"not an instance record of version {VERSION}")
        if not {"version", "spec", "created"} <= set(body) <= {"version", "spec", "created", "goal", "volumes"}:
            raise ValueError(f"instance record keys are {sorted(body)}, expected created, goal, spec, version and "
                             "volumes")
        if not isinstance(body["created"], bool):
            raise ValueError(f"created: expected true or false, got {body['created']!r}")
        goal = body.get("goal", "running")  # absent in records of older launchers
        if goal not in GOALS:
            raise ValueError(f"goal: expected one of {', '.join(GOALS)}, got {goal!r}")
        spec = _decode(InstanceSpec, body["spec"], "spec")
        if "volumes" in body:
            volumes = _value(tuple[str, ...], body["volumes"], "volumes")
        else:  # records of older launchers: the START's
            volumes = storage_ids(spec)
        return cls(spec=spec, created=body["created"], goal=goal, volumes=volumes)


def storage_ids(spec: InstanceSpec) -> tuple[str, ...]:
    """The ids of the START's volumes: an instance's volumes until an ATTACH or DETACH changes them."""
    return tuple(entry.id for entry in spec.storage)


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


def record_json(encoded_spec: bytes, created: bool, goal: str = "running", volumes: tuple[str, ...] = ()) -> bytes:
    """instance.json from an already encoded spec."""
    return b'{"created":%s,"goal":"%s","spec":%s,"version":%d,"volumes":%s}' % (
        b"true" if created else b"false", goal.encode(), encoded_spec, VERSION, _encode(list(volumes)).encode())


def _decode(cls: type[T], raw: Any, where: str) -> T:
    """An instance of the attrs class `cls` from a JSON object, every value checked against its field's type
    (str, bool, int, int | None, nested attrs classes, tuples of them). A missing key takes the field's
    default; an unknown key, a missing required one or a wrong type raises ValueError naming it."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object, got {type(raw).__name__}")
    fields = attrs.fields_dict(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        if name in raw:
            values[name] = _value(hints[name], raw[name], f"{where}.{name}")
        elif field.default is attrs.NOTHING:
            raise ValueError(f"{where}.{name}: missing")
    return cls(**values)


def _value(kind: Any, value: Any, where: str) -> Any:
    if attrs.has(kind):
        return _decode(kind, value, where)
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
        item = typing.get_args(kind)[0]
        return tuple(_value(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    allowed = typing.get_args(kind) or (kind,)  # int | None -> (int, NoneType)
    # bool is an int to Python; a record holds true/false only where the field is a bool.
    if not any(type(value) is t for t in allowed):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ValueError(f"{where}: expected {names}, got {type(value).__name__}")
    return value
