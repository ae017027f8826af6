"""The hand-optimised paths give exactly what the standard code they replace gives:

- `records.spec_json` (on the path of every START) is `json.dumps(attrs.asdict(spec), sort_keys=True)` with
  compact separators, byte for byte;
- the payload loader's plain-value builder (`loader._plain_value`) builds what PyYAML's constructor builds for
  the same node, with the same types, and leaves everything else to the constructor (`load_yaml` then agrees
  with the constructor on the whole document).
"""

from __future__ import annotations

import json
import math
from typing import Any

import attrs
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.durable.records import spec_json
from launcher.plugin.spec import InstanceSpec, Networking, StorageEntry
from launcher.transport.payloads import loader

TEXT = st.text(max_size=12)
INTS = st.integers(min_value=-(2**63), max_value=2**63)

STORAGE = st.builds(StorageEntry, id=TEXT, boot=st.booleans(), boot_index=TEXT, ephemeral=st.booleans(),
                    local=st.booleans(), swap=st.booleans(), tag=TEXT, size=INTS)
NETWORKING = st.builds(Networking, **{name: TEXT for name in attrs.fields_dict(Networking) if name != "public_ip"},
                       public_ip=st.booleans())
SPECS = st.builds(
    InstanceSpec,
    **{name: TEXT for name, field in attrs.fields_dict(InstanceSpec).items() if field.type in ("str", str)},
    vcpus=INTS, mem_mb=INTS, disk_mb=INTS, network_node=st.booleans(), privileged=st.booleans(),
    restart=st.booleans(), networking=NETWORKING, storage=st.lists(STORAGE, max_size=3).map(tuple),
)


@given(SPECS)
def test_spec_json_is_json_dumps_of_asdict(spec: InstanceSpec) -> None:
    standard = json.dumps(attrs.asdict(spec), sort_keys=True, separators=(",", ":")).encode()
    assert spec_json(spec) == standard


SCALARS = st.none() | st.booleans() | INTS | st.floats(allow_nan=False) | TEXT
KEYS = st.booleans() | st.integers(-1000, 1000) | TEXT
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                      max_leaves=20)

# Documents the builder must hand over to the constructor (tags, merge keys, anchors, complex keys, timestamps,
# binary, sets) or that exercise the tuned resolvers (ciao's Go-like ints and bools, octal, sexagesimal).
HAND_WRITTEN = [
    "a: 1\nb: [1, 2, {c: d}]\n",
    "a: !!str 12\nb: !!int '7'\nc: !!float 1\n",
    "base: &b {x: 1}\nderived:\n  <<: *b\n  y: 2\n",
    "? [1, 2]\n: complex key\n",
    "when: 2001-12-14\nstamp: 2001-12-14t21:59:43.10-05:00\n",
    "blob: !!binary aGVsbG8=\n",
    "set: !!set {a, b}\n",
    "flags: [yes, no, on, off, y, n, True, FALSE]\n",
    "numbers: [0b101, 0o17, 017, 0x1F, 1_000, 190:20:30, .inf, -.Inf, .nan, 1e3, +12]\n",
    "nulls: [~, null, Null, NULL, '']\n",
    "text: |\n  line one\n  line two\nfolded: >\n  a\n  b\n",
    "quoted: ['1', \"true\", 'null', \"\\u00e9\"]\n",
    "a: 1\na: 2\n",
    "- deep\n- [[[[[[[[[[1]]]]]]]]]]\n",
]


def same(a: Any, b: Any) -> bool:
    """Equal with equal types all the way down (1 == True == 1.0 to Python, not here); NaN equals NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def constructed(text: str) -> Any:
    """What PyYAML's constructor (with the payload loader's resolvers and rules) makes of `text`, or the error."""
    parser = loader._Loader(text)
    try:
        return parser.construct_document(parser.get_single_node())
    except yaml.YAMLError as exc:
        return type(exc)
    finally:
        parser.dispose()


def check_document(text: str) -> None:
    standard = constructed(text)
    parser = loader._Loader(text)
    try:
        built = loader._plain_value(parser, parser.get_single_node())
    except Exception:
        built = None  # left to the constructor, as load_yaml does
    else:
        assert same(built, standard), (text, built, standard)
    finally:
        parser.dispose()
    if not isinstance(standard, type):
        assert same(loader.load_yaml(text), standard), text


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(VALUES, st.sampled_from([None, True, False]))
def test_plain_builder_matches_the_constructor(value: Any, flow: bool | None) -> None:
    check_document(yaml.safe_dump(value, default_flow_style=flow, allow_unicode=True))


def test_plain_builder_on_hand_written_documents() -> None:
    handed_over = []
    for text in HAND_WRITTEN:
        check_document(text)
        parser = loader._Loader(text)
        try:
            loader._plain_value(parser, parser.get_single_node())
        except Exception:
            handed_over.append(text.split(":")[0])
        finally:
            parser.dispose()
    # The anchor/merge key, the complex key, !!binary, !!set and the duplicate key; timestamps are strings to
    # this loader (as to ciao's), so they stay on the fast path.
    assert handed_over == ["base", "? [1, 2]\n", "blob", "set", "a"]
