# -*- test-case-name: tests.test_workers -*-
"""The supervisor's runtime directory: workers' admin sockets and config snapshots.

``$RUNTIME_DIRECTORY`` under systemd (``RuntimeDirectory=relayd``, removed by
systemd), else a private temporary directory that the supervisor removes
when it stops.  Created at privileged start, never in a constructor.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Mapping


class RunDir:
    """Where the supervisor keeps files its workers need by path."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._given = environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        self.path = ""

    def create(self) -> None:
        """Use systemd's directory, or make a private one."""
        self.path = self._given or tempfile.mkdtemp(prefix="relayd-")

    def admin_socket(self, key: str) -> str:
        """The unix socket path of the worker called `key`."""
        return os.path.join(self.path, f"{key}.sock")

    def config_snapshot(self, generation: int) -> str:
        """The path of generation `generation`'s config text."""
        return os.path.join(self.path, f"config-g{generation}.toml")

    def remove(self) -> None:
        """Remove the directory if we made it."""
        if self.path and not self._given:
            shutil.rmtree(self.path, ignore_errors=True)
