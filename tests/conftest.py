"""pytest glue: load the hypothesis profile before any test module."""

import tests.strategies  # noqa: F401  (registers and loads the profile)
