"""Hypothesis strategies shared by the test modules, one named function each."""

from __future__ import annotations

import os

from hypothesis import settings

# `ci` profile: no per-example deadline (shared CI cores make timings noisy).
settings.register_profile("ci", deadline=None, max_examples=100)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
