"""What a START's meta-data means for the guest's identity, whatever the seed format (part of the plugin API,
`launcher.plugin`).

Controllers use the keys of both cloud-init datasources a node may write (NoCloud and OpenStack ConfigDrive
spell them differently). One meaning is read here, so that a seed writer can give every guest the same
identity:

| meaning | meta-data keys (the first present wins) | when absent |
|---|---|---|
| instance-id | ``instance-id``, ``uuid`` | the instance uuid |
| hostname | ``local-hostname``, ``hostname`` | the instance uuid, cut to 63 characters |
| SSH keys | ``public-keys``, ``public_keys`` (both may be given only if they name the same keys) | none |

A key whose value is null or "" counts as absent. The instance-id must be a string without control characters;
a hostname must pass `hostname_problem`. SSH keys may be one string (one key a line), a list of strings, or a
mapping of key names to a string or a list of strings; each key is one non-empty line. Every other key is kept,
in its order, for the seed writer to pass through.

Meta-data text (`parse_meta_data`) is YAML or JSON (JSON is YAML) holding a mapping with string keys, as ciao
sends it (for instance ``{"uuid": "ciao", "hostname": "ciao"}``); blank text, or a document that is null, is an
empty mapping, anything else a `MetaDataError`.

The payload parser checks the meta-data with `read_identity` (a bad one is `invalid_data`), and every virtualizer
reads it with `parse_meta_data` and `read_identity` (the qemu virtualizer's seed, the docker virtualizer's
container hostname), so a START that parses gets the identity it asked for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs
import yaml

INSTANCE_ID_KEYS = ("instance-id", "uuid")
HOSTNAME_KEYS = ("local-hostname", "hostname")
PUBLIC_KEYS_KEYS = ("public-keys", "public_keys")
IDENTITY_KEYS = frozenset(INSTANCE_ID_KEYS + HOSTNAME_KEYS + PUBLIC_KEYS_KEYS)

MAX_HOSTNAME_LEN = 253  # RFC 1123 (a name in DNS)
MAX_LABEL_LEN = 63  # RFC 1123; also the longest name Linux takes as its hostname is 64 bytes
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# yaml.safe_load, with libyaml's implementation when available (several times faster)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class MetaDataError(ValueError):
    """Meta-data text that is not a mapping with string keys; the message begins with "meta-data: "."""


class IdentityError(ValueError):
    """A meta-data value that cannot be used; `key` is the meta-data key at fault."""

    def __init__(self, key: str, reason: str) -> None:
        """The meta-data `key` at fault and `reason`, what is wrong with its value; the message is both."""
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


@attrs.frozen
class GuestIdentity:
    """The identity a START's meta-data gives its guest. None: not given (the seed writer uses the default)."""

    instance_id: str | None = None
    hostname: str | None = None
    public_keys: tuple[tuple[str, str], ...] = ()  # (name, key), in the order given
    other: Mapping[str, Any] = attrs.field(factory=dict)  # every other key, in its order


def hostname_problem(name: str) -> str | None:
    """Why `name` cannot be a guest's hostname, or None: RFC 1123 labels (letters, digits and '-', not first or
    last, at most 63 characters) joined by '.', at most 253 characters, one trailing '.' allowed. The first label
    is what Linux gets as its hostname (at most 64 bytes), the whole name its FQDN."""
    if not name:
        return "empty"
    if len(name) > MAX_HOSTNAME_LEN:
        return f"longer than {MAX_HOSTNAME_LEN} characters"
    labels = (name[:-1] if name.endswith(".") else name).split(".")
    for label in labels:
        if _LABEL_RE.fullmatch(label) is None:
            return (f"invalid label {label[:70]!r} (letters, digits and '-', not first or last, "
                    f"1 to {MAX_LABEL_LEN} characters)")
    return None


def default_hostname(instance_uuid: str) -> str:
    """The hostname of a guest whose meta-data names none: its uuid, cut to a valid label."""
    return instance_uuid[:MAX_LABEL_LEN].rstrip("-") or "instance"


def parse_meta_data(text: str | bytes) -> dict[str, Any]:
    """The meta-data mapping of `text` (YAML or JSON); blank text or a null document is an empty one.
    MetaDataError ("meta-data: ...") for text that does not parse or is not a mapping with string keys."""
    if not text.strip():
        return {}
    try:
        value = yaml.load(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as exc:
        raise MetaDataError(f"meta-data: not valid YAML or JSON: {yaml_problem(exc)}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MetaDataError(f"meta-data: must be a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise MetaDataError(f"meta-data: keys must be strings, got {key!r}")
    return value


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong with a YAML text, and where, on one line."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        return f"{exc.problem} (line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1})"
    return " ".join(str(exc).split())


def read_identity(metadata: Mapping[str, Any]) -> GuestIdentity:
    """The identity `metadata` (a mapping with string keys) gives; IdentityError names the key at fault."""
    instance_id = _first_text(metadata, INSTANCE_ID_KEYS)
    hostname_key = next((key for key in HOSTNAME_KEYS if _given(metadata.get(key))), None)
    hostname = _first_text(metadata, HOSTNAME_KEYS)
    if hostname is not None and hostname_key is not None:
        problem = hostname_problem(hostname)
        if problem is not None:
            raise IdentityError(hostname_key, f"invalid hostname {hostname[:70]!r}: {problem}")
    return GuestIdentity(
        instance_id=instance_id,
        hostname=hostname,
        public_keys=_public_keys(metadata),
        other={key: value for key, value in metadata.items() if key not in IDENTITY_KEYS},
    )


def _given(value: Any) -> bool:
    return value is not None and value != ""


def _first_text(metadata: Mapping[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = metadata.get(key)
        if not _given(value):
            continue
        if not isinstance(value, str) or not value.isprintable():
            raise IdentityError(key, f"must be a string without control characters, got {value!r:.60}")
        return value
    return None


def _public_keys(metadata: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    found = [(key, _named_keys(key, metadata[key])) for key in PUBLIC_KEYS_KEYS if _given(metadata.get(key))]
    if len(found) == 2 and [k for _, k in found[0][1]] != [k for _, k in found[1][1]]:
        raise IdentityError(PUBLIC_KEYS_KEYS[1], f"names other keys than {PUBLIC_KEYS_KEYS[0]} (give one of them)")
    return found[0][1] if found else ()


def _named_keys(key: str, value: Any) -> tuple[tuple[str, str], ...]:
    """(name, key) pairs of one SSH keys value: names from a mapping's keys, else key-0, key-1, ..."""
    if isinstance(value, Mapping):
        pairs = []
        for name, item in value.items():
            if not isinstance(name, str) or not name or not name.isprintable():
                raise IdentityError(key, f"key names must be non-empty strings, got {name!r:.60}")
            lines = _key_lines(key, item)
            pairs += [(name if len(lines) == 1 else f"{name}-{i}", line) for i, line in enumerate(lines)]
        return tuple(pairs)
    return tuple((f"key-{i}", line) for i, line in enumerate(_key_lines(key, value)))


def _key_lines(key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        items = [line for line in value.splitlines() if line.strip()]
    elif isinstance(value, list):
        items = value
    else:
        raise IdentityError(key, f"must be a string, a list of strings or a mapping, got {type(value).__name__}")
    lines = []
    for item in items:
        if not isinstance(item, str) or not item.strip() or not item.isprintable():
            raise IdentityError(key, f"each key must be one non-empty line, got {item!r:.60}")
        lines.append(item.strip())
    return lines
