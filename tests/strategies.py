"""Hypothesis strategies shared by the test modules, one named function each."""

from __future__ import annotations

import os

from hypothesis import settings

# `ci` profile: no per-example deadline (shared CI cores make timings noisy).
settings.register_profile("ci", deadline=None, max_examples=100)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


# --- core relay ---

from hypothesis import strategies as st  # noqa: E402

_ASCII_KEY = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-:.", min_size=1, max_size=20)


def route_paths():
    """Absolute URL paths a route may use."""
    return st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=12), min_size=1, max_size=3).map(
        lambda parts: "/" + "/".join(parts)
    )


def sizes():
    """(config text, expected bytes) pairs for size strings."""
    units = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "KB": 1000, "MB": 1000**2}
    return st.tuples(st.integers(1, 4096), st.sampled_from(sorted(units))).map(
        lambda t: (f"{t[0]}{t[1]}", t[0] * units[t[1]])
    )


@st.composite
def configs(draw):
    """A valid config as (TOML text, dict of expected values)."""
    n = draw(st.integers(1, 4))
    paths = draw(st.lists(route_paths(), min_size=n, max_size=n, unique=True))
    routes = []
    for path in paths:
        max_body = draw(sizes())
        routes.append(
            {
                "path": path,
                "list": draw(_ASCII_KEY),
                "ack": draw(st.sampled_from(["stored", "accepted"])),
                "format": draw(st.sampled_from(["envelope", "body"])),
                "max_body": max_body,
            }
        )
    workers = draw(st.one_of(st.integers(1, 64), st.just("auto")))
    port = draw(st.integers(1, 65535))
    db = draw(st.integers(0, 15))
    spool_bytes = draw(sizes())
    fsync = draw(st.sampled_from(["always", "batch", "never"]))
    text = (
        "[server]\n"
        f'listen = "tcp:{port}"\n'
        f"workers = {workers if workers != 'auto' else chr(34) + 'auto' + chr(34)}\n"
        "[redis]\n"
        f'url = "redis://10.0.0.1:{port}/{db}"\n'
        "[spool]\n"
        f'dir = "/var/lib/relayd"\nmax_bytes = "{spool_bytes[0]}"\nfsync = "{fsync}"\n'
    )
    for r in routes:
        text += (
            "[[route]]\n"
            f'path = "{r["path"]}"\nlist = "{r["list"]}"\nack = "{r["ack"]}"\n'
            f'format = "{r["format"]}"\nmax_body = "{r["max_body"][0]}"\n'
        )
    expected = {
        "port": port,
        "db": db,
        "workers": workers,
        "spool_bytes": spool_bytes[1],
        "fsync": fsync,
        "routes": [(r["path"], r["list"], r["ack"], r["format"], r["max_body"][1]) for r in routes],
    }
    return text, expected


def json_values(max_leaves=20):
    """Strict-JSON values (no NaN/Infinity, no lone surrogates)."""
    text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**53), 2**53),
        st.floats(allow_nan=False, allow_infinity=False, width=32), text,
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(text, children, max_size=4)),
        max_leaves=max_leaves,
    )


# --- spool ---

from hypothesis import strategies as st  # noqa: E402,F811


def spool_payloads(max_size=64):
    """Opaque spool payloads: empty, binary, anything."""
    return st.binary(max_size=max_size)


def spool_records():
    """(timestamp, payload) pairs as the spool frames them (any non-NaN float)."""
    return st.tuples(st.floats(allow_nan=False), spool_payloads())


def spool_entries():
    """(Redis list key, item) pairs for the spool entry codec; keys may be empty or binary."""
    return st.tuples(st.binary(max_size=40), st.binary(max_size=200))


# --- route schemas ---

_SCHEMA_KEYWORDS = [
    "type", "$ref", "$id", "id", "$schema", "$defs", "definitions", "items", "prefixItems", "properties",
    "patternProperties", "additionalProperties", "format", "pattern", "enum", "const", "minimum", "maximum",
    "minLength", "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "$dynamicRef", "$dynamicAnchor",
    "$anchor", "$recursiveRef", "$recursiveAnchor", "dependentRequired", "dependentSchemas", "dependencies",
    "unevaluatedProperties", "unevaluatedItems", "contains", "multipleOf", "required", "propertyNames",
    "contentMediaType", "$vocabulary",
]
_SCHEMA_LEAVES = [
    "string", "integer", "object", "#", "#/$defs/a", "#/definitions/a", "a.json", "uuid", "date-time", "(",
    "^a$", "http://json-schema.org/draft-07/schema#", "https://json-schema.org/draft/2020-12/schema",
    "urn:x", "#a", "a",
]


def json_schemas():
    """Schema-shaped JSON values, mostly broken: keywords with values of any type, refs, drafts."""
    leaf = (
        st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, allow_infinity=False)
        | st.sampled_from(_SCHEMA_LEAVES)
    )
    return st.recursive(
        leaf,
        lambda children: st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(_SCHEMA_KEYWORDS) | st.text(max_size=2), children, max_size=4),
        max_leaves=12,
    )


@st.composite
def status_messages(draw):
    """Any message a worker can send on its status pipe (relayd/process/status.py)."""
    from relayd.process.status import FinalMetrics, Heartbeat, Ready

    kind = draw(st.sampled_from(("ready", "hb", "final")))
    if kind == "ready":
        return Ready(pid=draw(st.integers(1, 2**22)), spool=draw(st.text()))
    if kind == "hb":
        return Heartbeat(at=draw(st.floats(0, 2e9, allow_nan=False)))
    return FinalMetrics(text=draw(st.text()))


# --- delivery (relayd/deliver/) ---


def list_items():
    """Raw list items: envelopes, other JSON, text, arbitrary bytes."""
    import json as _json

    envelopes = st.builds(
        lambda mid, body: _json.dumps(
            {"id": mid, "ts": 1.5, "route": "/in", "content_type": "application/json", "body": body}
        ).encode(),
        st.text(alphabet="abcdef0123456789", min_size=1, max_size=20),
        st.one_of(st.text(max_size=20), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)),
    )
    json_values = st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(max_size=10)),
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
        max_leaves=8,
    ).map(lambda v: _json.dumps(v).encode())
    return st.one_of(envelopes, json_values, st.text(max_size=30).map(str.encode), st.binary(max_size=40))


def http_statuses():
    """Any status an upstream could answer."""
    return st.integers(min_value=100, max_value=599)
