"""Hypothesis strategies shared by the test modules, one named function each."""

from __future__ import annotations

import os

from hypothesis import settings

# `ci` profile: no per-example deadline (shared CI cores make timings noisy).
settings.register_profile("ci", deadline=None, max_examples=100)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


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
